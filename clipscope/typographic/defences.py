"""Defences against typographic attacks, all evaluated the same way as the attack itself.

A :class:`Defence` may change four things: the class list (and how predictions
map back to the original classes), the prompt templates, the model while it runs
(a context manager, e.g. unit ablation or the suppression of sparse-autoencoder features,
:class:`SAEFeatureDefence`) and each image before encoding.
Subclass it, or wrap plain functions with :class:`FunctionDefence`, to plug in
your own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..hooks import Unit
from ..io import write_text_atomic
from ..model import weights_digest
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


#: The name a :class:`SAEFeatureDefence` attaches its autoencoder under while it is in force.
SAE_DEFENCE_NAME = "text_defence"
SAE_DEFENCE_FORMAT = "clipscope-sae-feature-defence"
SAE_DEFENCE_FILE = "defence.json"


@dataclass
class SAEFeatureDefence(Defence):
    """Suppress the sparse-autoencoder features that fire on rendered text.

    While in force, ``sae`` (a :class:`clipscope.sae.SparseAutoencoder`) is attached to the model
    (:meth:`~clipscope.ClipModel.attach`) and its ``features`` are zero-ablated at its site: the site's
    activation loses those features' decoder directions times their activations and keeps everything
    else, the SAE's reconstruction error included. Joseph et al. (2025, "Steering CLIP's vision transformer
    with sparse autoencoders") report suppressing such text features as a strong typographic defence.
    Build one with :meth:`fit` (features ranked as :func:`find_text_units` ranks units: effect size of
    the feature's mean activation with a written word against without), or :meth:`load` a saved one.
    ``scores`` are the features' effect sizes (Cohen's d), best first.
    """

    sae: Any
    features: Sequence[int]
    scores: Sequence[float] = ()
    name: str = "sae_features"

    def __post_init__(self):
        if not hasattr(self.sae, "n_features") or not isinstance(self.sae, torch.nn.Module):
            raise InvalidArgumentError("sae", type(self.sae).__name__, "a clipscope.sae.SparseAutoencoder")
        n = self.sae.n_features
        if isinstance(self.features, (str, bytes)) or not isinstance(self.features, Sequence) or not self.features:
            raise InvalidArgumentError("features", self.features, f"a non-empty list of feature indices 0..{n - 1}")
        self.features = [check_int("features", f, low=0, high=n - 1) for f in self.features]
        if len(set(self.features)) != len(self.features):
            raise InvalidArgumentError("features", self.features, "feature indices without repeats")
        self.scores = [check_number("scores", s) for s in self.scores]

    @classmethod
    def fit(cls, model, images: Sequence[Image.Image], words: Sequence[str], sae: Any, *, k: int = 16,
            style: TextStyle | None = None, seed: int = 0) -> "SAEFeatureDefence":
        """The defence suppressing the ``k`` features of ``sae`` whose mean activation rises most (effect
        size) when a word of ``words`` is written on ``images`` (PIL images; the words are drawn as
        :func:`find_text_units` draws them: ``style``, default :class:`TextStyle`, at a seeded random
        position). Raises :class:`~clipscope.validate.InvalidArgumentError` naming ``sae.site`` or
        ``sae.d_in`` if ``sae`` does not fit ``model``."""
        site = model.attach(sae, SAE_DEFENCE_NAME)
        try:
            found = find_text_units(model, site, images, words, k=k, style=style, seed=seed)
        finally:
            model.detach(site)
        return cls(sae, [u.index for u in found.units], found.scores)

    @contextlib.contextmanager
    def context(self, model):
        """A context manager in force while ``model`` encodes: :attr:`sae` attached as the feature site
        ``f"{sae.site}.{SAE_DEFENCE_NAME}"`` with :attr:`features` zero-ablated; on exit the site is detached
        (the SAE back on its device and with its ``requires_grad``). Raises
        :class:`~clipscope.validate.InvalidArgumentError` naming ``sae.site`` or ``sae.d_in`` if the SAE does
        not fit ``model``."""
        site = model.attach(self.sae, SAE_DEFENCE_NAME)
        try:
            with model.ablate([Unit(site, index=f) for f in self.features]):
                yield
        finally:
            model.detach(site)

    def describe(self) -> str:
        """What the defence does: its site, how many features and the first 12 of them, then a digest of the
        whole feature list and the SAE's weights (:func:`~clipscope.model.weights_digest`), so that defences
        that differ in any feature or weight describe differently (clean scores are matched on this text)."""
        listing = ", ".join(str(f) for f in self.features[:12])
        more = f" and {len(self.features) - 12} more" if len(self.features) > 12 else ""
        key = f"{list(self.features)}|{weights_digest(self.sae)}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return (f"suppression of {len(self.features)} SAE feature(s) of {self.sae.site}: {listing}{more} "
                f"(features and SAE {digest})")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the defence into ``folder``: the autoencoder (``sae/``, :meth:`SparseAutoencoder.save`) and
        ``defence.json`` (features, scores, name), each file atomically; returns the folder."""
        folder = Path(folder)
        self.sae.save(folder / "sae")
        meta = {"format": SAE_DEFENCE_FORMAT, "version": 1, "name": self.name, "features": list(self.features),
                "scores": list(self.scores)}
        write_text_atomic(folder / SAE_DEFENCE_FILE, json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model=None) -> "SAEFeatureDefence":
        """Read a defence written by :meth:`save`; with ``model``, check that its autoencoder fits the model.
        A folder that holds no such defence raises :class:`~clipscope.validate.InvalidArgumentError` naming
        ``folder``; an autoencoder that does not fit ``model`` one naming ``sae.site`` or ``sae.d_in``."""
        from ..sae import SparseAutoencoder
        path = Path(folder) / SAE_DEFENCE_FILE
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError("folder", str(folder), f"a folder written by SAEFeatureDefence.save "
                                                              f"(reading {SAE_DEFENCE_FILE}: {exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != SAE_DEFENCE_FORMAT:
            raise InvalidArgumentError("folder", str(folder), f"a folder written by SAEFeatureDefence.save "
                                                              f"({SAE_DEFENCE_FILE} of format {SAE_DEFENCE_FORMAT!r})")
        defence = cls(SparseAutoencoder.load(Path(folder) / "sae"), meta.get("features"), meta.get("scores", ()),
                      meta.get("name", "sae_features"))
        if model is not None:
            model.detach(model.attach(defence.sae, SAE_DEFENCE_NAME))
        return defence
