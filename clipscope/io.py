"""Atomic file writes: outputs appear whole or not at all, so interrupted runs never leave half files.

Files are created with the permissions of any file the user writes (``0o666`` less the umask), and
every failure (a read-only or full disk, a parent that is a file) raises one :class:`OutputError`
naming the path and the cause, with no temporary file left behind.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


class OutputError(OSError):
    """A file could not be written: the message is ``cannot write PATH: CAUSE``.

    ``path`` is the file that was to be written and ``errno`` / ``strerror`` are those of the
    underlying :class:`OSError` (``errno.ENOSPC`` for a full disk, ``errno.EROFS`` for a read-only one).
    """

    def __init__(self, path: str | os.PathLike, cause: OSError):
        reason = cause.strerror or str(cause)
        where = cause.filename if cause.filename not in (None, os.fspath(path)) else None
        self.message = f"cannot write {safe_text(os.fspath(path))}: {reason}" + (
            f" ({safe_text(os.fspath(where))})" if where is not None else "")
        super().__init__(self.message)
        self.errno, self.strerror, self.path = cause.errno, cause.strerror, Path(path)

    def __str__(self) -> str:
        return self.message


def safe_text(text: str) -> str:
    """``text`` with lone surrogates made visible, so it encodes as UTF-8.

    File names that are not valid UTF-8 reach Python as surrogate escapes (``b"caf\\xe9"`` becomes
    ``"caf\\udce9"``); they are shown as their bytes (``caf\\xe9``), other lone surrogates as
    ``\\udXXX``. Text without surrogates is returned unchanged.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its missing parents if needed; returns it as a Path.

    Raises :class:`OutputError` (``cannot write FOLDER: CAUSE``) when it cannot be created, e.g.
    when a parent is a regular file or the disk is read-only.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, exc) from exc
    return folder


def check_writable(folder: str | os.PathLike) -> Path:
    """Check that ``folder`` can be written, creating nothing that is not there; returns it as a Path.

    An existing folder gets a probe file, created and removed; for a missing one, its nearest
    existing ancestor must be a folder this process may write in. Long jobs call this before their
    expensive part, so that a folder that cannot be written (a parent that is a file, a read-only or
    full disk, no permission) fails in a second with one :class:`OutputError` naming the folder and
    the cause, not after the work, and a job refused later for another reason leaves nothing behind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        ancestor = next(p for p in (folder, *folder.parents) if p.exists())  # '.' or '/' at the latest
        if not ancestor.is_dir():
            raise OutputError(folder, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(ancestor)))
        if not os.access(ancestor, os.W_OK | os.X_OK):
            code = errno.EROFS if _read_only(ancestor) else errno.EACCES
            raise OutputError(folder, OSError(code, os.strerror(code), str(ancestor)))
        return folder
    probe = folder / f".clipscope-write-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(folder, exc) from exc
    return folder


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename; returns the path.

    Missing parent folders are created. Raises :class:`OutputError` if anything fails; then
    ``path`` is unchanged and no temporary file remains.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from exc
        raise
    return path


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new empty file next to ``path`` with mode ``0o666`` less the umask; returns its fd and path."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path.

    Lone surrogates (undecodable file names in a table) are written as their escapes (see
    :func:`safe_text`) rather than failing. Raises :class:`OutputError` like :func:`write_bytes_atomic`.
    """
    return write_bytes_atomic(path, safe_text(text).encode("utf-8"))


def figure_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure, cropped to its content; closes the figure."""
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
