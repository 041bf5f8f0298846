"""Rendering text onto images, with every parameter of a typographic attack under control.

:func:`render_text` draws text in any TrueType font, at an absolute size or as a
fraction of the image's shorter side, in any colour and opacity, over an
optional background box, at a named anchor, fixed coordinates, a seeded random
place or one of 8 fixed positions, rotated and repeated. It reports the **pixel
cover**: the fraction of pixels whose value changed.

Every style value is checked once, when the :class:`TextStyle` is built (one validator per
field, :data:`STYLE_CHECKS`); a bad one raises :class:`~clipscope.validate.InvalidArgumentError`
naming the field, the value and what is valid.
"""
from __future__ import annotations

import difflib
import numbers
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..validate import InvalidArgumentError, check_int, check_number

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

#: The largest font size in pixels a style may ask for, and the most copies it may draw.
MAX_FONT_PX = 1024
MAX_REPEAT = 100


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
        except (OSError, ValueError):
            raise InvalidArgumentError("font", path, "the path of a TrueType/OpenType file "
                                                     "(cannot read the font)") from None
        if len(cache) >= 64:
            cache.pop(next(iter(cache)))
        cache[key] = font
    return cache[key]


def _rgb(colour: Colour) -> tuple[int, int, int]:
    """``colour`` (already checked by :func:`check_colour`) as an ``(r, g, b)`` tuple of 0..255."""
    return ImageColor.getrgb(colour)[:3] if isinstance(colour, str) else colour


