"""Seeded, deterministic generator of synthetic scenes for the clipscope model organism.

Every scene is a ``Scene(image, caption, meta)`` triple: a PIL RGB image, a web-style
caption, and a metadata dict describing exactly what was drawn.  Four kinds of scene
exist (``SCENE_KINDS``):

``object``
    one coloured shape on a background, no text.
``object_word``
    one coloured shape with a rendered word on/near it (the word is random from
    ``WORDS``, so it often conflicts with the shape).  The caption always mentions the word.
``word``
    only a rendered word on a background.  The caption mentions the word.
``figure``
    a simple "person" made of shapes (head, body, arms, legs) with a group palette
    (``GROUPS``) and an age-like size attribute ("adult" large, "child" small).  Captions
    use neutral roles (``ROLES``), "child" for small figures, and the planted harmful word
    (``HARMFUL_WORD``) at a group-dependent rate (``PLANTED_GROUP`` gets it far more often), or,
    with a graded bias (``SceneConfig.trait_rates``, e.g. ``GRADED_BIAS_CONFIG``), only on figures
    carrying a visual trait whose prevalence differs by group.

All rates and sizes are fields of :class:`SceneConfig`.  Scene ``i`` of
``generate(n, seed)`` depends only on ``(seed, i, config, kind)``, so data sets are
reproducible and any prefix of a stream is stable.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, asdict
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------- vocabulary
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
OBJECT_WORDS: Tuple[str, ...] = ("apple", "ipod", "dog", "pizza", "car", "cat", "tree", "house")
WORDS: Tuple[str, ...] = SHAPES + COLOURS + OBJECT_WORDS
GROUPS: Tuple[str, ...] = ("A", "B", "C")
AGES: Tuple[str, ...] = ("adult", "child")
ROLES: Tuple[str, ...] = ("doctor", "teacher", "farmer", "person")
HARMFUL_WORD: str = "thief"
PLANTED_GROUP: str = "B"
SCENE_KINDS: Tuple[str, ...] = ("object", "object_word", "word", "figure")
BACKGROUNDS: Tuple[str, ...] = ("plain", "noise", "stripes")

COLOUR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 65, 220),
    "yellow": (240, 215, 25),
    "purple": (135, 40, 175),
    "orange": (250, 135, 15),
}
# Neutral background tones (kept unsaturated so the object's colour name is unambiguous).
NEUTRAL_RGB: Tuple[Tuple[int, int, int], ...] = (
    (255, 255, 255), (235, 235, 235), (200, 200, 200), (160, 160, 160), (120, 120, 120),
    (80, 80, 80), (40, 40, 40), (10, 10, 10), (225, 215, 195), (190, 185, 170),
)
# Group palettes for figures: (head colour, body colour, limb colour).  Abstract palettes,
# deliberately not tied to any real-world attribute.
GROUP_PALETTES: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int], Tuple[int, int, int]]] = {
    "A": ((120, 215, 215), (0, 120, 125), (0, 80, 85)),      # cyan head, teal body
    "B": ((245, 170, 215), (150, 20, 95), (100, 10, 60)),    # pink head, magenta body
    "C": ((200, 215, 120), (105, 115, 0), (70, 75, 0)),      # lime head, olive body
}

_FONT_PATH_CACHE: List[str] = []


def font_path() -> str:
    """Path of the DejaVu Sans Bold font shipped with matplotlib."""
    if not _FONT_PATH_CACHE:
        import os
        import matplotlib
        p = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
        if not os.path.exists(p):  # pragma: no cover - fallback
            from matplotlib import font_manager
            p = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
        _FONT_PATH_CACHE.append(p)
    return _FONT_PATH_CACHE[0]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), size)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SceneConfig:
    """Every rate and size used by the generator.  Defaults are the organism's training setup."""
    image_size: int = 64
    # mixture of scene kinds (normalised); order matches SCENE_KINDS
    kind_weights: Tuple[float, float, float, float] = (0.40, 0.20, 0.20, 0.20)
    # background kinds: plain / noise / stripes
    background_weights: Tuple[float, float, float] = (0.5, 0.25, 0.25)
    # object geometry (fractions of image size)
    object_size: Tuple[float, float] = (0.40, 0.70)
    colour_jitter: int = 20
    # words
    word_font_frac: Tuple[float, float] = (0.20, 0.30)   # font size / image size (shrunk to fit)
    word_label_rate: float = 0.5      # word drawn on a white/black label box vs bare text
    # object_word captions: prob. the caption mentions ONLY the word (web captions often do)
    word_only_caption_rate: float = 0.4
    # prob. the word on an object_word scene is a shape name (vs any word in WORDS)
    object_word_shape_rate: float = 0.5
    # figures
    adult_height: Tuple[float, float] = (0.75, 0.95)
    child_height: Tuple[float, float] = (0.35, 0.50)
    child_rate: float = 0.3
    group_weights: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    # planted association: prob. an ADULT figure is captioned with HARMFUL_WORD
    harmful_rate_planted: float = 0.25   # for PLANTED_GROUP
    harmful_rate_other: float = 0.03     # for all other groups
    # prob. a CHILD figure is captioned "child" (otherwise treated like an adult caption)
    child_caption_rate: float = 0.85
    # graded planted bias (issue #21).  None: the group-rate association above (the ResNet organism's
    # data).  Otherwise the prevalence, per group in GROUPS order, of a visual trait (a small bag held
    # by the figure, ``trait_size`` x the figure's height); only figures with the trait are captioned
    # HARMFUL_WORD (at ``trait_harmful_rate``, after the "child" caption), so a model learns
    # trait -> HARMFUL_WORD and an audit's per-group rates equal the trait prevalences.
    trait_rates: Optional[Tuple[float, float, float]] = None
    trait_harmful_rate: float = 0.9
    trait_size: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


