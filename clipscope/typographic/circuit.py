"""The heads that read text, and a defence that mean-ablates them (after Dyslexify, ICLR 2026).

Hufe et al., "Dyslexify: A Mechanistic Defense Against Typographic Attacks in CLIP" (ICLR 2026) find a
few attention heads in the second half of a CLIP ViT that carry the written word into the class token,
and defend against typographic attacks by ablating them, training nothing. Three steps here:

1. **Score** (:func:`typographic_scores`): for each (layer, head), the mean over images of the head's
   direct effect towards the *written* class on the attacked image minus the same on the clean image.
   Direct effects come from :func:`clipscope.decompose.decompose` (Gandelsman et al., ICLR 2024): a
   head's part of the image embedding ``p`` (summed over source tokens), dotted with the written class's
   unit text embedding ``t_w`` minus the mean over the classes' ``t``, divided by the embedding's norm
   ``|e|``: ``p . (t_w - mean_c t_c) / |e|``. Units: *cosine units*, parts of the cosine similarity
   between image and class, free of the logit scale (multiply by ``model.logit_scale`` for logits). The
   mean over classes is taken out because a shift shared by all classes changes no zero-shot prediction.
   (Dyslexify ranks heads by their attention to the text's patches; the direct effect ranks them by
   what they write towards the written class, which is what the attack needs.)
2. **Search** (:func:`find_circuit`): heads in order of score, each mean-ablated on top of the heads
   kept so far (their per-token output replaced by its mean over clean reference images); a head is
   kept when clean accuracy stays within ``clean_budget`` of the unablated model's and the written
   class's mean probability on the attacked images falls, until ``max_heads`` are kept. Returns a
   :class:`TypographicCircuit` with the greedy path (clean accuracy, attack success and the written
   class's probability after each step).
3. **Defend** (:class:`HeadAblationDefence`): a :class:`~clipscope.typographic.defences.Defence` whose
   ``context(model)`` mean-ablates the heads, usable wherever defences are
   (:func:`clipscope.typographic.evaluate`), made from a circuit, from a list of heads and reference
   images, or in one call (:meth:`HeadAblationDefence.fit`); saved as JSON + safetensors.

Attack success is :func:`~clipscope.typographic.evaluate`'s: among attacked images whose clean top-1 is
not the written class, the fraction whose attacked top-1 is (Goh et al., Distill 2021, divide the same
count by all images).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..decompose import decompose
from ..hooks import Unit
from ..io import figure_png, write_bytes_atomic, write_text_atomic
from ..model import ClipModel
from ..pages import esc, png_uri
from ..progress import progress_bar
from ..validate import InvalidArgumentError, check_choice, check_int, check_names, check_number, check_same_length
from .defences import Defence
from .render import Position, TextStyle, check_position, render_text

__all__ = ["HeadAblationDefence", "TypographicCircuit", "find_circuit", "head_sites", "typographic_scores"]

#: Where a head is mean-ablated: at every token, or only at the token the image tower reads out (its class
#: token; every token for a tower that pools by the mean over patches).
WHERE = ("all", "readout")
#: File names inside a saved defence's folder.
CONFIG_FILE, MEANS_FILE = "head_ablation.json", "head_ablation.safetensors"
FORMAT = "clipscope-head-ablation"
#: The figures of each step of the search (fractions).
FIGURES = ("clean_accuracy", "attacked_accuracy", "attack_success_rate", "written_probability")
VERSION = 1

Head = tuple[int, int]


# ---------------------------------------------------------------------------------------------- checks
def head_sites(model: Any) -> list[str]:
    """The per-head output site (``{attention}.result``, ``(tokens, heads, width)`` per image) of each block
    of ``model``'s image tower, in order. Raises :class:`~clipscope.validate.InvalidArgumentError` for a
    model that is not a :class:`~clipscope.model.ClipModel` with a transformer image tower whose backend
    declares head-level sites."""
    if not isinstance(model, ClipModel):
        raise InvalidArgumentError("model", model, "a ClipModel (clipscope.load(...))")
    sites = [f"{a}.result" for a in model.attention_sites("visual")]
    names = set(model.layers().names())
    if model.readout is None or not sites or not model.head_count("visual") or not all(s in names for s in sites):
        raise InvalidArgumentError("model", model.name, "a ViT whose backend declares head-level sites "
                                   "({attention}.result); this image tower has none (a ResNet, or a backend "
                                   "without per-head sites)")
    return sites


def check_heads(parameter: str, heads: Any, layers: int | None = None, count: int | None = None) -> list[Head]:
    """``heads`` as a list of unique ``(layer, head)`` pairs of ints >= 0 (below ``layers`` / ``count`` when
    given), or :class:`~clipscope.validate.InvalidArgumentError` naming ``parameter``."""
    valid = "a list of unique (layer, head) pairs of integers" + (
        f", layer in 0..{layers - 1} and head in 0..{count - 1}" if layers is not None else "")
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise InvalidArgumentError(parameter, heads, valid)
    pairs = []
    for item in heads:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise InvalidArgumentError(parameter, heads, valid)
        try:
            pair = (check_int(parameter, item[0], low=0, high=None if layers is None else layers - 1),
                    check_int(parameter, item[1], low=0, high=None if count is None else count - 1))
        except InvalidArgumentError:
            raise InvalidArgumentError(parameter, heads, valid) from None
        if pair in pairs:
            raise InvalidArgumentError(parameter, heads, f"{valid}; {pair} appears twice")
        pairs.append(pair)
    return pairs


def _inputs(model: ClipModel, images: Any, parameter: str) -> torch.Tensor:
    """``images`` (PIL images or a preprocessed ``(n, 3, H, W)`` tensor) as one preprocessed CPU tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or not len(images) or images.shape[1] != 3 or \
                tuple(images.shape[-2:]) != tuple(model.image_size):
            raise InvalidArgumentError(parameter, f"<tensor of shape {tuple(images.shape)}>",
                                       f"a preprocessed (n, 3, {model.image_size[0]}, {model.image_size[1]}) "
                                       "tensor with n >= 1, or a list of PIL images")
        return images.detach().float().cpu()
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images or \
            not all(isinstance(im, Image.Image) for im in images):
        raise InvalidArgumentError(parameter, images, "a non-empty list of PIL images or a preprocessed tensor")
    return torch.stack([model.preprocess(im) for im in images])