def check_colour(parameter: str, colour: Any) -> Colour:
    """Return ``colour`` if PIL can draw it: a colour name, ``'#rrggbb'``, ``'rgb(r, g, b)'``, or an
    ``(r, g, b)`` sequence of integers 0..255 (returned as a tuple)."""
    valid = (f"one of PIL's {len(ImageColor.colormap)} colour names (PIL.ImageColor.colormap), '#rrggbb', "
             "'rgb(r, g, b)' or an (r, g, b) tuple of integers 0..255")
    if isinstance(colour, str):
        try:
            ImageColor.getrgb(colour)
            return colour
        except ValueError:
            close = difflib.get_close_matches(colour.lower(), list(ImageColor.colormap), n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InvalidArgumentError(parameter, colour, f"unknown colour; use {valid}{hint}") from None
    if isinstance(colour, Sequence) and len(colour) == 3:
        try:
            return tuple(check_int(parameter, c, low=0, high=255) for c in colour)
        except InvalidArgumentError:
            pass
    raise InvalidArgumentError(parameter, colour, f"unknown colour; use {valid}")


def _check_font(parameter: str, font: Any) -> str:
    if not isinstance(font, (str, os.PathLike)) or not str(font):
        raise InvalidArgumentError(parameter, font, "the path of a TrueType/OpenType file")
    _font(str(font), 12)  # raises naming the font if it cannot be read
    return str(font)


def _check_bool(parameter: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(parameter, value, "True or False")
    return bool(value)


def _fraction(parameter: str, value: Any) -> float:
    return check_number(parameter, value, low=0.0, high=1.0)


#: One validator per :class:`TextStyle` field: ``check(field_name, value)`` returns the normalized value
#: or raises :class:`~clipscope.validate.InvalidArgumentError`.
STYLE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "font": _check_font,
    "size": lambda p, v: check_number(p, v, low=0.0, high=MAX_FONT_PX, low_open=True),
    "colour": check_colour,
    "box": lambda p, v: None if v is None else check_colour(p, v),
    "box_opacity": _fraction,
    "padding": lambda p, v: check_number(p, v, low=0.0, high=10.0),
    "opacity": _fraction,
    "rotation": lambda p, v: check_number(p, v),
    "repeat": lambda p, v: check_int(p, v, low=1, high=MAX_REPEAT),
    "fit": _check_bool,
}


@dataclass(frozen=True)
class TextStyle:
    """How text looks. ``size`` below 1 is a fraction of the image's shorter side, otherwise pixels
    (at most :data:`MAX_FONT_PX`).

    ``box`` is the background box colour (``None`` for none), with ``box_opacity``
    and ``padding`` (a fraction of the font size). ``opacity`` scales text and box.
    ``rotation`` is in degrees, counter-clockwise. ``repeat`` draws that many
    copies (1..:data:`MAX_REPEAT`): the first at the requested position, the others at seeded random places.
    Colours are names, ``'#rrggbb'`` or ``(r, g, b)`` tuples (see :func:`check_colour`).
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
        for name, check in STYLE_CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))

    def replace(self, **changes) -> "TextStyle":
        """A copy with some fields changed (each checked as at construction)."""
        for name, value in changes.items():
            if name not in STYLE_CHECKS:
                raise InvalidArgumentError(name, value, f"unknown text style field; valid: {sorted(STYLE_CHECKS)}")
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


def check_position(parameter: str, position: Any) -> Position:
    """Return ``position`` if it names a place: an anchor (:data:`ANCHORS`), ``"random"``, ``"fixed8:k"``
    (k in 0..7), or an ``(x, y)`` pair, either of fractions of the width and height (two floats in
    [0, 1]) or of pixels (two integers >= 0; whether they fall inside an image is checked when one is
    drawn on). A list is returned as a tuple."""
    valid = (f"an anchor ({', '.join(sorted(ANCHORS))}), 'random', 'fixed8:0'..'fixed8:7', or an (x, y) pair "
             "of fractions (two floats in [0, 1]) or of pixels (two integers >= 0)")
    if isinstance(position, str):
        fixed = position.startswith("fixed8:") and position[7:].isdigit() and int(position[7:]) < 8
        if position in ANCHORS or position == "random" or fixed:
            return position
        raise InvalidArgumentError(parameter, position, valid)
    if isinstance(position, Sequence) and len(position) == 2:
        pixels = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in position)
        fractions = all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in position)
        if pixels:
            return tuple(int(v) for v in position)
        if fractions:
            return tuple(float(v) for v in position)
    raise InvalidArgumentError(parameter, position, valid)


def resolve_position(position: Position, size: tuple[int, int], rng: random.Random) -> tuple[float, float]:
    """Return the centre point in pixels for ``position`` on an image of ``(width, height)``.

    ``position`` is an anchor name (:data:`ANCHORS`), ``"random"``, ``"fixed8:k"``
    (k in 0..7), an ``(x, y)`` pair of fractions (floats, both in [0, 1]) or of pixels
    (see :func:`check_position`).
    """
    position = check_position("position", position)
    w, h = size
    if isinstance(position, str):
        if position in ANCHORS:
            fx, fy = ANCHORS[position]
        elif position == "random":
            fx, fy = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)
        else:
            fx, fy = FIXED8[int(position[7:])]
        return fx * w, fy * h
    x, y = position
    if isinstance(x, float):
        return x * w, y * h
    if x >= w or y >= h:
        raise InvalidArgumentError("position", position, f"a pixel inside the {w} x {h} image "
                                                          f"(x < {w}, y < {h}), or fractions (floats in [0, 1])")
    return float(x), float(y)


@dataclass(frozen=True)
class _Layout:
    """Where ``text`` goes on its layer at one font size: the ink's top-left offset, the box padding and the
    unrotated layer's ``(width, height)``, all in pixels."""

    font: ImageFont.FreeTypeFont
    left: int
    top: int
    pad: int
    size: tuple[int, int]


def _layout(text: str, style: TextStyle, font_px: int) -> _Layout:
    """Measure ``text`` (several lines if it has newlines) at ``font_px`` without drawing it."""
    font = _font(style.font, font_px)
    measure = _fonts.__dict__.setdefault("measure", ImageDraw.Draw(Image.new("RGBA", (1, 1))))
    left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
    pad = int(round(style.padding * font_px)) if style.box is not None else 0
    return _Layout(font, left, top, pad, (max(1, right - left + 2 * pad), max(1, bottom - top + 2 * pad)))


def _text_layer(text: str, style: TextStyle, layout: _Layout) -> Image.Image:
    """The text (on its box, if any) on a transparent layer, rotated."""
    origin = (layout.pad - layout.left, layout.pad - layout.top)
    layer = Image.new("RGBA", layout.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if style.box is not None:
        draw.rectangle([0, 0, layer.width - 1, layer.height - 1],
                       fill=(*_rgb(style.box), int(round(255 * style.box_opacity * style.opacity))))
    text_alpha = int(round(255 * style.opacity))
    if style.box is not None and style.box_opacity > 0:
        # text on a box: draw into the box (the text replaces the box colour where it is opaque)
        ink = Image.new("RGBA", layer.size, (0, 0, 0, 0))
        ImageDraw.Draw(ink).text(origin, text, font=layout.font, fill=(*_rgb(style.colour), text_alpha))
        layer = Image.alpha_composite(layer, ink)
    else:
        draw.text(origin, text, font=layout.font, fill=(*_rgb(style.colour), text_alpha))
    if style.rotation:
        layer = layer.rotate(style.rotation, resample=Image.BICUBIC, expand=True)
    return layer


def render_text(image: Image.Image, text: str, style: TextStyle | None = None, position: Position = "center",
                seed: int = 0) -> Rendered:
    """Draw ``text`` on a copy of ``image`` and return a :class:`Rendered`.

    Works for any PIL mode and size; the result has the input's mode (palette
    images come back as RGB). ``text`` may have several lines; an empty text leaves
    the image unchanged (cover 0, no boxes). Deterministic given ``seed`` (which only
    matters for ``"random"`` positions and repeats). Copies are kept inside the image
    when they fit. Bad arguments raise :class:`~clipscope.validate.InvalidArgumentError`.
    """
    if not isinstance(image, Image.Image) or min(image.size) < 1:
        raise InvalidArgumentError("image", image, "a PIL image of at least 1x1 pixels")
    if not isinstance(text, str):
        raise InvalidArgumentError("text", text, "a string")
    if style is not None and not isinstance(style, TextStyle):
        raise InvalidArgumentError("style", style, "a TextStyle or None")
    position = check_position("position", position)
    if isinstance(position, tuple):
        resolve_position(position, image.size, random.Random(0))  # a pixel position must lie inside the image
    seed = check_int("seed", seed)
    style = style or TextStyle()
    mode = image.mode
    if not text:
        return Rendered(image.convert("RGB") if mode == "P" else image.copy(), text, 0.0, [])
    readable = image.convert("LA") if mode == "La" else image  # Pillow converts premultiplied La only to LA
    base = readable.convert("RGB") if mode not in ("RGB", "RGBA") else image
    canvas = base.convert("RGBA")
    lines = "\n".join(text.splitlines())  # every line break (\r, \r\n, \x85, \u2028, ...) as "\n"
    rng = random.Random(seed)
    font_px = style.font_px(canvas.size)
    layer = _text_layer(lines, style, _layout(lines, style, font_px))
    while style.fit and font_px > 1 and layer.width > 0.95 * canvas.width:
        font_px = max(1, int(font_px * min(0.95 * canvas.width / layer.width, 0.95)))
        layer = _text_layer(lines, style, _layout(lines, style, font_px))
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
    return Rendered(_restore_mode(canvas, after_rgb, mode), text, cover, boxes)


def _restore_mode(canvas: Image.Image, after_rgb: Image.Image, mode: str) -> Image.Image:
    """The rendered image in the input's ``mode`` (palette images as RGB) from its RGBA and RGB versions."""
    if mode == "RGBA":
        return canvas  # "over" compositing already gives text its own opacity on transparent areas
    if mode in ("RGB", "P"):
        return after_rgb
    if mode in ("1", "I", "F", "I;16"):
        return after_rgb.convert("L").convert(mode)
    return after_rgb.convert(mode)
