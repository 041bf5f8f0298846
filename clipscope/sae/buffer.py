"""Activation rows streamed from a model, and the resumable on-disk buffer that holds them for many epochs.

A *row* is one feature vector of a site: a conv site's channel vector at one spatial position, a tokens
site's vector at one token (which tokens: ``"all"``, ``"patches"`` or ``"class"``), a vector site's
vector. :func:`stream_rows` runs the model over an image source one batch at a time and yields each
batch's rows; nothing but the current batch is held.

:class:`ActivationBuffer` writes those rows to disk as safetensors shards, each shard the rows of
``images_per_shard`` consecutive source items, each written atomically. The folder is keyed by
(model id, data fingerprint, site, tokens, images per shard); an interrupted buffering resumes at the first
missing shard, and a complete buffer (its ``buffer.json`` written last) is reused as it is. Each epoch
reads the shards in a seeded random order and :func:`shuffled_batches` mixes their rows in a pool of
bounded size, so the full activation set is never in memory.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipscope.data import ImageLoadError, iter_images, list_image_files, prefetch, source_fingerprint
from clipscope.hooks import feature_last
from clipscope.io import write_bytes_atomic, write_text_atomic
from clipscope.sae.autoencoder import TOKENS
from clipscope.validate import InvalidArgumentError, check_choice

__all__ = ["ActivationBuffer", "RowBatch", "check_site", "shuffled_batches", "site_rows", "stream_rows"]

BUFFER_VERSION = 1
MANIFEST = "buffer.json"


def check_site(model, site: str, tokens: str) -> int:
    """Check that ``site`` is an image-tower conv / tokens / vector site and ``tokens`` suits it; returns its
    number of units (the rows' width). Raises :class:`InvalidArgumentError` naming the parameter."""
    info = model.site(site)
    if info.tower != "visual" or info.layout not in ("conv", "tokens", "vector"):
        raise InvalidArgumentError("site", site, "an image-tower site with layout conv, tokens or vector "
                                                 f"(this one is a {info.tower} {info.layout} site)")
    check_choice("tokens", tokens, TOKENS)
    if tokens != "all" and info.layout != "tokens":
        raise InvalidArgumentError("tokens", tokens, f"'all' for a {info.layout} site (token choice is for "
                                                     "tokens sites)")
    if tokens != "all" and not model.prefix_tokens:
        raise InvalidArgumentError("tokens", tokens, "'all': this image tower has no class token")
    return info.n_units


def site_rows(acts: torch.Tensor, layout: str, tokens: str = "all", prefix: int = 0) -> torch.Tensor:
    """``(n_rows, n_units)`` rows of a batch of canonical activations: conv ``(B, C, H, W)`` -> ``B*H*W`` rows
    (row-major over batch, y, x); tokens ``(B, L, D)`` -> ``B*L`` rows (``"all"``), ``B*(L - prefix)``
    (``"patches"``) or ``B`` (``"class"``); vector ``(B, D)`` -> ``B`` rows."""
    view = feature_last(acts, layout)
    if layout == "tokens" and tokens == "patches":
        view = view[:, prefix:]
    elif layout == "tokens" and tokens == "class":
        view = view[:, 0]
    return view.reshape(-1, view.shape[-1])


@dataclass
class RowBatch:
    """The rows of one batch of images: ``rows`` ``(n, d)`` on the model's device (``None`` if every image
    was unreadable), ``consumed`` source items accounted for so far, ``skipped`` ``[(key, reason)]``."""

    rows: torch.Tensor | None
    consumed: int
    skipped: list[tuple[Any, str]]


def _items_from(source: Any, start: int) -> Iterator[tuple[Any, Any]]:
    """``(key, image_or_error)`` for the items of ``source`` from position ``start`` on (keys as
    :func:`iter_images` gives them from the start)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = [str(p) for p in list_image_files(source)]
        for key, item in iter_images(source[start:]):
            yield source[start + key], item
        return
    if isinstance(source, (list, tuple)) or (isinstance(source, torch.Tensor) and source.ndim == 4):
        for key, item in iter_images(source[start:]):
            yield key + start, item
        return
    yield from itertools.islice(iter_images(source), start, None)


def _image_batches(model, items: Iterator[tuple[Any, Any]], consumed: int, batch_size: int):
    """``(images (B, 3, H, W) | None, consumed, skipped)`` batches of ``items``; ``consumed`` counts source
    items from the position of the first item on."""
    size = tuple(model.image_size)
    batch, skipped = [], []
    for key, item in items:
        consumed += 1
        if isinstance(item, ImageLoadError):
            skipped.append((key, str(item)))
            continue
        tensor = item if isinstance(item, torch.Tensor) else model.preprocess(item)
        if tuple(tensor.shape[-2:]) != size:
            skipped.append((key, f"tensor image of size {tuple(tensor.shape[-2:])}; the model takes {size}"))
            continue
        batch.append(tensor)
        if len(batch) == batch_size:
            yield torch.stack(batch), consumed, skipped
            batch, skipped = [], []
    if batch or skipped:
        yield (torch.stack(batch) if batch else None), consumed, skipped


def _rows_of(model, items: Iterator[tuple[Any, Any]], site: str, tokens: str, image_batch_size: int,
             start: int) -> Iterator[RowBatch]:
    info = model.site(site)
    for x, consumed, skipped in prefetch(_image_batches(model, items, start, image_batch_size)):
        rows = None
        if x is not None:
            with torch.no_grad():   # not around the yield: the caller's grad mode must stay its own
                acts = model.activations(x, [site])[site]
            rows = site_rows(acts, info.layout, tokens, model.prefix_tokens).float()
        yield RowBatch(rows, consumed, skipped)


def stream_rows(model, source: Any, site: str, *, tokens: str = "all", image_batch_size: int = 64,
                start: int = 0) -> Iterator[RowBatch]:
    """Run ``model`` over the items of ``source`` from position ``start`` on, one batch of ``image_batch_size``
    images at a time, and yield each batch's rows of ``site`` (:func:`site_rows`) as a :class:`RowBatch`.

    The tower runs only as far as ``site``; images load in a background thread. Unreadable items are
    skipped and listed in the :class:`RowBatch` that accounts for them.
    """
    return _rows_of(model, _items_from(source, start), site, tokens, image_batch_size, start)


def shuffled_batches(chunks: Iterable[torch.Tensor], batch_size: int, pool_rows: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of ``batch_size`` rows from ``chunks`` of rows, mixed in a pool of about ``pool_rows`` rows.

    Chunks are gathered until the pool holds ``pool_rows`` rows; the pool is permuted with ``generator``
    and its full batches emitted, the remainder carried into the next pool. The last batch may be short.
    Every row is emitted exactly once; the order is a function of the chunks and the generator's state.
    """
    pool: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        pool.append(chunk)
        held += chunk.shape[0]
        if held >= pool_rows:
            rows = torch.cat(pool)
            rows = rows[torch.randperm(rows.shape[0], generator=generator).to(rows.device)]
            full = rows.shape[0] - rows.shape[0] % batch_size
            yield from rows[:full].split(batch_size)
            pool, held = [rows[full:]], rows.shape[0] - full
    if held:
        rows = torch.cat(pool)
        rows = rows[torch.randperm(rows.shape[0], generator=generator).to(rows.device)]
        yield from rows.split(batch_size)


class ActivationBuffer:
    """The on-disk rows of one (model, data set, site, tokens): shards ``shard_NNNNN.safetensors`` and, once
    complete, ``buffer.json``. Build it with :meth:`open`; fill it with :meth:`fill`."""

    def __init__(self, folder: Path, images_per_shard: int):
        self.folder = folder
        self.images_per_shard = images_per_shard

    @classmethod
    def open(cls, model, source: Any, site: str, *, tokens: str, buffer_dir: str | os.PathLike,
             images_per_shard: int, fingerprint: str | None = None) -> "ActivationBuffer":
        """The buffer of ``site`` over ``source`` under ``buffer_dir`` (its sub-folder is a hash of the model id,
        the data fingerprint, the site, ``tokens`` and ``images_per_shard``). Streams need ``fingerprint``; refused
        while an edit is in force (:attr:`clipscope.ClipModel.edits_in_force`)."""
        if getattr(model, "edits_in_force", False):
            raise InvalidArgumentError("buffer_dir", str(buffer_dir), "None while model.ablate / edit / steer is in "
                                       "force: the model id does not describe the edit, so its rows would be reused "
                                       "for the plain model")
        fingerprint = fingerprint or source_fingerprint(source)
        if fingerprint is None:
            raise InvalidArgumentError("fingerprint", None, "a string naming the data set: this source is a stream "
                                                            "that cannot be fingerprinted without reading it")
        raw = json.dumps([BUFFER_VERSION, model.id, fingerprint, site, tokens, images_per_shard])
        return cls(Path(buffer_dir) / f"sae-rows-{hashlib.sha256(raw.encode()).hexdigest()[:24]}", images_per_shard)

    def shard_path(self, index: int) -> Path:
        """Where shard ``index`` (source items ``index * images_per_shard`` on) is stored."""
        return self.folder / f"shard_{index:05d}.safetensors"

    def manifest(self) -> dict | None:
        """The completed buffer's description (shards, rows, skipped items), or ``None`` while incomplete."""
        path = self.folder / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return manifest if manifest.get("version") == BUFFER_VERSION else None

    def shards_written(self) -> int:
        """How many shards from 0 on are on disk: buffering resumes at this index."""
        return next(i for i in itertools.count() if not self.shard_path(i).is_file())

    def fill(self, model, source: Any, site: str, *, tokens: str, image_batch_size: int,
             on_shard: Callable[[int], None] | None = None, bar=None) -> dict:
        """Write every missing shard, then ``buffer.json``; returns the manifest. A complete buffer is returned
        as it is. ``on_shard(index)`` is called after each shard is written; ``bar`` (a manual progress bar)
        advances by the source items of each shard."""
        done = self.manifest()
        if done is not None:
            return done
        index = self.shards_written()
        items = _items_from(source, index * self.images_per_shard)
        while True:
            start = index * self.images_per_shard
            rows, skipped, consumed = [], [], start
            for batch in _rows_of(model, itertools.islice(items, self.images_per_shard), site, tokens,
                                  image_batch_size, start):
                if batch.rows is not None:
                    rows.append(batch.rows.cpu())
                skipped.extend(batch.skipped)
                consumed = batch.consumed
            if consumed == start and index > 0:
                break   # the source is exhausted
            self._write_shard(index, rows, skipped, consumed - start, model.site(site).n_units)
            if bar is not None:
                bar.update(consumed - start)
            if on_shard is not None:
                on_shard(index)
            index += 1
            if consumed - start < self.images_per_shard:
                break
        return self._finish(index)

    def _write_shard(self, index: int, rows: list[torch.Tensor], skipped: list, items: int, width: int) -> None:
        from safetensors.torch import save as safetensors_bytes
        tensor = torch.cat(rows) if rows else torch.empty(0, width)
        meta = {"items": str(items), "skipped": json.dumps([[str(k), r] for k, r in skipped])}
        write_bytes_atomic(self.shard_path(index), safetensors_bytes({"rows": tensor.contiguous()}, metadata=meta))

    def _finish(self, n_shards: int) -> dict:
        from safetensors import safe_open
        n_rows, n_items, skipped = 0, 0, []
        for i in range(n_shards):
            with safe_open(str(self.shard_path(i)), framework="pt") as handle:
                meta = handle.metadata()
                n_rows += handle.get_slice("rows").get_shape()[0]
            n_items += int(meta["items"])
            skipped.extend(json.loads(meta["skipped"]))
        manifest = {"version": BUFFER_VERSION, "n_shards": n_shards, "n_rows": n_rows, "n_items": n_items,
                    "images_per_shard": self.images_per_shard, "skipped": skipped}
        write_text_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest

    def read_shard(self, index: int) -> torch.Tensor:
        """The rows ``(n, d)`` of shard ``index``, float32 on the CPU."""
        from safetensors.torch import load_file
        return load_file(str(self.shard_path(index)))["rows"]

    def epoch_chunks(self, n_shards: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The shards' rows in an order drawn from ``generator`` (one shard in memory at a time)."""
        for index in torch.randperm(n_shards, generator=generator).tolist():
            yield self.read_shard(index)
