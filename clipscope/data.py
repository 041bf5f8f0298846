"""Image loading shared by every capability: one place that turns the many ways
users hold images (PIL images, paths, bytes, arrays, folders, ``datasets``
tables) into RGB PIL images, skipping and counting the unreadable ones.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .io import safe_text
from .validate import InvalidArgumentError

#: File suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ImageLike = Union[Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor]


class ImageLoadError(ValueError):
    """An image could not be read. ``skipped`` lists ``(key, reason)`` pairs."""

    def __init__(self, message: str, skipped: Sequence[tuple[Any, str]] = ()):
        super().__init__(message)
        self.skipped = list(skipped)


#: Largest image decoded, in pixels (width x height): Pillow's own warning threshold (about
#: 9459 x 9459). Larger images are refused as possible decompression bombs (a small file that
#: expands to gigabytes). The environment variable ``CLIPSCOPE_MAX_IMAGE_PIXELS`` overrides it.
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_PIXELS_ENV = "CLIPSCOPE_MAX_IMAGE_PIXELS"
#: The EXIF tag that says how an image is rotated or mirrored (1 = upright).
ORIENTATION_TAG = 0x0112


def max_image_pixels() -> int | None:
    """The pixel limit in force: ``$CLIPSCOPE_MAX_IMAGE_PIXELS`` if set (a positive integer, or
    ``none`` for no limit of ours), else :data:`MAX_IMAGE_PIXELS`; ``None`` means no limit.

    Pillow's own check still applies on top: it refuses images above twice ``PIL.Image.MAX_IMAGE_PIXELS``
    (and warns above it); to decode larger images raise that too. Pillow's settings are never changed here.
    """
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None:
        return MAX_IMAGE_PIXELS
    if value.strip().lower() == "none":
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise InvalidArgumentError(MAX_IMAGE_PIXELS_ENV, value, "a positive integer number of pixels, or 'none'")
    return limit


def load_image(item: ImageLike) -> Image.Image | torch.Tensor:
    """Return ``item`` as an RGB PIL image, or as a ``(3, H, W)`` tensor if it already is one.

    Accepts a PIL image (any mode), a file path, encoded image bytes or an open binary file, an
    ``(H, W)`` / ``(H, W, 1|3|4)`` array of any integer, float or bool dtype, or a ``datasets``
    image dict (``{"bytes": ..., "path": ...}``). The decoding policy, the same for every input:

    - any failure to read or decode (a missing file, a dangling symlink or symlink loop, a file
      that is not an image whatever its suffix, a truncated file, also in an already-open PIL
      image, any exception from Pillow or its plugins) raises :class:`ImageLoadError` naming the
      item and the cause, so data sets skip and count it;
    - images above :func:`max_image_pixels` pixels (decompression bombs) are refused before
      decoding; the limit applies to every input, PIL images and arrays included;
    - the EXIF orientation is applied (``ImageOps.exif_transpose``): the model sees what image
      viewers show; an unreadable EXIF block is ignored;
    - alpha is composited on white;
    - 16-bit, 32-bit integer and float images (PIL modes ``I;16``, ``I``, ``F``; arrays of those
      dtypes) are scaled to 8 bits by their own range: the image's minimum becomes 0 and its
      maximum 255, linearly, over all channels together (not clipped to 0..255; a constant
      image becomes 0; NaN counts as the minimum, infinities as the extremes). ``uint8`` is used as is,
      ``bool`` as 0 / 255.
    """
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageLoadError(f"a tensor image must be (3, H, W); got shape {tuple(item.shape)}")
        return item
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        if item.get("bytes"):
            return load_image(item["bytes"])
        return load_image(item["path"])
    if hasattr(item, "read") and not isinstance(item, (str, os.PathLike)):  # an open binary file
        try:
            item = item.read()
        except Exception as exc:  # closed, unreadable, or a text-mode file
            raise ImageLoadError(f"cannot read the open file {getattr(item, 'name', '')!r}: {exc}") from None
        if not isinstance(item, (bytes, bytearray)):
            raise ImageLoadError(f"an open file must be in binary mode ('rb'); reading gave {type(item).__name__}")
    if isinstance(item, Image.Image):
        return _decode(lambda: item, "PIL image", owned=False)
    if isinstance(item, (bytes, bytearray)):
        return _decode(lambda: Image.open(io.BytesIO(item)), "image bytes")
    if isinstance(item, np.ndarray):
        return _decode(lambda: Image.fromarray(_array_to_8bit(item)), "array image")
    if isinstance(item, (str, os.PathLike)):
        what = f"image {display_path(item)!r}"
        problem = image_file_problem(item)
        if problem is not None:
            raise ImageLoadError(f"cannot read {what}: {problem}")
        return _decode(lambda: Image.open(item), what)
    raise ImageLoadError(
        f"unsupported image type {type(item).__name__}; expected PIL image, path, bytes, array or (3,H,W) tensor"
    )


def _decode(open_image: Callable[[], Image.Image], what: str, owned: bool = True) -> Image.Image:
    """Open, check, decode and convert one image under the policy of :func:`load_image`.

    ``what`` names the item in the error; an ``owned`` image (opened here) is closed afterwards.
    """
    limit = max_image_pixels()  # a bad setting is the caller's error, not this image's
    try:
        im = open_image()
        try:
            _check_pixels(im.size, limit)
            im.load()
            return _to_rgb(_exif_transposed(im))
        finally:
            if owned:
                im.close()
    except (ImageLoadError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read {what}: {exc}") from None
    except Exception as exc:  # any failure of Pillow or a plugin is this item's problem, never the run's
        raise ImageLoadError(f"cannot read {what}: {type(exc).__name__}: {exc}") from None


def _check_pixels(size: tuple[int, int], limit: int | None) -> None:
    if size[0] < 1 or size[1] < 1:
        raise ImageLoadError(f"the image is {size[0]} x {size[1]} pixels: it has no pixels")
    if limit is not None and size[0] * size[1] > limit:
        raise ImageLoadError(f"{size[0]} x {size[1]} = {size[0] * size[1]} pixels is above the limit of {limit} "
                             f"(a decompression bomb? set {MAX_IMAGE_PIXELS_ENV} to allow more)")


def _exif_transposed(im: Image.Image) -> Image.Image:
    try:
        if im.getexif().get(ORIENTATION_TAG, 1) == 1:  # upright: no copy
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: there is no orientation to apply, as in image viewers
        return im


def _array_to_8bit(a: np.ndarray) -> np.ndarray:
    """``a`` as a ``uint8`` ``(H, W)`` / ``(H, W, 3|4)`` array, scaled by its range as :func:`load_image` says."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageLoadError(f"must be (H, W) or (H, W, 1|3|4); got shape {a.shape}")
    if a.size == 0:
        raise ImageLoadError(f"has no pixels (shape {a.shape})")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageLoadError(f"must have an integer, float or bool dtype; got {a.dtype}")
    return scale_to_8bit(a)


