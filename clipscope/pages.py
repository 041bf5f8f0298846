"""HTML report pages and image grids: one look for every report clipscope writes.

The neuron atlas, the typographic attack report, the demo index and the audit report are all
built as ``page(title, body)``: one document shell with the same style sheet (:data:`CSS`), an
escaped title and a footer naming the clipscope version. The body is HTML the caller assembles;
every user-provided string in it goes through :func:`esc`. Images are embedded as ``data:`` URIs
(:func:`image_uri`, :func:`png_uri`), so each page is a single self-contained file; widgets take the
encoded bytes themselves (:func:`image_bytes`).

:func:`image_grid` tiles images into one picture (feature visualizations of a render, the dataset
examples of a unit in the explorer); :func:`fit_square` is the resize every tile and thumbnail uses.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from .validate import check_choice, check_int

__all__ = ["CSS", "esc", "fit_square", "image_bytes", "image_grid", "image_uri", "page", "png_uri"]

#: The style sheet of every report page.
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}
table{border-collapse:collapse;font-size:12px;margin:.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.note{color:#555;font-size:13px}
footer{margin-top:2em;border-top:1px solid #ddd;padding-top:.5em}
img{max-width:100%}
"""

#: The colour of a blank tile or placeholder (light grey).
BLANK = (238, 238, 238)


def esc(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` replaced by HTML entities, safe in text and in quoted attributes."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, heading: bool = True) -> str:
    """A complete HTML document in the shared look; returns it as a string.

    ``title`` (escaped here) is the window title and, with ``heading``, the page's ``<h1>``
    (pass ``heading=False`` when ``body`` starts with its own). ``body`` is inserted as is: it
    is HTML, so the caller escapes user text in it with :func:`esc`.
    """
    from . import __version__
    h1 = f"<h1>{esc(title)}</h1>\n" if heading else ""
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{h1}{body}\n"
            f'<footer class="note">Written by clipscope {esc(__version__)}.</footer>\n</body></html>\n')


def png_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of encoded PNG bytes (e.g. from :func:`clipscope.io.figure_png`)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_bytes(image: Image.Image, size: int | None = None, fmt: str = "PNG") -> bytes:
    """The encoded file bytes of ``image`` as RGB, resized to ``size`` pixels square (:func:`fit_square`)
    when given; ``fmt`` is ``"PNG"`` (lossless) or ``"JPEG"`` (quality 85, for photos)."""
    fmt = check_choice("fmt", fmt, ("PNG", "JPEG"))
    image = fit_square(image, size) if size is not None else image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_uri(image: Image.Image, size: int | None = None, fmt: str = "PNG") -> str:
    """A ``data:`` URI of :func:`image_bytes` (``image`` as RGB, resized to ``size`` pixels square when
    given; ``fmt`` ``"PNG"`` or ``"JPEG"``)."""
    fmt = check_choice("fmt", fmt, ("PNG", "JPEG"))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(image_bytes(image, size, fmt)).decode("ascii")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """``image`` as RGB at ``size`` x ``size`` pixels: enlarged with nearest neighbours (small renders stay
    crisp), shrunk bilinearly, and not resampled at all when it already has that size."""
    size = check_int("size", size, low=1)
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.NEAREST if image.width < size else Image.BILINEAR)


def image_grid(images: Sequence[Image.Image], *, columns: int = 8, tile: int = 128, gap: int = 2) -> Image.Image:
    """The ``images`` tiled ``columns`` per row in reading order, each at ``tile`` pixels square
    (:func:`fit_square`), ``gap`` white pixels apart; returns one RGB image.

    A grid of ``n`` images is ``min(columns, n)`` tiles wide and ``ceil(n / columns)`` high; with no
    images it is one blank grey tile.
    """
    columns = check_int("columns", columns, low=1)
    tile, gap = check_int("tile", tile, low=1), check_int("gap", gap, low=0)
    images = list(images) or [Image.new("RGB", (tile, tile), BLANK)]
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (tile + gap) - gap, rows * (tile + gap) - gap), "white")
    for i, img in enumerate(images):
        grid.paste(fit_square(img, tile), ((i % cols) * (tile + gap), (i // cols) * (tile + gap)))
    return grid
