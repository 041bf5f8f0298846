"""On-disk embedding cache: image embeddings computed once per (model weights, data set) and reused.

Layout: ``CACHE_DIR/<key>/manifest.json`` plus ``chunk_00000.safetensors``, ... where ``key`` hashes
the model id, the data set fingerprint and the chunk size. A chunk holds the embeddings of
``chunk_size`` consecutive rows of the audit table (``embeddings`` for the readable ones, ``ok`` per
row) and, in its metadata, why the unreadable ones failed. Each chunk is written atomically as soon as
it is encoded, so an interrupted run resumes from the completed chunks and yields the same result
(encoding is deterministic per image; chunks never mix rows from different runs).

Under a launcher (``torchrun``, ``accelerate launch``; see :mod:`clipscope.distributed`) or with
``distributed=True``, rank ``r`` of ``w`` encodes the contiguous chunks ``shard_range(n_chunks, r, w)``
into the cache folder (shared, or local to each node: every node's first process writes its manifest),
and the chunks are sent to rank 0, which alone returns the whole result (``all_ranks=True``: every rank
does, at ``world_size`` times the memory and traffic). A chunk is encoded exactly as one process encodes it (same rows, same batches), so the merged
embeddings are bitwise the single-process ones; a relaunch after a killed rank encodes only the
chunks missing from the cache.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distributed import all_reduce_sum, context, gather_objects, main_bar, shard_range
from ..io import ensure_folder, write_bytes_atomic, write_text_atomic
from .adapters import AuditData

CACHE_VERSION = 1


@dataclass
class CachedEmbeddings:
    """Embeddings of an audit table: ``embeddings[i]`` belongs to row ``rows[i]`` of ``data.frame``.

    ``unreadable`` lists ``(row, reason)`` for rows whose image could not be read. ``stats`` counts
    what this call did: images encoded, chunks computed / reused, seconds spent encoding.
    """

    embeddings: torch.Tensor
    rows: np.ndarray
    unreadable: list[tuple[int, str]]
    folder: Path
    stats: dict = field(default_factory=dict)


def cache_key(model_id: str, fingerprint: str, chunk_size: int) -> str:
    raw = json.dumps([CACHE_VERSION, model_id, fingerprint, chunk_size]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def _chunk_path(folder: Path, i: int) -> Path:
    return folder / f"chunk_{i:05d}.safetensors"


def _read_chunk(path: Path) -> tuple[torch.Tensor, np.ndarray, dict[int, str]] | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            emb, ok = fh.get_tensor("embeddings"), fh.get_tensor("ok").numpy().astype(bool)
        reasons = {int(k): v for k, v in json.loads(meta.get("reasons", "{}")).items()}
        return emb, ok, reasons
    except Exception:  # noqa: BLE001 - a damaged chunk (any read error) is recomputed, never trusted
        return None


def embed_cached(model, data: AuditData, cache_dir: str | Path, *, chunk_size: int = 512, batch_size: int = 64,
                 progress: bool | None = None, distributed: bool | None = None,
                 all_ranks: bool = False) -> CachedEmbeddings | None:
    """Embed every row of ``data`` with ``model``, reading finished chunks from ``cache_dir``; returns the
    :class:`CachedEmbeddings` of all rows (``None`` on the ranks that get no result, see below).

    Only missing chunks are encoded; each is written atomically before the next starts.
    ``distributed`` (default: detect a launcher, see :func:`clipscope.distributed.context`): each rank
    encodes its share of the chunks; rank 0 receives the others' chunks and returns the merged result
    (the same as one process's), the other ranks return ``None``; with ``all_ranks=True`` every rank
    receives every chunk and returns the merged result (``world_size`` times rank 0's memory and
    traffic). ``stats`` then counts over all ranks (``encode_seconds``: summed over the ranks).
    """
    ctx = context(distributed)
    folder = Path(cache_dir) / cache_key(model.id, data.fingerprint, chunk_size)
    ensure_folder(folder)
    n = len(data)
    n_chunks = (n + chunk_size - 1) // chunk_size
    manifest = {"version": CACHE_VERSION, "model_id": model.id, "data_fingerprint": data.fingerprint,
                "data_kind": data.kind, "rows": n, "chunk_size": chunk_size, "chunks": n_chunks}
    manifest_path = folder / "manifest.json"
    if ctx.local_rank == 0 and not manifest_path.is_file():  # the first process of each node: a node-local cache
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    mine = shard_range(n_chunks, ctx.rank, ctx.world_size)
    stats = {"images_encoded": 0, "chunks_computed": 0, "chunks_reused": 0, "encode_seconds": 0.0,
             "cache_folder": str(folder)}
    with main_bar(ctx, progress, n > chunk_size, "audit: encode images", total=n) as bar:
        own = []
        for c in mine:
            own.append(_chunk(model, data, folder, c, chunk_size, batch_size, stats))
            bar.update(len(own[-1].ok))
    parts = gather_objects(own, ctx, dst=None if all_ranks else 0)   # in rank order: table order
    for name in ("images_encoded", "chunks_computed", "encode_seconds"):
        stats[name] = all_reduce_sum(stats[name], ctx)
    stats["chunks_reused"] = n_chunks - stats["chunks_computed"]
    if parts is None:
        return None
    return _merged([c for part in parts for c in part], model.embed_dim, folder, stats)


@dataclass
class _Chunk:
    """One chunk: rows ``start .. start + len(ok)`` of the table, ``embeddings`` of the readable ones (``ok``),
    and why each unreadable one (by its offset in the chunk) failed."""
    start: int
    embeddings: torch.Tensor
    ok: np.ndarray
    reasons: dict[int, str]


def _chunk(model, data: AuditData, folder: Path, c: int, chunk_size: int, batch_size: int, stats: dict) -> _Chunk:
    """Chunk ``c`` from the cache, or encoded (in batches of ``batch_size``) and written atomically; counts what
    it encodes into ``stats``."""
    from safetensors.torch import save as st_save

    start, stop = c * chunk_size, min(len(data), (c + 1) * chunk_size)
    path = _chunk_path(folder, c)
    got = _read_chunk(path) if path.is_file() else None
    if got is not None and len(got[1]) == stop - start:
        return _Chunk(start, *got)
    t0 = time.perf_counter()
    source_rows = data.frame["_row"].to_numpy()[start:stop]
    result = model.embed(data.fetch([int(r) for r in source_rows]), batch_size=batch_size, progress=False)
    ok = np.zeros(stop - start, dtype=bool)
    ok[np.asarray(result.keys, dtype=int)] = True
    reasons = {int(k): str(r) for k, r in result.skipped}
    emb = result.embeddings.float().contiguous()
    meta = {"reasons": json.dumps({str(k): v for k, v in reasons.items()}), "start": str(start)}
    write_bytes_atomic(path, st_save({"embeddings": emb, "ok": torch.from_numpy(ok.astype(np.uint8))}, metadata=meta))
    stats["images_encoded"] += stop - start
    stats["chunks_computed"] += 1
    stats["encode_seconds"] += time.perf_counter() - t0
    return _Chunk(start, emb, ok, reasons)


def _merged(chunks: list[_Chunk], embed_dim: int, folder: Path, stats: dict) -> CachedEmbeddings:
    """The :class:`CachedEmbeddings` of ``chunks`` (in table order)."""
    embs, rows, unreadable = [], [], []
    for ch in chunks:
        embs.append(ch.embeddings)
        rows.append(np.arange(ch.start, ch.start + len(ch.ok))[ch.ok])
        unreadable += [(int(ch.start + k), r) for k, r in sorted(ch.reasons.items())]
    dim = embs[0].shape[1] if embs and embs[0].ndim == 2 and embs[0].shape[0] else embed_dim
    embeddings = torch.cat([e.reshape(-1, dim) for e in embs]) if embs else torch.empty(0, dim)
    return CachedEmbeddings(embeddings, np.concatenate(rows) if rows else np.zeros(0, int), unreadable, folder, stats)