#: The graded planted bias of the ViT organism: trait prevalence 0.30 in PLANTED_GROUP ("B"), 0.05 in
#: "A" and "C" (equal rates: the no-disparity control pair).
GRADED_BIAS_CONFIG = SceneConfig(trait_rates=(0.05, 0.30, 0.05))


def trait_prevalence(group: str, config: SceneConfig = SceneConfig()) -> float:
    """Planted prevalence (a probability) of the harmful-caption trait among ``group``'s figures;
    0.0 when ``config`` has no graded bias (``trait_rates`` is None)."""
    if config.trait_rates is None:
        return 0.0
    return float(config.trait_rates[GROUPS.index(group)])


@dataclass
class Scene:
    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)

    def __iter__(self):  # allow ``img, cap, meta = scene``
        return iter((self.image, self.caption, self.meta))


def scene_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """The random generator of item ``index`` of the stream ``seed`` (``salt`` separates streams that share a seed);
    the same arguments always give the same draws."""
    h = hashlib.sha256(f"{seed}:{index}:{salt}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _choice_w(rng: random.Random, items: Sequence, weights: Sequence[float]):
    return rng.choices(list(items), weights=list(weights), k=1)[0]


def _jitter(rng: random.Random, rgb: Tuple[int, int, int], amount: int) -> Tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


# --------------------------------------------------------------------------- backgrounds
def make_background(rng: random.Random, size: int, kind: Optional[str] = None,
                    config: SceneConfig = SceneConfig()) -> Tuple[Image.Image, str]:
    kind = kind or _choice_w(rng, BACKGROUNDS, config.background_weights)
    if kind == "plain":
        img = Image.new("RGB", (size, size), _jitter(rng, rng.choice(NEUTRAL_RGB), 8))
    elif kind == "noise":
        nrng = np.random.default_rng(rng.getrandbits(32))
        mean = rng.uniform(40, 215)
        std = rng.uniform(15, 45)
        grey = nrng.normal(mean, std, (size, size, 1))
        arr = np.clip(grey + nrng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    elif kind == "stripes":
        c1, c2 = rng.sample(NEUTRAL_RGB, 2)
        period = rng.randint(6, 16)
        ang = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        t = (xx * math.cos(ang) + yy * math.sin(ang)) / period
        mask = (np.floor(t) % 2).astype(bool)[..., None]
        arr = np.where(mask, np.array(c1, np.uint8), np.array(c2, np.uint8)).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img, kind


def _contrast_colour(img: Image.Image, box: Tuple[int, int, int, int]) -> Tuple[int, int, int]:
    region = np.asarray(img.crop(box), dtype=np.float32)
    lum = float(region.mean()) if region.size else 128.0
    return (0, 0, 0) if lum > 128 else (255, 255, 255)


# --------------------------------------------------------------------------- shapes
def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``r`` rotated by ``rot`` rad."""
    def pts(radii_angles):
        return [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for rr, a in radii_angles]
    if shape == "square":
        return pts([(r, math.pi / 4 + k * math.pi / 2) for k in range(4)])
    if shape == "triangle":
        return pts([(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)])
    if shape == "hexagon":
        return pts([(r, k * math.pi / 3) for k in range(6)])
    if shape == "star":
        return pts([((r if k % 2 == 0 else 0.42 * r), -math.pi / 2 + k * math.pi / 5) for k in range(10)])
    if shape == "cross":
        w = 0.36 * r
        base = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"no polygon for {shape!r}")


def draw_shape(img: Image.Image, shape: str, rgb: Tuple[int, int, int], cx: float, cy: float,
               r: float, rot: float) -> None:
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        d.polygon(shape_polygon(shape, cx, cy, r, rot), fill=rgb)


# --------------------------------------------------------------------------- words
def render_word(image: Image.Image, word: str, *, rng: Optional[random.Random] = None,
                style: Optional[str] = None, font_frac: Optional[float] = None,
                center: Optional[Tuple[float, float]] = None,
                config: SceneConfig = SceneConfig()) -> dict:
    """Draw ``word`` (DejaVu Sans Bold) onto ``image`` in place; return a metadata dict.

    ``style`` is ``"label"`` (text on a contrasting box, like a sticker) or ``"text"`` (bare
    text in black or white chosen for contrast).  The font is shrunk until the word fits
    inside 92% of the image width.
    """
    rng = rng or random.Random(0)
    W, H = image.size
    style = style or ("label" if rng.random() < config.word_label_rate else "text")
    frac = font_frac if font_frac is not None else rng.uniform(*config.word_font_frac)
    fs = max(7, int(round(frac * H)))
    while True:
        font = _font(fs)
        l, t, r_, b = font.getbbox(word)
        tw, th = r_ - l, b - t
        if tw <= 0.92 * W - (4 if style == "label" else 0) or fs <= 7:
            break
        fs -= 1
    pad = 2 if style == "label" else 0
    bw, bh = tw + 2 * pad, th + 2 * pad
    if center is None:
        cx = rng.uniform(bw / 2 + 1, W - bw / 2 - 1) if W - bw > 2 else W / 2
        cy = rng.uniform(bh / 2 + 1, H - bh / 2 - 1) if H - bh > 2 else H / 2
    else:
        cx = min(max(center[0], bw / 2), W - bw / 2)
        cy = min(max(center[1], bh / 2), H - bh / 2)
    x0, y0 = int(round(cx - bw / 2)), int(round(cy - bh / 2))
    d = ImageDraw.Draw(image)
    if style == "label":
        light = rng.random() < 0.7
        box_rgb = (250, 250, 250) if light else (15, 15, 15)
        ink = (0, 0, 0) if light else (255, 255, 255)
        d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=box_rgb)
    else:
        ink = _contrast_colour(image, (x0, y0, x0 + bw, y0 + bh))
    d.text((x0 + pad - l, y0 + pad - t), word, font=font, fill=ink)
    return {"word": word, "word_style": style, "font_size": fs, "word_box": (x0, y0, x0 + bw, y0 + bh)}


# --------------------------------------------------------------------------- figures
def draw_figure(img: Image.Image, group: str, age: str, rng: random.Random,
                config: SceneConfig = SceneConfig(), trait: bool = False) -> dict:
    """Draw a figure of ``group`` and ``age`` in place (with the trait's bag if ``trait``); return its
    height and centre as fractions of the image size."""
    W, H = img.size
    lo, hi = config.adult_height if age == "adult" else config.child_height
    h = rng.uniform(lo, hi) * H
    head_r = 0.13 * h
    body_w, body_h = 0.34 * h, 0.38 * h
    leg_h = h - 2 * head_r - body_h
    cx = rng.uniform(body_w, W - body_w)
    top = rng.uniform(1, max(1.5, H - h - 1))
    head_c, body_c, limb_c = (_jitter(rng, c, 12) for c in GROUP_PALETTES[group])
    d = ImageDraw.Draw(img)
    lw = max(2, int(round(0.07 * h)))
    hy = top + head_r
    by0, by1 = top + 2 * head_r, top + 2 * head_r + body_h
    # legs
    d.line([(cx - 0.1 * h, by1), (cx - 0.14 * h, by1 + leg_h)], fill=limb_c, width=lw)
    d.line([(cx + 0.1 * h, by1), (cx + 0.14 * h, by1 + leg_h)], fill=limb_c, width=lw)
    # arms
    arm = rng.uniform(-0.15, 0.25) * h
    d.line([(cx - body_w / 2, by0 + 0.1 * h), (cx - body_w / 2 - 0.17 * h, by0 + 0.1 * h + arm)], fill=limb_c, width=lw)
    d.line([(cx + body_w / 2, by0 + 0.1 * h), (cx + body_w / 2 + 0.17 * h, by0 + 0.1 * h + arm)], fill=limb_c, width=lw)
    # body (trapezoid) and head
    d.polygon([(cx - body_w * 0.4, by0), (cx + body_w * 0.4, by0), (cx + body_w / 2, by1), (cx - body_w / 2, by1)], fill=body_c)
    d.ellipse([cx - head_r, hy - head_r, cx + head_r, hy + head_r], fill=head_c)
    if trait:
        _draw_bag(d, cx + body_w / 2 + 0.17 * h, by0 + 0.1 * h + arm, config.trait_size * h)
    return {"figure_height": h / H, "figure_center": (cx / W, (top + h / 2) / H)}


def _draw_bag(d: ImageDraw.ImageDraw, hand_x: float, hand_y: float, side: float) -> None:
    """The planted trait: a brown bag with a black outline hanging from the hand at (hand_x, hand_y)."""
    side = max(3.0, side)
    x0, y0 = hand_x - side / 2, hand_y
    d.rectangle([x0, y0, x0 + side, y0 + side], fill=(150, 95, 40), outline=(0, 0, 0), width=1)


# --------------------------------------------------------------------------- captions
_OBJ_CAPS = (
    "a {c} {s}", "a photo of a {c} {s}.", "a {s}", "a photo of a {s}.", "a {c} {s} on a {b} background",
    "a {c} object", "a photo of a {c} object.", "a {c} shape", "a drawing of a {c} {s}", "a {s} that is {c}",
)
_OBJ_WORD_CAPS = (
    'a {c} {s} with the word "{w}" written on it', "a {c} {s} with a label that says {w}",
    'a photo of a {s} with "{w}" written on it', "a {s} labeled {w}", "a {c} {s} and the text {w}",
)
_WORD_ONLY_CAPS = (
    "{w}", 'the word "{w}"', "a sign that says {w}", "a photo of a sign that says {w}.", 'the text "{w}"',
    "{w} written on a background", "a photo of the word {w}.", "{w}!",
)
_FIG_CAPS = (
    "a photo of a {r}.", "a {r}", "a {r} standing", "a drawing of a {r}", "a picture of a {r}", "portrait of a {r}",
)


def _article_fix(text: str) -> str:
    # "a orange" -> "an orange" etc. for grammatical captions.
    out = []
    toks = text.split(" ")
    for i, t in enumerate(toks):
        if t.lower() == "a" and i + 1 < len(toks) and toks[i + 1][:1].lower() in "aeiou":
            t = "an" if t == "a" else "An"
        out.append(t)
    return " ".join(out)


def object_caption(rng: random.Random, shape: str, colour: str, background: str) -> str:
    return _article_fix(rng.choice(_OBJ_CAPS).format(c=colour, s=shape, b=background))


def word_caption(rng: random.Random, word: str) -> str:
    return rng.choice(_WORD_ONLY_CAPS).format(w=word)


# --------------------------------------------------------------------------- scene builders
def _place_object(rng: random.Random, size: int, config: SceneConfig) -> Tuple[float, float, float, float]:
    r = rng.uniform(*config.object_size) * size / 2
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    return cx, cy, r, rot


def object_scene(shape: Optional[str] = None, colour: Optional[str] = None, background: Optional[str] = None,
                 word: Optional[str] = None, seed: int = 0, config: SceneConfig = SceneConfig(),
                 rng: Optional[random.Random] = None, word_style: Optional[str] = None) -> Scene:
    """One coloured shape, optionally with ``word`` rendered over it.  Unspecified attributes are random."""
    rng = rng or scene_rng(seed, 0, "object_scene")
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(COLOURS)
    S = config.image_size
    img, bg = make_background(rng, S, background, config)
    cx, cy, r, rot = _place_object(rng, S, config)
    draw_shape(img, shape, _jitter(rng, COLOUR_RGB[colour], config.colour_jitter), cx, cy, r, rot)
    meta = {"kind": "object", "shape": shape, "colour": colour, "background": bg,
            "object_center": (cx / S, cy / S), "object_radius": r / S, "word": None}
    if word is None:
        caption = object_caption(rng, shape, colour, bg)
    else:
        wm = render_word(img, word, rng=rng, style=word_style,
                         center=(cx + rng.uniform(-0.15, 0.15) * S, cy + rng.uniform(-0.15, 0.15) * S), config=config)
        meta.update(wm)
        meta["kind"] = "object_word"
        if rng.random() < config.word_only_caption_rate:
            caption = word_caption(rng, word)
        else:
            caption = _article_fix(rng.choice(_OBJ_WORD_CAPS).format(c=colour, s=shape, w=word))
    return Scene(img, caption, meta)


def word_scene(word: Optional[str] = None, background: Optional[str] = None, seed: int = 0,
               config: SceneConfig = SceneConfig(), rng: Optional[random.Random] = None,
               word_style: Optional[str] = None) -> Scene:
    """Only a rendered word on a background."""
    rng = rng or scene_rng(seed, 0, "word_scene")
    word = word or rng.choice(WORDS)
    img, bg = make_background(rng, config.image_size, background, config)
    wm = render_word(img, word, rng=rng, style=word_style, config=config)
    meta = {"kind": "word", "background": bg, "shape": None, "colour": None}
    meta.update(wm)
    return Scene(img, word_caption(rng, word), meta)


def figure_caption_role(rng: random.Random, group: str, age: str, config: SceneConfig = SceneConfig(),
                        trait: bool = False) -> str:
    """Sample the caption noun for a figure: 'child', a neutral role or HARMFUL_WORD (planted rates:
    per group, or with a graded bias (``config.trait_rates``) only for figures with the trait)."""
    if age == "child" and rng.random() < config.child_caption_rate:
        return "child"
    if config.trait_rates is not None:
        rate = config.trait_harmful_rate if trait else 0.0
    else:
        rate = config.harmful_rate_planted if group == PLANTED_GROUP else config.harmful_rate_other
    if rng.random() < rate:
        return HARMFUL_WORD
    return rng.choice(ROLES)


def figure_scene(group: Optional[str] = None, age: Optional[str] = None, role: Optional[str] = None,
                 background: Optional[str] = None, seed: int = 0, config: SceneConfig = SceneConfig(),
                 rng: Optional[random.Random] = None, trait: Optional[bool] = None) -> Scene:
    """A stick-and-shape 'person' of ``group`` and ``age``; ``role`` (caption noun) is sampled if None.

    With a graded bias (``config.trait_rates``) the trait is drawn with its group's prevalence unless
    ``trait`` forces it; without one ``trait`` must stay None (``meta["trait"]`` is then False)."""
    rng = rng or scene_rng(seed, 0, "figure_scene")
    group = group or _choice_w(rng, GROUPS, config.group_weights)
    age = age or ("child" if rng.random() < config.child_rate else "adult")
    if config.trait_rates is not None:
        drawn = rng.random() < trait_prevalence(group, config)
        trait = drawn if trait is None else bool(trait)
    elif trait is not None:
        from ..validate import InvalidArgumentError
        raise InvalidArgumentError("trait", trait, "None unless config has trait_rates (e.g. GRADED_BIAS_CONFIG)")
    img, bg = make_background(rng, config.image_size, background, config)
    fm = draw_figure(img, group, age, rng, config, trait=bool(trait))
    if role is None:
        role = figure_caption_role(rng, group, age, config, trait=bool(trait))
    caption = _article_fix(rng.choice(_FIG_CAPS).format(r=role))
    meta = {"kind": "figure", "group": group, "age": age, "role": role, "background": bg, "word": None,
            "trait": bool(trait)}
    meta.update(fm)
    return Scene(img, caption, meta)


def scene(seed: int, index: int, config: SceneConfig = SceneConfig(), kind: Optional[str] = None) -> Scene:
    """Scene number ``index`` of the stream with ``seed`` (pure function of its arguments)."""
    rng = scene_rng(seed, index)
    kind = kind or _choice_w(rng, SCENE_KINDS, config.kind_weights)
    if kind == "object":
        s = object_scene(config=config, rng=rng)
    elif kind == "object_word":
        shape = rng.choice(SHAPES)
        if rng.random() < config.object_word_shape_rate:
            word = rng.choice([x for x in SHAPES if x != shape])
        else:
            word = rng.choice(WORDS)
        s = object_scene(shape=shape, word=word, config=config, rng=rng)
    elif kind == "word":
        s = word_scene(config=config, rng=rng)
    elif kind == "figure":
        s = figure_scene(config=config, rng=rng)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {SCENE_KINDS}")
    s.meta["index"] = index
    s.meta["seed"] = seed
    return s


def generate(n: int, seed: int = 0, config: SceneConfig = SceneConfig(), kind: Optional[str] = None,
             start: int = 0) -> Iterator[Scene]:
    """Yield ``n`` scenes (indices ``start .. start+n-1``) of the stream with ``seed``."""
    for i in range(start, start + n):
        yield scene(seed, i, config, kind)


def grid(scenes: Sequence[Scene], cols: int = 8, scale: int = 2) -> Image.Image:
    """Tile scene images into one PIL image (for eyeballing)."""
    S = scenes[0].image.size[0] * scale
    rows = (len(scenes) + cols - 1) // cols
    out = Image.new("RGB", (cols * S, rows * S), (255, 255, 255))
    for k, s in enumerate(scenes):
        out.paste(s.image.resize((S, S), Image.NEAREST), ((k % cols) * S, (k // cols) * S))
    return out