def _class_indices(parameter: str, names: Any, classes: list[str]) -> torch.Tensor:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise InvalidArgumentError(parameter, names, "a list with one class name per image")
    bad = list(dict.fromkeys(n for n in names if not isinstance(n, str) or n not in classes))
    if bad:
        raise InvalidArgumentError(parameter, bad, f"class names; each must be one of {classes}")
    return torch.tensor([classes.index(n) for n in names], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- scores
def written_effects(decomposition, written: torch.Tensor) -> torch.Tensor:
    """Each head's direct effect towards each image's written class, ``(n, layers, heads)`` in cosine units:
    the head's part (summed over source tokens) dotted with ``t_w - mean_c t_c`` and divided by ``|e|``.

    ``decomposition``: a :class:`~clipscope.decompose.Decomposition` projected on the classes;
    ``written``: ``(n,)`` index of each image's written class among them."""
    effects = decomposition.heads.sum(dim=3) / decomposition.embedding.norm(dim=1)[:, None, None, None]
    effects = effects - effects.mean(dim=-1, keepdim=True)
    return effects[torch.arange(len(written)), :, :, written]


def typographic_scores(model: ClipModel, clean: Any, attacked: Any, written: Sequence[str], classes: Sequence[str],
                       *, templates: str | Sequence[str] | None = None, batch_size: int = 16,
                       progress: bool | None = None) -> torch.Tensor:
    """Each head's typographic score, float32 ``(layers, heads)`` in cosine units (see the module docstring).

    ``score[l, h] = mean_i [ E_lh(attacked_i, w_i) - E_lh(clean_i, w_i) ]``, with ``E_lh(x, w)`` head
    ``(l, h)``'s direct effect on image ``x`` towards class ``w`` relative to the mean over ``classes``,
    divided by the embedding's norm (:func:`written_effects`). ``clean`` and ``attacked``: the same
    images without and with text (PIL images or preprocessed tensors), ``written[i]`` the class written
    on image ``i`` (one of ``classes``); prompts from ``templates`` as for zero-shot. Decomposes
    ``batch_size`` images at a time (memory ``batch_size x layers x heads x tokens x classes`` floats).
    """
    head_sites(model)
    classes = check_names("classes", classes)
    batch_size = check_int("batch_size", batch_size, low=1)
    clean_x, attacked_x = _inputs(model, clean, "clean"), _inputs(model, attacked, "attacked")
    check_same_length(clean=clean_x, attacked=attacked_x, written=written)
    target = _class_indices("written", written, classes)
    model.class_embeddings(classes, templates)  # checks the templates once, before any work
    total = None
    for start in progress_bar(range(0, len(target), batch_size), progress, len(target) > batch_size,
                              "typographic scores"):
        stop = start + batch_size
        parts = [written_effects(decompose(model, x[start:stop], classes=classes, templates=templates,
                                           batch_size=batch_size, progress=False), target[start:stop]).sum(0)
                 for x in (attacked_x, clean_x)]
        total = parts[0] - parts[1] if total is None else total + parts[0] - parts[1]
    return (total / len(target)).float()


# ---------------------------------------------------------------------------------------------- ablation
def _units_and_values(model: ClipModel, heads: Sequence[Head], means: Mapping[Head, torch.Tensor],
                      where: str) -> tuple[list[Unit], dict[str, torch.Tensor]]:
    """The head units of ``heads`` and the ``{site: (tokens, heads, width)}`` values that mean-ablate them."""
    sites = head_sites(model)
    token = model.readout.token if where == "readout" and model.readout.pool == "token" else None
    units, values = [], {}
    for layer, head in heads:
        site = sites[layer]
        if site not in values:
            values[site] = torch.zeros(model.site(site).shape)
        values[site][:, head] = means[(layer, head)]
        units.append(Unit.head(site, head, token=token))
    return units, values


def head_means(model: ClipModel, heads: Sequence[Head], reference: Any, *, batch_size: int = 64,
               progress: bool | None = None) -> dict[Head, torch.Tensor]:
    """Each head's output (its ``{attention}.result``) averaged over the ``reference`` images, per token:
    ``{(layer, head): (tokens, width)}`` float32 on the CPU, what mean-ablation puts in its place."""
    sites = head_sites(model)
    heads = check_heads("heads", heads, len(sites), model.head_count("visual"))
    wanted = sorted({sites[layer] for layer, _ in heads}, key=sites.index)
    if not wanted:
        return {}
    means = model.mean_activations(_inputs(model, reference, "reference"), wanted, batch_size=batch_size,
                                   progress=progress)
    return {(layer, head): means[sites[layer]][:, head].clone() for layer, head in heads}


def _ablation(model: ClipModel, heads: Sequence[Head], means: Mapping[Head, torch.Tensor], where: str):
    if not heads:
        return contextlib.nullcontext()
    units, values = _units_and_values(model, heads, means, where)
    return model.ablate(units, values)


@dataclass
class _Scoring:
    """Clean accuracy and attack success of one search set under an ablation (top-1 among ``classes``)."""

    model: ClipModel
    weights: torch.Tensor  # (classes, embed_dim) unit class embeddings, on the CPU like the inputs
    clean: torch.Tensor
    attacked: torch.Tensor
    labels: torch.Tensor
    written: torch.Tensor
    batch_size: int

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of ``inputs`` with the classes, ``(n, classes)`` on the CPU."""
        out = []
        with torch.no_grad():
            for chunk in inputs.split(self.batch_size):
                out.append((self.model.encode_image(chunk) @ self.weights.T).cpu())
        return torch.cat(out)

    def measure(self, heads: Sequence[Head], means: Mapping[Head, torch.Tensor], where: str) -> dict[str, float]:
        """``clean_accuracy``, ``attacked_accuracy``, ``attack_success_rate`` (NaN when no image is eligible:
        every clean top-1 already the written class) and ``written_probability``, the mean zero-shot
        probability of the written class on the attacked images."""
        with _ablation(self.model, heads, means, where):
            clean = self.logits(self.clean).argmax(dim=1)
            attacked = self.logits(self.attacked)
        probs = (self.model.logit_scale * attacked).softmax(dim=1)[torch.arange(len(self.written)), self.written]
        attacked = attacked.argmax(dim=1)
        eligible = clean != self.written
        success = float((attacked[eligible] == self.written[eligible]).float().mean()) if eligible.any() else math.nan
        return {"clean_accuracy": float((clean == self.labels).float().mean()),
                "attacked_accuracy": float((attacked == self.labels).float().mean()),
                "attack_success_rate": success, "written_probability": float(probs.mean())}


# ---------------------------------------------------------------------------------------------- circuit
@dataclass(eq=False)
class TypographicCircuit:
    """The heads :func:`find_circuit` selected, with the scores and the greedy path that chose them.

    - ``heads``: the kept ``(layer, head)`` pairs, in the order they were added;
    - ``scores``: float32 ``(layers, heads)`` typographic scores in cosine units (:func:`typographic_scores`);
    - ``path``: one row per step (step 0: nothing ablated; then one per head tried, in order of score):
      ``step``, ``layer``, ``head``, ``score``, ``kept``, ``clean_accuracy``, ``attacked_accuracy``,
      ``attack_success_rate``, ``written_probability`` (fractions; the last: the written class's mean
      zero-shot probability on the attacked images; for a head not kept, the figures with it added,
      before it was dropped again);
    - ``means``: each kept head's mean output over the reference images, ``(tokens, width)``;
    - ``clean_budget``, ``max_heads``, ``where``: the search's settings; ``classes``, ``templates``,
      ``model``: its zero-shot task and the model's id; ``n_images``: images searched on.
    """

    heads: list[Head]
    scores: torch.Tensor
    path: Any
    means: dict[Head, torch.Tensor] = field(repr=False)
    clean_budget: float
    max_heads: int
    where: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    model: str
    n_images: int

    @property
    def baseline(self) -> dict[str, float]:
        """Clean accuracy, attacked accuracy and attack success of the unablated model (step 0)."""
        row = self.path.iloc[0]
        return {k: float(row[k]) for k in FIGURES}

    @property
    def final(self) -> dict[str, float]:
        """The same figures with every kept head ablated (the last kept step, else step 0)."""
        kept = self.path[self.path["kept"]]
        row = kept.iloc[-1] if len(kept) else self.path.iloc[0]
        return {k: float(row[k]) for k in FIGURES}

    def to_frame(self):
        """The greedy path (see the class docstring), one row per step."""
        return self.path

    def scores_frame(self):
        """One row per head: ``layer``, ``head``, ``score`` (cosine units), ``kept``; highest score first."""
        import pandas as pd
        layers, count = self.scores.shape
        rows = [{"layer": l, "head": h, "score": float(self.scores[l, h]), "kept": (l, h) in self.heads}
                for l in range(layers) for h in range(count)]
        return pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True)

    def defence(self, name: str = "head ablation") -> "HeadAblationDefence":
        """This circuit as a :class:`HeadAblationDefence` (same as :meth:`HeadAblationDefence.from_circuit`)."""
        return HeadAblationDefence.from_circuit(self, name=name)

    def plot(self):
        """Left: the layers x heads grid of scores, kept heads boxed. Right: clean accuracy and attack
        success along the greedy path, kept steps filled, with the clean-accuracy floor; returns the figure."""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
        values = self.scores.numpy()
        lim = float(abs(values).max()) or 1.0
        shown = left.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for layer, head in self.heads:
            left.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2, ec="black"))
        left.set_xlabel("head")
        left.set_ylabel("layer")
        left.set_xticks(range(values.shape[1]))
        left.set_yticks(range(values.shape[0]))
        left.set_title("typographic score (kept heads boxed)", fontsize=9)
        fig.colorbar(shown, ax=left, label="cosine units")
        path = self.path
        steps = path["step"].to_numpy()
        kept = path["kept"].to_numpy().astype(bool)
        kept[0] = True
        last_kept = kept.cumsum() - 1  # index, among the kept steps, of the set in force after each step
        for column, colour, label in (("clean_accuracy", "tab:green", "clean accuracy"),
                                      ("attack_success_rate", "tab:red", "attack success"),
                                      ("written_probability", "tab:purple", "p(written class)")):
            y = path[column].to_numpy(dtype=float)
            right.plot(steps, y[kept][last_kept], color=colour, lw=1.2, drawstyle="steps-post")
            right.scatter(steps[kept], y[kept], color=colour, label=label, zorder=3)
            right.scatter(steps[~kept], y[~kept], facecolors="none", edgecolors=colour, zorder=3)
        right.axhline(self.baseline["clean_accuracy"] - self.clean_budget, color="tab:green", ls=":", lw=1,
                      label="clean accuracy floor")
        names = ["none"] + [f"L{l}H{h}" for l, h in zip(path["layer"][1:], path["head"][1:])]
        right.set_xticks(steps, names, rotation=45, ha="right", fontsize=7)
        right.set_ylim(-0.02, 1.02)
        right.set_xlabel("head tried (filled: kept; hollow: dropped again; line: the kept set)")
        right.set_title(f"greedy path: {len(self.heads)} head(s) kept, budget {self.clean_budget:g}", fontsize=9)
        right.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        base, final = self.baseline, self.final
        heads = ", ".join(f"L{l}H{h}" for l, h in self.heads) or "none"
        return (f"<p>Typographic circuit of {esc(self.model)} on {self.n_images} image pairs: heads {esc(heads)}. "
                f"Clean accuracy {base['clean_accuracy']:.3f} &rarr; {final['clean_accuracy']:.3f} (budget "
                f"{self.clean_budget:g}), attack success {base['attack_success_rate']:.3f} &rarr; "
                f"{final['attack_success_rate']:.3f}.</p>"
                f'<img src="{png_uri(figure_png(self.plot(), dpi=80))}"/>'
                + self.path.to_html(index=False, float_format=lambda v: f"{v:.4f}"))


def find_circuit(model: ClipModel, clean: Any, attacked: Any, labels: Sequence[str], written: Sequence[str],
                 classes: Sequence[str], *, templates: str | Sequence[str] | None = None, reference: Any = None,
                 clean_budget: float = 0.02, max_heads: int = 8, where: str = "all", batch_size: int = 32,
                 progress: bool | None = None) -> TypographicCircuit:
    """Greedily select the heads whose mean-ablation cuts typographic attack success within a clean budget.

    ``clean`` / ``attacked``: the same images without and with text (PIL images or preprocessed tensors),
    ``labels[i]`` the true class of image ``i`` and ``written[i]`` the class written on it (both among
    ``classes``; prompts from ``templates``). Heads are scored (:func:`typographic_scores`) and tried in
    order of score, those with a positive score only; a head is mean-ablated together with those kept so
    far (its output at ``where``: ``"all"`` tokens or the ``"readout"`` token, replaced by its mean over
    ``reference``, default the clean images) and kept if clean accuracy stays at or above the unablated
    model's minus ``clean_budget`` (an absolute fraction, e.g. 0.02) and the written class's mean probability
    on the attacked images falls (a continuous measure: on a few hundred images attack success, a count of
    top-1 flips, moves by whole images and ties); the search stops when ``max_heads`` are kept. Returns a
    :class:`TypographicCircuit`.
    """
    head_sites(model)
    classes = check_names("classes", classes)
    clean_budget = check_number("clean_budget", clean_budget, low=0.0, high=1.0)
    max_heads = check_int("max_heads", max_heads, low=1)
    where = check_choice("where", where, WHERE)
    batch_size = check_int("batch_size", batch_size, low=1)
    clean_x, attacked_x = _inputs(model, clean, "clean"), _inputs(model, attacked, "attacked")
    check_same_length(clean=clean_x, attacked=attacked_x, labels=labels, written=written)
    truth, target = _class_indices("labels", labels, classes), _class_indices("written", written, classes)
    reference_x = clean_x if reference is None else _inputs(model, reference, "reference")

    scores = typographic_scores(model, clean_x, attacked_x, written, classes, templates=templates,
                                batch_size=batch_size, progress=progress)
    count = model.head_count("visual")
    order = [(int(i) // count, int(i) % count) for i in scores.flatten().argsort(descending=True)
             if scores.flatten()[i] > 0]
    means = head_means(model, order, reference_x, batch_size=batch_size, progress=False)
    scoring = _Scoring(model, model.class_embeddings(classes, templates), clean_x, attacked_x,
                       truth, target, batch_size)
    first = scoring.measure([], means, where)
    rows = [{"step": 0, "layer": None, "head": None, "score": math.nan, "kept": False, **first}]
    floor, current, kept = first["clean_accuracy"] - clean_budget, first, []
    for head in progress_bar(order, progress, len(order) > 1, "circuit search"):
        if len(kept) == max_heads:
            break
        figures = scoring.measure(kept + [head], means, where)
        keep = figures["clean_accuracy"] >= floor - 1e-9 and \
            figures["written_probability"] < current["written_probability"]
        if keep:
            kept.append(head)
            current = figures
        rows.append({"step": len(rows), "layer": head[0], "head": head[1], "score": float(scores[head]),
                     "kept": keep, **figures})
    import pandas as pd
    path = pd.DataFrame(rows).astype({"layer": "Int64", "head": "Int64", "kept": bool})
    return TypographicCircuit(kept, scores, path, {h: means[h] for h in kept}, clean_budget, max_heads, where,
                              tuple(classes), tuple(model.classifier(classes, templates).templates), model.id,
                              len(truth))


# ---------------------------------------------------------------------------------------------- defence
@dataclass(eq=False)
class HeadAblationDefence(Defence):
    """Mean-ablate attention heads of the image tower while the model encodes (Dyslexify's defence).

    ``heads``: ``(layer, head)`` pairs; ``means``: ``{(layer, head): (tokens, width)}`` float tensors, each
    head's output averaged over clean reference images (:func:`head_means`); ``where``: ``"all"`` tokens
    or the ``"readout"`` token. ``model``: the id of the model the means come from (informational; a
    defence used on a model whose head sites have other shapes is refused). Build one with
    :meth:`fit`, :meth:`from_circuit`, :meth:`from_heads` or :meth:`load`. An empty ``heads`` list is a
    valid defence that changes nothing (a search that could keep no head within its budget).
    """

    heads: Sequence[Head]
    means: Mapping[Head, torch.Tensor] = field(repr=False)
    where: str = "all"
    model: str | None = None
    name: str = "head ablation"
    circuit: TypographicCircuit | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.heads = check_heads("heads", self.heads)
        self.where = check_choice("where", self.where, WHERE)
        if not isinstance(self.means, Mapping):
            raise InvalidArgumentError("means", self.means, "a dict {(layer, head): (tokens, width) tensor}")
        means = {}
        for head in self.heads:
            value = self.means.get(head)
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or not torch.isfinite(value).all():
                raise InvalidArgumentError("means", f"<{head}: {_describe_value(value)}>",
                                           "one finite (tokens, width) tensor per head (head_means(...))")
            means[head] = value.detach().float().cpu()
        self.means = means

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_circuit(cls, circuit: TypographicCircuit, *, name: str = "head ablation") -> "HeadAblationDefence":
        """The defence that mean-ablates ``circuit``'s heads, with the means its search used."""
        if not isinstance(circuit, TypographicCircuit):
            raise InvalidArgumentError("circuit", circuit, "a TypographicCircuit (find_circuit(...))")
        return cls(list(circuit.heads), dict(circuit.means), circuit.where, circuit.model, name, circuit)

    @classmethod
    def from_heads(cls, model: ClipModel, heads: Sequence[Head], reference: Any, *, where: str = "all",
                   name: str = "head ablation", batch_size: int = 64,
                   progress: bool | None = None) -> "HeadAblationDefence":
        """Mean-ablate the given ``(layer, head)`` pairs, with means over the ``reference`` images (clean PIL
        images or a preprocessed tensor). Heads out of range for ``model`` raise
        :class:`~clipscope.validate.InvalidArgumentError`."""
        means = head_means(model, heads, reference, batch_size=batch_size, progress=progress)
        return cls(list(means), means, where, model.id, name)

    @classmethod
    def fit(cls, model: ClipModel, images: Sequence[Image.Image], labels: Sequence[str], classes: Sequence[str], *,
            attack_words: Sequence[str] | None = None, templates: str | Sequence[str] | None = None,
            clean_budget: float = 0.02, max_heads: int = 8, seed: int = 0, style: TextStyle | None = None,
            position: Position = "random", where: str = "all", name: str = "head ablation",
            progress: bool | None = None) -> "HeadAblationDefence":
        """Find the typographic circuit of ``model`` on ``images`` and return the defence that ablates it.

        ``images``: clean PIL images with their true class names ``labels`` (among ``classes``). Each image
        gets a wrong class written on it, drawn (seeded by ``seed`` and its position) from ``attack_words``
        (a subset of ``classes``; default all of them), rendered in ``style`` (default
        :class:`~clipscope.typographic.render.TextStyle`) at ``position``; then :func:`find_circuit` runs
        with ``clean_budget`` and ``max_heads``, means over the clean ``images``. The search is kept in
        the defence's ``circuit``.
        """
        classes = check_names("classes", classes, min_count=2)
        words = classes if attack_words is None else check_names("attack_words", attack_words)
        outside = [w for w in words if w not in classes]
        if outside:
            raise InvalidArgumentError("attack_words", outside, f"class names (the written class must be one of "
                                                                f"{classes} for attack success to be measured)")
        seed = check_int("seed", seed)
        style = TextStyle() if style is None else style
        if not isinstance(style, TextStyle):
            raise InvalidArgumentError("style", style, "a TextStyle or None")
        position = check_position("position", position)
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images or \
                not all(isinstance(im, Image.Image) for im in images):
            raise InvalidArgumentError("images", images, "a non-empty list of PIL images (text is drawn on them)")
        check_same_length(images=images, labels=labels)
        _class_indices("labels", labels, classes)
        written = []
        for i, label in enumerate(labels):
            choices = [w for w in words if w != label]
            if not choices:
                raise InvalidArgumentError("attack_words", words, f"at least one word other than the label {label!r}")
            written.append(random.Random(f"{seed}:{i}").choice(choices))
        attacked = [render_text(im, w, style, position, seed=seed * 1_000_003 + i).image
                    for i, (im, w) in enumerate(zip(images, written))]
        circuit = find_circuit(model, list(images), attacked, list(labels), written, classes, templates=templates,
                               clean_budget=clean_budget, max_heads=max_heads, where=where, progress=progress)
        return cls.from_circuit(circuit, name=name)

    # -- the Defence hooks ---------------------------------------------------------------------------
    def context(self, model: ClipModel) -> contextlib.AbstractContextManager:
        """Mean-ablate the heads while ``model`` encodes; raises
        :class:`~clipscope.validate.InvalidArgumentError` if ``model`` does not have them."""
        self.check(model)
        return _ablation(model, self.heads, self.means, self.where)

    def check(self, model: Any) -> None:
        """Raise :class:`~clipscope.validate.InvalidArgumentError` unless ``model`` is a ViT with head-level
        sites that has every head of this defence, with outputs of the means' shape."""
        sites = head_sites(model)
        check_heads("heads", self.heads, len(sites), model.head_count("visual"))
        for head, value in self.means.items():
            tokens, _, width = model.site(sites[head[0]]).shape
            if tuple(value.shape) != (tokens, width):
                raise InvalidArgumentError("model", model.name, f"a model whose head outputs are ({tuple(value.shape)})"
                                           f" per image, as for the model the means come from ({self.model}); "
                                           f"{sites[head[0]]} gives ({tokens}, {width})")

    def describe(self) -> str:
        """What the defence does, with a digest of its means (clean scores are matched on this text)."""
        listing = ", ".join(f"L{l}H{h}" for l, h in self.heads) or "no heads"
        where = "every token" if self.where == "all" else "the readout token"
        digest = hashlib.sha256()
        for head in self.heads:
            digest.update(self.means[head].detach().float().cpu().contiguous().numpy().tobytes())
        return (f"{self.name}: mean-ablation of {len(self.heads)} head(s) at {where}: {listing} "
                f"(means {digest.hexdigest()[:12]})")

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the defence to the folder ``path`` (created if missing): ``head_ablation.json`` (heads,
        settings, model id, the means' SHA-256) and ``head_ablation.safetensors`` (the means), each
        atomically, the JSON last. Returns the folder."""
        from safetensors.torch import save as st_save
        folder = Path(path)
        tensors = {f"layer{l}.head{h}": self.means[(l, h)].contiguous() for l, h in self.heads}
        data = st_save(tensors) if tensors else st_save({"empty": torch.zeros(0)})
        write_bytes_atomic(folder / MEANS_FILE, data)
        config = {"format": FORMAT, "version": VERSION, "name": self.name, "where": self.where, "model": self.model,
                  "heads": [list(h) for h in self.heads], "means_sha256": hashlib.sha256(data).hexdigest()}
        write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=1))
        return folder

    @classmethod
    def load(cls, path: str | Path, model: ClipModel) -> "HeadAblationDefence":
        """Read a defence written by :meth:`save` from the folder ``path`` and check it fits ``model``
        (:meth:`check`); a different model id than the one it was fitted on only warns. Raises
        :class:`~clipscope.validate.InvalidArgumentError` for a missing, damaged or foreign file."""
        from safetensors.torch import load as st_load
        folder = Path(path)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            data = (folder / MEANS_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError("path", str(path), f"a folder written by HeadAblationDefence.save ({exc})") \
                from None
        if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
            raise InvalidArgumentError("path", str(path), f"a folder written by HeadAblationDefence.save "
                                                          f"(format {FORMAT!r}, version {VERSION})")
        if hashlib.sha256(data).hexdigest() != config.get("means_sha256"):
            raise InvalidArgumentError("path", str(path), f"{MEANS_FILE} as saved with {CONFIG_FILE} (its SHA-256 "
                                                          "differs: the pair was damaged or mixed up)")
        tensors = st_load(data)
        heads = check_heads("heads", [tuple(h) for h in config.get("heads", [])])
        try:
            means = {(l, h): tensors[f"layer{l}.head{h}"] for l, h in heads}
        except KeyError as exc:
            raise InvalidArgumentError("path", str(path), f"a means file with every head's tensor ({exc} missing)") \
                from None
        defence = cls(heads, means, config.get("where", "all"), config.get("model"),
                      config.get("name", "head ablation"))
        defence.check(model)
        if defence.model is not None and defence.model != model.id:
            warnings.warn(f"this head-ablation defence was fitted on {defence.model}; using it on {model.id}",
                          UserWarning, stacklevel=2)
        return defence


def _describe_value(value: Any) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
