"""On-disk embedding cache: image embeddings computed once per (model weights, data set) and reused.

Layout: ``CACHE_DIR/<key>/manifest.json`` plus ``chunk_00000.safetensors``, ... where ``key`` hashes
the model id, the data set fingerprint and the chunk size. A chunk holds the embeddings of
``chunk_size`` consecutive rows of the audit table (``embeddings`` for the readable ones, ``ok`` per
row) and, in its metadata, why the unreadable ones failed. Each chunk is written atomically as soon as
it is encoded, so an interrupted run resumes from the completed chunks and yields the same result
(encoding is deterministic per image; chunks never mix rows from different runs).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import ensure_folder, write_bytes_atomic, write_text_atomic
from ..progress import manual_bar
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
                 progress: bool | None = None) -> CachedEmbeddings:
    """Embed every row of ``data`` with ``model``, reading finished chunks from ``cache_dir``.

    Only missing chunks are encoded; each is written atomically before the next starts.
    """
    from safetensors.torch import save as st_save

    folder = Path(cache_dir) / cache_key(model.id, data.fingerprint, chunk_size)
    ensure_folder(folder)
    n = len(data)
    n_chunks = (n + chunk_size - 1) // chunk_size
    manifest = {"version": CACHE_VERSION, "model_id": model.id, "data_fingerprint": data.fingerprint,
                "data_kind": data.kind, "rows": n, "chunk_size": chunk_size, "chunks": n_chunks}
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    source_rows = data.frame["_row"].to_numpy()

    embs, rows, unreadable = [], [], []
    stats = {"images_encoded": 0, "chunks_computed": 0, "chunks_reused": 0, "encode_seconds": 0.0,
             "cache_folder": str(folder)}
    with manual_bar(progress, n > chunk_size, "audit: encode images", total=n) as bar:
        for c in range(n_chunks):
            start, stop = c * chunk_size, min(n, (c + 1) * chunk_size)
            path = _chunk_path(folder, c)
            got = _read_chunk(path) if path.is_file() else None
            if got is not None and len(got[1]) == stop - start:
                emb, ok, reasons = got
                stats["chunks_reused"] += 1
            else:
                t0 = time.perf_counter()
                items = data.fetch([int(r) for r in source_rows[start:stop]])
                result = model.embed(items, batch_size=batch_size, progress=False)
                ok = np.zeros(stop - start, dtype=bool)
                ok[np.asarray(result.keys, dtype=int)] = True
                reasons = {int(k): str(r) for k, r in result.skipped}
                emb = result.embeddings.float().contiguous()
                meta = {"reasons": json.dumps({str(k): v for k, v in reasons.items()}), "start": str(start)}
                write_bytes_atomic(path, st_save({"embeddings": emb, "ok": torch.from_numpy(ok.astype(np.uint8))},
                                                 metadata=meta))
                stats["images_encoded"] += stop - start
                stats["chunks_computed"] += 1
                stats["encode_seconds"] += time.perf_counter() - t0
            idx = np.arange(start, stop)
            embs.append(emb)
            rows.append(idx[ok])
            unreadable += [(int(start + k), r) for k, r in sorted(reasons.items())]
            bar.update(stop - start)
    dim = embs[0].shape[1] if embs and embs[0].ndim == 2 and embs[0].shape[0] else model.embed_dim
    embeddings = torch.cat([e.reshape(-1, dim) for e in embs]) if embs else torch.empty(0, dim)
    return CachedEmbeddings(embeddings, np.concatenate(rows) if rows else np.zeros(0, int), unreadable, folder, stats)
