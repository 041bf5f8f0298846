"""Rendering text onto images, with every parameter of a typographic attack under control.

:func:`render_text` draws text in any TrueType font, at an absolute size or as a
fraction of the image's shorter side, in any colour and opacity, over an
optional background box, at a named anchor, fixed coordinates, a seeded random
place or one of 8 fixed positions, rotated and repeated. It reports the **pixel
cover**: the fraction of pixels whose value changed.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

Colour = Union[str, tuple[int, int, int]]
Position = Union[str, tuple[float, float]]

#: Named anchors, as (x, y) fractions of the image.
ANCHORS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "top": (0.5, 0.15), "bottom": (0.5, 0.85), "left": (0.2, 0.5), "right": (0.8, 0.5),
    "top-left": (0.2, 0.15), "top-right": (0.8, 0.15), "bottom-left": (0.2, 0.85), "bottom-right": (0.8, 0.85),
}

#: The 8 fixed positions: the cells of a 3x3 grid around the centre, clockwise from the top left.
#: ``"fixed8:k"`` names the k-th (our scheme for automated attacks that stamp text at fixed places).
FIXED8: tuple[tuple[float, float], ...] = ((1 / 6, 1 / 6), (0.5, 1 / 6), (5 / 6, 1 / 6), (5 / 6, 0.5),
                                          (5 / 6, 5 / 6), (0.5, 5 / 6), (1 / 6, 5 / 6), (1 / 6, 0.5))


def default_font() -> str:
    """Path of DejaVu Sans Bold, which ships with matplotlib."""
    import matplotlib
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf")


_fonts = threading.local()


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """The font at ``path`` and ``size`` in pixels, cached per thread (at most 64 per thread): a FreeType
    face must not be used by two threads at once, and attacks are rendered by several."""
    cache = _fonts.__dict__.setdefault("cache", {})
    key = (path, size)
    if key not in cache:
        try:
            font = ImageFont.truetype(path, size)
        except OSError:
            raise ValueError(f"cannot read the font {path!r} (give the path of a TrueType/OpenType file)") from None
        if len(cache) >= 64:
            cache.pop(next(iter(cache)))
        cache[key] = font
    return cache[key]


def _rgb(colour: Colour) -> tuple[int, int, int]:
    if isinstance(colour, str):
        try:
            return ImageColor.getrgb(colour)[:3]
        except ValueError:
            raise ValueError(f"unknown colour {colour!r}; use a name ('white'), '#rrggbb' or an (r, g, b) tuple") from None
    r, g, b = colour
    return int(r), int(g), int(b)


@dataclass(frozen=True)
class TextStyle:
    """How text looks. ``size`` below 1 is a fraction of the image's shorter side, otherwise pixels.

    ``box`` is the background box colour (``None`` for none), with ``box_opacity``
    and ``padding`` (a fraction of the font size). ``opacity`` scales text and box.
    ``rotation`` is in degrees, counter-clockwise. ``repeat`` draws that many
    copies: the first at the requested position, the others at seeded random places.
    With ``fit`` (the default) the font shrinks until the text is at most 95% of the
    image width, so long words are not cut off at the edge.
    """

    font: str = field(default_factory=default_font)
    size: float = 0.18
    colour: Colour = "black"
    box: Colour | None = "white"
    box_opacity: float = 1.0
    padding: float = 0.25
    opacity: float = 1.0
    rotation: float = 0.0
    repeat: int = 1
    fit: bool = True

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be > 0 (fraction < 1 or pixels >= 1); got {self.size}")
        for name in ("opacity", "box_opacity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1; got {self.repeat}")
        _rgb(self.colour)
        if self.box is not None:
            _rgb(self.box)

    def replace(self, **changes) -> "TextStyle":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def font_px(self, image_size: tuple[int, int]) -> int:
        """The font size in pixels for an image of ``(width, height)``."""
        px = self.size * min(image_size) if self.size < 1 else self.size
        return max(1, int(round(px)))


@dataclass
class Rendered:
    """An image with text on it. ``cover`` is the fraction of pixels changed (0..1);
    ``boxes`` are the ``(left, top, right, bottom)`` pixel boxes of the pasted copies."""

    image: Image.Image
    text: str
    cover: float
    boxes: list[tuple[int, int, int, int]]


def resolve_position(position: Position, size: tuple[int, int], rng: random.Random) -> tuple[float, float]:
    """Return the centre point in pixels for ``position`` on an image of ``(width, height)``.

    ``position`` is an anchor name (:data:`ANCHORS`), ``"random"``, ``"fixed8:k"``
    (k in 0..7), an ``(x, y)`` pair of fractions (both <= 1) or of pixels.
    """
    w, h = size
    if isinstance(position, str):
        if position in ANCHORS:
            fx, fy = ANCHORS[position]
        elif position == "random":
            fx, fy = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)
        elif position.startswith("fixed8:") and position[7:].isdigit() and int(position[7:]) < 8:
            fx, fy = FIXED8[int(position[7:])]
        else:
            raise ValueError(f"unknown position {position!r}; valid: {sorted(ANCHORS)}, 'random', "
                             "'fixed8:0'..'fixed8:7', or an (x, y) pair")
        return fx * w, fy * h
    x, y = position
    if 0 <= x <= 1 and 0 <= y <= 1 and isinstance(x, float) and isinstance(y, float):
        return x * w, y * h
    return float(x), float(y)


def _text_layer(text: str, style: TextStyle, font_px: int) -> Image.Image:
    font = _font(style.font, font_px)
    left, top, right, bottom = font.getbbox(text)
    pad = int(round(style.padding * font_px)) if style.box is not None else 0
    layer = Image.new("RGBA", (max(1, right - left + 2 * pad), max(1, bottom - top + 2 * pad)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if style.box is not None:
        draw.rectangle([0, 0, layer.width - 1, layer.height - 1],
                       fill=(*_rgb(style.box), int(round(255 * style.box_opacity * style.opacity))))
    text_alpha = int(round(255 * style.opacity))
    if style.box is not None and style.box_opacity > 0:
        # text on a box: draw into the box (the text replaces the box colour where it is opaque)
        ink = Image.new("RGBA", layer.size, (0, 0, 0, 0))
        ImageDraw.Draw(ink).text((pad - left, pad - top), text, font=font, fill=(*_rgb(style.colour), text_alpha))
        layer = Image.alpha_composite(layer, ink)
    else:
        draw.text((pad - left, pad - top), text, font=font, fill=(*_rgb(style.colour), text_alpha))
    if style.rotation:
        layer = layer.rotate(style.rotation, resample=Image.BICUBIC, expand=True)
    return layer


def render_text(image: Image.Image, text: str, style: TextStyle | None = None, position: Position = "center",
                seed: int = 0) -> Rendered:
    """Draw ``text`` on a copy of ``image`` and return a :class:`Rendered`.

    Works for any PIL mode and size; the result has the input's mode (palette
    images come back as RGB). Deterministic given ``seed`` (which only matters for
    ``"random"`` positions and repeats). Copies are kept inside the image when
    they fit.
    """
    if not text:
        raise ValueError("text must be a non-empty string")
    style = style or TextStyle()
    mode = image.mode
    base = image.convert("RGB") if mode not in ("RGB", "RGBA") else image
    canvas = base.convert("RGBA")
    rng = random.Random(seed)
    font_px = style.font_px(canvas.size)
    layer = _text_layer(text, style, font_px)
    while style.fit and font_px > 1 and layer.width > 0.95 * canvas.width:
        font_px = max(1, int(font_px * min(0.95 * canvas.width / layer.width, 0.95)))
        layer = _text_layer(text, style, font_px)
    boxes = []
    for i in range(style.repeat):
        cx, cy = resolve_position(position if i == 0 else "random", canvas.size, rng)
        left = int(round(cx - layer.width / 2))
        top = int(round(cy - layer.height / 2))
        left = min(max(left, 0), max(canvas.width - layer.width, 0))
        top = min(max(top, 0), max(canvas.height - layer.height, 0))
        overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        overlay.paste(layer, (left, top))
        canvas = Image.alpha_composite(canvas, overlay)
        boxes.append((left, top, min(left + layer.width, canvas.width), min(top + layer.height, canvas.height)))
    before = np.asarray(base.convert("RGB"))
    after_rgb = canvas.convert("RGB")
    cover = float(np.any(np.asarray(after_rgb) != before, axis=-1).mean())
    if mode == "RGBA":
        out = canvas  # "over" compositing already gives text its own opacity on transparent areas
    elif mode in ("RGB", "P", "1", "I", "F", "I;16"):
        out = after_rgb if mode in ("RGB", "P") else after_rgb.convert("L").convert(mode)
    else:
        out = after_rgb.convert(mode)
    return Rendered(out, text, cover, boxes)
