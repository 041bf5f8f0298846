"""CLIP-Dissect concept labels for units (Oikarinen & Weng, ICLR 2023).

Given a probe image set D and a concept list T, the activation matrix ``A`` (images x
units, each unit's activation pooled per image by :func:`pooled`: the spatial mean of a conv
map) is compared with the model's own image-text similarity ``P`` (images x concepts, cosine
similarities of image and concept embeddings; by default a concept is embedded as the bare word,
as in the reference). Each (unit, concept) pair gets a score:

- ``"soft_wpmi"`` (the paper's best): ``p(t|x) = softmax(a * P)`` over concepts; the unit's
  ``top_k`` most activating images form a soft set B_k with membership falling linearly
  from ``p_start`` to ``p_end`` by rank; ``log p(t|B_k) = sum_{x in B_k} log(1 - p(x in B_k) (1 - p(t|x)))``;
  the score is ``log p(t|B_k) - lam * log p(t)`` with ``log p(t)`` the log-mean of
  ``p(t|B_k)`` over all units of the site (as in the reference implementation).
- ``"cos_cubed"``: cosine similarity between the centred, element-wise cubed columns of
  ``A`` and ``P`` (the paper's simple baseline; cubing emphasizes the top images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..prompts import resolve_templates
from ..validate import InvalidArgumentError, check_choice, check_int, check_names, check_number

METHODS = ("soft_wpmi", "cos_cubed")
POOLINGS = ("reference", "model")
BARE = "{}"  # the concept word itself as the text, as CLIP-Dissect embeds concepts


def soft_wpmi(P: torch.Tensor, A: torch.Tensor, *, top_k: int = 100, a: float = 10.0, lam: float = 1.0,
              p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7) -> torch.Tensor:
    """SoftWPMI scores ``(n_units, n_concepts)`` from ``P`` (images x concepts) and ``A`` (images x units)."""
    probs = torch.softmax(a * P.double(), dim=1)
    k = min(top_k, A.shape[0])
    top = torch.topk(A.double(), k=k, dim=0).indices              # (k, units)
    member = (p_start - torch.arange(k, dtype=torch.float64) / k * (p_start - p_end)).unsqueeze(1)  # (k, 1)
    log_given = torch.stack([torch.log(1 + member * (probs[top[:, u]] - 1) + min_prob).sum(dim=0)
                             for u in range(A.shape[1])])          # (units, concepts)
    log_prior = torch.logsumexp(log_given, dim=0, keepdim=True) - np.log(log_given.shape[0])
    return (log_given - lam * log_prior).float()


def cos_cubed(P: torch.Tensor, A: torch.Tensor, min_norm: float = 1e-3) -> torch.Tensor:
    """Cosine similarity of centred, cubed columns, ``(n_units, n_concepts)``."""
    p = (P.double() - P.double().mean(0, keepdim=True)) ** 3
    x = (A.double() - A.double().mean(0, keepdim=True)) ** 3
    p = p / p.norm(dim=0, keepdim=True).clamp_min(min_norm)
    x = x / x.norm(dim=0, keepdim=True).clamp_min(min_norm)
    return (x.T @ p).float()


@dataclass
class UnitLabels:
    """Concept scores of units of one site.

    ``scores`` is ``(n_units_labelled, n_concepts)``; ``labels[unit]`` lists the ``top``
    best ``(concept, score)`` pairs, best first. ``n_images`` probe images were read;
    ``skipped`` lists ``(key, reason)`` for the unreadable ones. ``templates`` embedded the
    concepts and ``pooling`` pooled the activations (see :func:`label_units`).
    """

    site: str
    units: list[int]
    concepts: list[str]
    scores: np.ndarray
    method: str
    top_n: int
    n_images: int
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    templates: tuple[str, ...] = (BARE,)
    pooling: str = "reference"

    @property
    def labels(self) -> dict[int, list[tuple[str, float]]]:
        return {u: self.top(u) for u in self.units}

    def top(self, unit: int, n: int | None = None, among: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Best concepts of ``unit`` (optionally only those in ``among``), best first."""
        if unit not in self.units:
            raise ValueError(f"unit {unit} was not labelled; labelled units: {self.units[:20]}"
                             f"{' ...' if len(self.units) > 20 else ''}")
        row = self.scores[self.units.index(unit)]
        keep = range(len(self.concepts))
        if among is not None:
            unknown = [c for c in among if c not in self.concepts]
            if unknown:
                raise ValueError(f"concepts {unknown} were not scored; scored concepts: {self.concepts}")
            keep = [self.concepts.index(c) for c in among]
        order = sorted(keep, key=lambda j: -row[j])[: (n or self.top_n)]
        return [(self.concepts[j], float(row[j])) for j in order]

    def to_frame(self):
        """DataFrame, one row per unit: ``label`` (best concept), its ``score`` and the ``top`` list."""
        import pandas as pd
        rows = []
        for u in self.units:
            best = self.top(u)
            rows.append({"site": self.site, "unit": u, "label": best[0][0], "score": best[0][1],
                         "top": ", ".join(f"{c} ({s:.2f})" for c, s in best)})
        return pd.DataFrame(rows).set_index(["site", "unit"])

    def plot(self, unit: int, n: int = 10, ax=None):
        """Bar chart of ``unit``'s ``n`` best concepts; returns the figure."""
        from .plots import ranked_bars
        return ranked_bars(self.top(unit, n), xlabel=f"{self.method} score", title=f"{self.site} unit {unit}",
                           color="tab:green", ax=ax)

    def _repr_html_(self) -> str:
        import html
        setting = html.escape(f"{self.method}, templates {list(self.templates)}, {self.pooling} pooling")
        return (f"<p>UnitLabels ({setting}): {len(self.units)} units of {self.site}, "
                f"{len(self.concepts)} concepts, {self.n_images} probe images"
                + (f", {len(self.skipped)} unreadable skipped" if self.skipped else "") + "</p>"
                + self.to_frame().head(30).to_html(float_format=lambda v: f"{v:.3f}"))