def scale_to_8bit(a: np.ndarray) -> np.ndarray:
    """Return ``a`` (any real dtype) as ``uint8``: its finite minimum maps to 0 and its maximum to 255.

    NaN maps to 0, +inf to 255, -inf to 0; a constant array maps to 0. Raises :class:`ImageLoadError`
    if no value is finite.
    """
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        raise ImageLoadError("has no finite pixel value")
    lo, hi = a[finite].min(), a[finite].max()
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = Image.fromarray(scale_to_8bit(np.asarray(im)))
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


#: The reason :func:`image_file_problem` gives for a path where nothing exists.
NO_SUCH_FILE = "no such file"


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an image file, or ``None`` if it is a regular file (after links).

    Reasons: :data:`NO_SUCH_FILE`, ``"dangling symlink"``, ``"symlink loop"``, ``"not a regular file"``
    (a folder, FIFO or device: opening one could block), ``"invalid file name (NUL byte)"`` or the
    operating system's message. Only ``stat`` is called; nothing is opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(path) else NO_SUCH_FILE
    except ValueError:
        return "invalid file name (NUL byte)"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else f"cannot access it ({exc.strerror})"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as printable text for tables, reports and messages: bytes that are not UTF-8
    (surrogate escapes in Python's file names) appear as ``\\xNN``; every other name is unchanged."""
    return safe_text(os.fsdecode(path))


#: The reason (prefix) given for a data-set entry whose file would lie outside the data set's folder.
OUTSIDE_DATA_SET = "outside the data set"


class DataPathError(ValueError):
    """A file name taken from a data set's table cannot be used. ``reason`` is the short text data
    set loaders list with the skipped entry (for escapes it starts with :data:`OUTSIDE_DATA_SET`)."""

    def __init__(self, root: str | os.PathLike, name: Any, reason: str):
        self.root, self.name, self.reason = root, name, reason
        shown = display_path(name) if isinstance(name, (str, bytes, os.PathLike)) else repr(name)
        super().__init__(f"file name {shown!r} in the data set at {display_path(root)!r} is refused: {reason}")


def resolve_inside(root: str | os.PathLike, name: Any) -> Path:
    """Return the real path (symlinks resolved) of the file ``name``, a relative name taken from a
    data set's table (a ``file_name`` column, an annotation key), inside the data set's folder ``root``.

    Raises :class:`DataPathError` when the entry would lie outside ``root``: an absolute name, a
    ``..`` component, or a symlink (the file or a folder on the way) leading out of ``root``; also
    for a missing name (empty, ``None``, NaN) or one with a NUL byte. Nothing is opened, so a
    refused file is never read; the file need not exist (check it with :func:`image_file_problem`).
    """
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name).strip():
        raise DataPathError(root, name, "missing file name")
    text = os.fspath(name)
    if "\0" in text:
        raise DataPathError(root, name, "invalid file name (NUL byte)")
    pure = PurePath(text)
    if pure.is_absolute() or pure.anchor:
        raise DataPathError(root, name, f"{OUTSIDE_DATA_SET}: an absolute path")
    if ".." in pure.parts:
        raise DataPathError(root, name, f"{OUTSIDE_DATA_SET}: a '..' component")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, text))
    if os.path.commonpath([real_root, real]) != real_root:
        raise DataPathError(root, name, f"{OUTSIDE_DATA_SET}: a symlink leads to {display_path(real)!r}")
    return Path(real)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Return the image files under ``folder`` (recursively, by suffix: :data:`IMAGE_SUFFIXES`), sorted by path.

    Entries with an image suffix that cannot be read (dangling symlinks, symlink loops, FIFOs)
    are listed too, so that readers report them as skipped (:func:`load_image` names the reason)
    rather than dropping them silently. Symlinked folders are not descended into.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {display_path(root)!r}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


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
            yield str(path), load_image_or_error(path)
        return
    if isinstance(source, (Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor)) or hasattr(source, "read"):
        yield 0, load_image_or_error(source)
        return
    if hasattr(source, "features") and hasattr(source, "__iter__"):
        column = _image_column(source)
        for i, row in enumerate(source):
            yield i, load_image_or_error(row[column])
        return
    if isinstance(source, Iterable):
        for i, item in enumerate(source):
            yield i, load_image_or_error(item)
        return
    raise TypeError(f"cannot read images from a {type(source).__name__}")


def load_image_or_error(item: Any) -> Image.Image | torch.Tensor | ImageLoadError:
    """Return :func:`load_image` of ``item``, or the :class:`ImageLoadError` it raised (for skip-and-report loops)."""
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
            add("path", os.path.realpath(p), st and (st.st_size, st.st_mtime_ns))
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
    the item ``keys[i]``, at position ``positions[i]`` in the source (in a folder: in its sorted
    file list). ``skipped`` lists ``(key, reason)`` for unreadable items.
    """

    embeddings: torch.Tensor
    keys: list[Any]
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

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
