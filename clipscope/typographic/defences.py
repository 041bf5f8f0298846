"""Defences against typographic attacks, all evaluated the same way as the attack itself.

A :class:`Defence` may change four things: the class list (and how predictions
map back to the original classes), the prompt templates, the model while it runs
(a context manager, e.g. unit ablation) and each image before encoding.
Subclass it, or wrap plain functions with :class:`FunctionDefence`, to plug in
your own.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..hooks import Unit
from ..validate import InvalidArgumentError, check_int, check_names, check_number
from .render import TextStyle, render_text


class Defence:
    """No defence; the base class. Override any of the four hooks."""

    name = "none"

    def classes(self, classes: Sequence[str]) -> tuple[list[str], list[str | None]]:
        """Return (classes to score, original class of each scored class or ``None`` for "text")."""
        return list(classes), list(classes)

    def templates(self, templates):
        """Return the prompt templates to use (``None`` keeps the model's default)."""
        return templates

    def context(self, model) -> contextlib.AbstractContextManager:
        """A context manager in force while the model encodes."""
        return contextlib.nullcontext()

    def image(self, image: Image.Image) -> Image.Image:
        """Transform one image before it is encoded."""
        return image

    def describe(self) -> str:
        return self.name


@dataclass
class PromptDefence(Defence):
    """Prompt-side defence.

    ``text_template`` adds, for every class ``c``, a class such as ``"text that
    says c"``; an image predicted as one of them counts as "text detected"
    (neither correct nor a successful attack). ``templates`` replaces the prompt
    templates (e.g. ``["a photo of a {}, not text."]``).
    """

    text_template: str | None = "text that says {}"
    templates_override: Sequence[str] | None = None
    name: str = "prompt"

    def __post_init__(self):
        if self.text_template is not None and not (isinstance(self.text_template, str)
                                                   and self.text_template.count("{}") == 1):
            raise InvalidArgumentError("text_template", self.text_template,
                                       "a string with one '{}' for the class name (e.g. 'text that says {}'), or None")
        if self.templates_override is not None:
            self.templates_override = check_names("templates_override", self.templates_override, unique=False)

    def classes(self, classes):
        if self.text_template is None:
            return super().classes(classes)
        extra = [self.text_template.format(c) for c in classes]
        return list(classes) + extra, list(classes) + [None] * len(extra)

    def templates(self, templates):
        return list(self.templates_override) if self.templates_override is not None else templates

    def describe(self) -> str:
        parts = []
        if self.text_template:
            parts.append(f"adds classes '{self.text_template}'")
        if self.templates_override:
            parts.append(f"templates {list(self.templates_override)}")
        return f"prompt defence: {', '.join(parts)}"


@dataclass
class AblationDefence(Defence):
    """Zero (or patch) units while the model encodes, e.g. units found by :func:`find_text_units`."""

    units: Sequence[Unit]
    value: float = 0.0
    name: str = "ablation"

    def __post_init__(self):
        if isinstance(self.units, Unit):
            self.units = [self.units]
        if isinstance(self.units, (str, bytes)) or not isinstance(self.units, Sequence) or not self.units or \
                not all(isinstance(u, Unit) for u in self.units):
            raise InvalidArgumentError("units", self.units, "a non-empty list of Units (e.g. find_text_units(...).units)")
        if not isinstance(self.value, torch.Tensor):
            self.value = check_number("value", self.value)

    def context(self, model):
        return model.ablate(list(self.units), self.value)

    def describe(self) -> str:
        listing = ", ".join(f"{u.site}[{u.index}]" for u in self.units[:12])
        more = f" and {len(self.units) - 12} more" if len(self.units) > 12 else ""
        return f"ablation of {len(self.units)} unit(s): {listing}{more}"


@dataclass
class FunctionDefence(Defence):
    """A user-supplied defence from plain functions: ``image_fn(image) -> image`` and/or
    ``context_fn(model) -> context manager``."""

    image_fn: Callable[[Image.Image], Image.Image] | None = None
    context_fn: Callable[[object], contextlib.AbstractContextManager] | None = None
    name: str = "custom"

    def image(self, image):
        return self.image_fn(image) if self.image_fn else image

    def context(self, model):
        return self.context_fn(model) if self.context_fn else contextlib.nullcontext()


@dataclass
class TextUnits:
    """Units whose activation tracks rendered text. ``scores`` is each unit's effect size
    (Cohen's d of its mean activation, images with text minus the same images without)."""

    units: list[Unit]
    scores: list[float]

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame({"site": [u.site for u in self.units], "index": [u.index for u in self.units],
                             "effect_size": self.scores})


def find_text_units(model, site: str, images: Sequence[Image.Image], words: Sequence[str], *, k: int = 8,
                    style: TextStyle | None = None, seed: int = 0) -> TextUnits:
    """Rank the units of ``site`` by how much more they fire on images with rendered text.

    Each image is rendered with a word from ``words`` at a random position; the
    effect size per unit is the mean difference (with text minus without) over
    the pooled standard deviation. Returns the top ``k`` as :class:`TextUnits`.
    """
    info = model.site(site)
    if info.tower != "visual":
        raise InvalidArgumentError("site", site, "an image-tower site (visual.*; see model.layers())")
    k = check_int("k", k, low=1)
    words = check_names("words", words, unique=False)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) < 2 or \
            not all(isinstance(im, Image.Image) for im in images):
        raise InvalidArgumentError("images", images, "a list of at least two PIL images")
    if style is not None and not isinstance(style, TextStyle):
        raise InvalidArgumentError("style", style, "a TextStyle or None")
    seed = check_int("seed", seed)
    style = style or TextStyle()
    with_text = [render_text(im, words[i % len(words)], style, "random", seed=seed + i).image
                 for i, im in enumerate(images)]
    values = {}
    for name, batch in (("clean", list(images)), ("text", with_text)):
        with model.capture(site) as acts:
            model.encode_image(batch, progress=False)
        values[name] = model.unit_values(site, acts)
    diff = values["text"].mean(0) - values["clean"].mean(0)
    pooled = torch.sqrt((values["text"].var(0) + values["clean"].var(0)) / 2).clamp_min(1e-6)
    d = diff / pooled
    top = torch.topk(d, min(k, d.numel()))
    return TextUnits([Unit(site, index=int(i)) for i in top.indices], [float(v) for v in top.values])