def pooled(model, site: str, acts: torch.Tensor, pooling: str = "reference") -> torch.Tensor:
    """Every unit's activation per image, ``(B, n_units)``, from ``model``'s canonical ``acts`` at ``site``.

    ``"reference"`` pools as CLIP-Dissect's reference code does (``utils.get_activation``, mode
    ``avg``, in github.com/Trustworthy-ML-Lab/CLIP-dissect): the spatial mean of a conv map, the
    first token of an image-tower token sequence (a CLIP ViT's class token; as ``"model"`` for a
    tower without one), a vector as it is. ``"model"`` reads units as everything else in clipscope
    does (:meth:`~clipscope.ClipModel.unit_values`, tokens pooled as ``model.token_pool`` says).
    """
    info = model.site(site)
    if pooling == "reference" and info.layout == "tokens" and info.tower == "visual" and model.prefix_tokens > 0:
        return acts[:, 0]
    return model.unit_values(site, acts)


def _check_label_args(model, site: str, concepts: Any, units: Any, method: str, pooling: str):
    """Return ``(site info, concepts list, unit list)``; raise InvalidArgumentError naming a bad argument."""
    check_choice("method", method, METHODS)
    check_choice("pooling", pooling, POOLINGS)
    s = model.site(site)
    if s.tower != "visual":
        raise InvalidArgumentError("site", site, f"an image-tower site (label_units labels image units; this one is in "
                                                 f"the {s.tower} tower)")
    concepts = check_names("concepts", concepts, min_count=2)
    unit_list = list(range(s.n_units)) if units is None else [int(u) for u in units]
    bad = [u for u in unit_list if not 0 <= u < s.n_units]
    if bad:
        raise InvalidArgumentError("units", bad[:10], f"unit indices of {site!r}, 0..{s.n_units - 1}")
    return s, concepts, unit_list


def label_units(model, site: str, probe_images, concepts: Sequence[str], *, units: Sequence[int] | None = None,
                top: int = 5, method: str = "soft_wpmi", templates: str | Sequence[str] | None = BARE,
                pooling: str = "reference", top_k: int = 100, a: float = 10.0, lam: float = 1.0,
                batch_size: int = 64, progress: bool | None = None) -> UnitLabels:
    """Label units of ``site`` with ``concepts`` by CLIP-Dissect; returns :class:`UnitLabels`.

    The defaults reproduce CLIP-Dissect (Oikarinen & Weng, ICLR 2023; reference code
    github.com/Trustworthy-ML-Lab/CLIP-dissect, ``utils.py`` and ``similarity.py``): each concept is
    embedded as the bare word (``templates="{}"``; the reference tokenizes ``"{}".format(word)``),
    a unit's activation on an image is pooled as :func:`pooled` ``"reference"`` says (the spatial mean
    of a conv map), and the score is SoftWPMI, the reference's default similarity. ``templates=None``
    embeds concepts with the model's default prompt templates (clipscope's default before; on the
    organism it changes the top label of most units), a list or set name as in
    :meth:`~clipscope.ClipModel.class_embeddings`. ``pooling="model"`` reads units as the rest of clipscope does (``model.token_pool``).

    ``probe_images``: anything ``model.embed`` takes (PIL images, paths, a folder, a ``datasets``
    table); unreadable images are skipped and listed in the result's ``skipped``.
    ``units``: channel/feature indices to label (default all). ``top_k``, ``a`` (softmax scale)
    and ``lam`` are SoftWPMI's parameters. Bad arguments raise
    :class:`~clipscope.validate.InvalidArgumentError` naming them.
    """
    s, concepts, unit_list = _check_label_args(model, site, concepts, units, method, pooling)
    top, top_k = check_int("top", top, low=1), check_int("top_k", top_k, low=1)
    a, lam = check_number("a", a, low=0, low_open=True), check_number("lam", lam)
    templates = resolve_templates(templates, model.default_templates)
    with torch.no_grad(), model.capture(site) as acts:
        embedded = model.embed(probe_images, batch_size=batch_size, progress=progress, desc="label units")
    if len(embedded.keys) < 2:
        raise InvalidArgumentError("probe_images", probe_images,
                                   f"at least two readable images ({len(embedded.keys)} read, "
                                   f"{len(embedded.skipped)} unreadable)")
    A = pooled(model, site, acts[site], pooling).float().cpu()
    P = embedded.embeddings @ model.class_embeddings(concepts, templates).float().cpu().T  # cosine similarities
    if method == "soft_wpmi":
        scores = soft_wpmi(P, A, top_k=top_k, a=a, lam=lam)   # prior over all units of the site
    else:
        scores = cos_cubed(P, A)
    scores = scores[unit_list].numpy()
    return UnitLabels(site, unit_list, concepts, scores, method, top, A.shape[0], list(embedded.skipped),
                      templates, pooling)
