"""Image loading shared by every capability: one place that turns the many ways
users hold images (PIL images, paths, bytes, arrays, folders, ``datasets``
tables) into RGB PIL images, skipping and counting the unreadable ones.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: File suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ImageLike = Union[Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor]


class ImageLoadError(ValueError):
    """An image could not be read. ``skipped`` lists ``(key, reason)`` pairs."""

    def __init__(self, message: str, skipped: Sequence[tuple[Any, str]] = ()):
        super().__init__(message)
        self.skipped = list(skipped)


def load_image(item: ImageLike) -> Image.Image | torch.Tensor:
    """Return ``item`` as an RGB PIL image, or as a ``(3, H, W)`` tensor if it already is one.

    Accepts a PIL image (any mode: greyscale, RGBA, CMYK, palette), a file path,
    encoded image bytes or an open binary file, an ``(H, W)`` / ``(H, W, C)`` uint8 array, or a
    ``datasets`` image dict (``{"bytes": ..., "path": ...}``).
    Raises :class:`ImageLoadError` naming the problem.
    """
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageLoadError(f"a tensor image must be (3, H, W); got shape {tuple(item.shape)}")
        return item
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        if item.get("bytes"):
            return load_image(item["bytes"])
        return load_image(item["path"])
    if hasattr(item, "read") and not isinstance(item, (str, os.PathLike)):  # an open binary file
        item = item.read()
    if isinstance(item, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(item)) as im:
                im.load()
                return _to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"bytes are not a decodable image ({exc})") from None
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise ImageLoadError(f"an array image must be uint8 (H, W) or (H, W, C); got {item.dtype} {item.shape}")
        return _to_rgb(Image.fromarray(item))
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageLoadError(f"no such image file: {str(path)!r}")
        try:
            with Image.open(path) as im:
                im.load()
                return _to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageLoadError(f"cannot read image {str(path)!r} ({exc})") from None
    raise ImageLoadError(
        f"unsupported image type {type(item).__name__}; expected PIL image, path, bytes, uint8 array or (3,H,W) tensor"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Return the image files under ``folder`` (recursively), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {str(root)!r}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image_column(dataset: Any) -> str:
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image":
            return name
    for name in ("image", "img", "file", "path"):
        if name in features:
            return name
    raise ValueError(f"cannot find an image column in the data set; columns: {list(features)}")


def iter_images(source: Any) -> Iterator[tuple[Any, Image.Image | torch.Tensor | ImageLoadError]]:
    """Yield ``(key, image_or_error)`` for every item of ``source``, never raising for one bad item.

    ``source`` may be a single image-like item, a folder path, a sequence of
    image-like items, a ``(N, 3, H, W)`` tensor, or a ``datasets.Dataset`` /
    ``IterableDataset`` (its image column is found from the features). The key is
    the item's position, or its path for folders.
    """
    if isinstance(source, torch.Tensor) and source.ndim == 4:
        for i in range(source.shape[0]):
            yield i, source[i]
        return
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        for path in list_image_files(source):
            yield str(path), _load_or_error(path)
        return
    if isinstance(source, (Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor)) or hasattr(source, "read"):
        yield 0, _load_or_error(source)
        return
    if hasattr(source, "features") and hasattr(source, "__iter__"):
        column = _image_column(source)
        for i, row in enumerate(source):
            yield i, _load_or_error(row[column])
        return
    if isinstance(source, Iterable):
        for i, item in enumerate(source):
            yield i, _load_or_error(item)
        return
    raise TypeError(f"cannot read images from a {type(source).__name__}")


def _load_or_error(item: Any) -> Image.Image | torch.Tensor | ImageLoadError:
    try:
        return load_image(item)
    except ImageLoadError as exc:
        return exc


def source_length(source: Any) -> int | None:
    """Return the number of images ``source`` holds, or ``None`` when unknown (streams)."""
    if isinstance(source, torch.Tensor):
        return source.shape[0] if source.ndim == 4 else 1
    if isinstance(source, (Image.Image, bytes, np.ndarray)) or hasattr(source, "read"):
        return 1
    if isinstance(source, (str, os.PathLike)):
        return len(list_image_files(source)) if Path(source).is_dir() else 1
    try:
        return len(source)
    except TypeError:
        return None


def source_fingerprint(source: Any) -> str | None:
    """A hash identifying the images of ``source``, or ``None`` where it cannot be known without consuming it.

    Folders and paths hash the paths with their sizes and modification times; in-memory images
    (PIL, arrays, bytes, tensors) hash their pixels; ``datasets.Dataset`` tables use their own
    fingerprint and length. Streams (generators, ``IterableDataset``) have none: callers that
    cache results need a fingerprint from the user for them (e.g. ``dataset_examples(fingerprint=...)``).
    """
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(p if isinstance(p, bytes) else repr(p).encode())
            h.update(b"\0")

    def item_digest(item: Any) -> bool:
        if isinstance(item, Image.Image):
            add("pil", item.mode, item.size, hashlib.sha256(item.tobytes()).digest())
        elif isinstance(item, (str, os.PathLike)):
            p = Path(item)
            st = p.stat() if p.is_file() else None
            add("path", str(p.resolve()), st and (st.st_size, st.st_mtime_ns))
        elif isinstance(item, (bytes, bytearray)):
            add("bytes", hashlib.sha256(bytes(item)).digest())
        elif isinstance(item, np.ndarray):
            add("array", item.dtype.str, item.shape, hashlib.sha256(np.ascontiguousarray(item).tobytes()).digest())
        elif isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            add("tensor", str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()
                                                                        if t.numel() else b"").digest())
        elif isinstance(item, dict) and ("bytes" in item or "path" in item):
            return item_digest(item.get("bytes") or item.get("path"))
        else:
            return False
        return True

    if isinstance(source, torch.Tensor):
        item_digest(source)
        return h.hexdigest()
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = list_image_files(source)
        add("folder", str(Path(source).resolve()), len(files))
        for f in files:
            item_digest(f)
        return h.hexdigest()
    if hasattr(source, "features") and hasattr(source, "__iter__"):
        fp = getattr(source, "_fingerprint", None)
        if fp is None or not hasattr(source, "__len__"):
            return None
        add("datasets", fp, len(source))
        return h.hexdigest()
    if item_digest(source):
        return h.hexdigest()
    if isinstance(source, (list, tuple)):
        add("sequence", len(source))
        for i in range(len(source)):
            if not item_digest(list.__getitem__(source, i) if isinstance(source, list) else source[i]):
                return None
        return h.hexdigest()
    return None


@dataclass
class EmbeddedImages:
    """Image embeddings of a data set, with what had to be skipped.

    ``embeddings`` is a float32 CPU tensor ``(n_ok, dim)``; row ``i`` belongs to
    the item ``keys[i]``. ``skipped`` lists ``(key, reason)`` for unreadable items.
    """

    embeddings: torch.Tensor
    keys: list[Any]
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.keys)


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    """Yield lists of ``size`` consecutive items (the last may be shorter)."""
    batch: list = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Failure:
    error: BaseException


def prefetch(iterable: Iterable, depth: int = 2) -> Iterator:
    """Run ``iterable`` in a background thread, ``depth`` items ahead of the consumer.

    Used to overlap CPU work (image decoding, text rendering) with model forward
    passes. Exceptions in the producer are re-raised in the consumer.
    """
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(_Failure(exc))
            return
        items.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def default_workers() -> int:
    """Threads for CPU-side image work (rendering, decoding): the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def ordered_map(fn: Callable[[Any], Any], iterable: Iterable, workers: int, window: int | None = None) -> Iterator:
    """Yield ``fn(item)`` for each item of ``iterable``, in order, computed by ``workers`` threads.

    ``iterable`` is consumed in the calling thread, at most ``window`` items (default
    ``2 * workers``) ahead of what has been yielded, so memory stays bounded on long streams.
    Pays off for work that releases the GIL (Pillow's drawing, resizing and decoding);
    ``workers <= 1`` runs ``fn`` inline. An exception in ``fn`` is raised at its item.
    """
    if workers <= 1:
        for item in iterable:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    window = max(1, window or 2 * workers)
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="clipscope") as pool:
        try:
            for item in iterable:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
