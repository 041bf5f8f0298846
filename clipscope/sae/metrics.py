"""How good a sparse autoencoder is: reconstruction, sparsity, latent health and the downstream effect.

:func:`evaluate_sae` makes one streaming pass over an image source and returns an :class:`SAEEvaluation`:

- **explained variance** ``1 - SSE / SST`` over all rows, SST taken around the rows' mean (so a constant
  reconstruction at the mean scores 0);
- **mean L0**, the active latents per row;
- **dead latents** (never active on the evaluation rows) and **dense latents** (active on more than
  ``dense_threshold`` of the rows, 0.1 by default);
- with ``labels`` and ``classes``, the **downstream effect**: zero-shot accuracy with the SAE's reconstruction
  spliced into the forward pass (:func:`splice`, through :meth:`~clipscope.ClipModel.edit`) against the
  original model's, on the same images.
"""
from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clipscope.data import source_length
from clipscope.hooks import feature_first, feature_last
from clipscope.sae.autoencoder import SparseAutoencoder
from clipscope.sae.buffer import check_site, stream_rows
from clipscope.validate import InvalidArgumentError, check_int, check_names, check_number

__all__ = ["SAEEvaluation", "evaluate_sae", "splice"]


@dataclass
class SAEEvaluation:
    """The result of :func:`evaluate_sae`.

    ``explained_variance`` is ``1 - SSE / SST`` over ``n_rows`` rows (SST around their mean); ``mean_l0`` the
    mean number of active latents per row; ``firing_rate`` ``(F,)`` the fraction of rows on which each latent
    is active; ``dead`` / ``dense`` the latents active on no row / on more than ``dense_threshold`` of them.
    ``accuracy`` and ``accuracy_spliced`` are zero-shot accuracies (fractions in [0, 1]) of the original model
    and of the model with the reconstruction spliced in, on ``n_labelled`` images (``None`` without labels).
    """

    site: str
    activation: str
    n_features: int
    k: int | None
    n_rows: int
    n_images: int
    explained_variance: float
    mean_l0: float
    firing_rate: torch.Tensor = field(repr=False)
    dense_threshold: float
    accuracy: float | None = None
    accuracy_spliced: float | None = None
    n_labelled: int = 0
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def dead(self) -> list[int]:
        """Latents active on no evaluation row."""
        return (self.firing_rate == 0).nonzero().flatten().tolist()

    @property
    def dense(self) -> list[int]:
        """Latents active on more than ``dense_threshold`` of the evaluation rows."""
        return (self.firing_rate > self.dense_threshold).nonzero().flatten().tolist()

    def to_frame(self):
        """One row of figures: explained variance, L0, dead and dense counts and fractions, accuracies."""
        import pandas as pd
        row = {"site": self.site, "activation": self.activation, "n_features": self.n_features, "k": self.k,
               "rows": self.n_rows, "images": self.n_images, "explained_variance": self.explained_variance,
               "mean_l0": self.mean_l0, "dead": len(self.dead), "dead_fraction": len(self.dead) / self.n_features,
               f"dense (>{self.dense_threshold:g})": len(self.dense), "accuracy": self.accuracy,
               "accuracy_spliced": self.accuracy_spliced, "labelled": self.n_labelled}
        return pd.DataFrame([row])

    def _repr_html_(self) -> str:
        title = f"<p><b>SAE evaluation</b> of <code>{html.escape(self.site)}</code>"
        if self.skipped:
            title += f" ({len(self.skipped)} unreadable image(s) skipped)"
        return title + "</p>" + self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.4g}")


def splice(sae: SparseAutoencoder, layout: str, prefix: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit that replaces a site's activation (canonical layout ``layout``) by ``sae``'s reconstruction,
    for :meth:`~clipscope.ClipModel.edit`. Only the rows the SAE was trained on are replaced: a tokens
    SAE trained on ``"patches"`` leaves the first ``prefix`` tokens (class token, registers) as they were,
    one trained on ``"class"`` replaces only token 0. Computed in the SAE's dtype, returned in the site's."""
    def edit(acts: torch.Tensor) -> torch.Tensor:
        view = feature_last(acts, layout)
        rows = view
        if layout == "tokens" and sae.tokens == "patches":
            rows = view[:, prefix:]
        elif layout == "tokens" and sae.tokens == "class":
            rows = view[:, :1]
        rows.copy_(sae(rows.to(sae.W_dec.dtype)).to(rows.dtype))
        return feature_first(view, layout)
    return edit


def evaluate_sae(model, sae: SparseAutoencoder, source: Any, *, labels: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None, templates: str | Sequence[str] | None = None,
                 dense_threshold: float = 0.1, image_batch_size: int = 64,
                 progress: bool | None = None) -> SAEEvaluation:
    """Measure ``sae`` on the rows of its site over ``source`` (one streaming pass); returns an
    :class:`SAEEvaluation`.

    With ``labels`` (one class name per item of ``source``, in order) and ``classes``, also the zero-shot
    accuracy of ``model`` on those images with and without the reconstruction spliced in (``templates`` as
    :meth:`~clipscope.ClipModel.zero_shot` takes them). ``dense_threshold`` is the firing rate (fraction of
    rows) above which a latent counts as dense.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise InvalidArgumentError("sae", sae, "a clipscope.sae.SparseAutoencoder")
    check_site(model, sae.site, sae.tokens)
    dense_threshold = check_number("dense_threshold", dense_threshold, low=0, high=1)
    image_batch_size = check_int("image_batch_size", image_batch_size, low=1)
    if (labels is None) != (classes is None):
        raise InvalidArgumentError("labels" if labels is None else "classes", None,
                                   "given together with " + ("classes" if labels is None else "labels"))
    sums = _reconstruction_sums(model, sae, source, image_batch_size)
    if sums["n"] == 0:
        raise InvalidArgumentError("source", "(no rows)", "a source with at least one readable image")
    n = sums["n"]
    sst = float(sums["sq"] - (sums["sum"].pow(2) / n).sum())
    result = SAEEvaluation(sae.site, sae.activation, sae.n_features, sae.k, n, sums["images"],
                           1 - float(sums["sse"]) / sst if sst > 0 else float("nan"), float(sums["active"]) / n,
                           (sums["fired"].double() / n).float().cpu(), dense_threshold, skipped=sums["skipped"])
    if labels is not None:
        result.accuracy, result.accuracy_spliced, result.n_labelled = _downstream(
            model, sae, source, labels, check_names("classes", classes), templates, image_batch_size, progress)
    return result


@torch.no_grad()
def _reconstruction_sums(model, sae: SparseAutoencoder, source: Any, image_batch_size: int) -> dict[str, Any]:
    """Float64 running sums over the rows: count, sum, sum of squares, squared error, active latents, and how
    many rows each latent fired on."""
    device = sae.W_dec.device
    sums: dict[str, Any] = {"n": 0, "sum": torch.zeros(sae.d_in, dtype=torch.float64, device=device), "sq": 0.0,
                            "sse": 0.0, "active": 0, "fired": torch.zeros(sae.n_features, dtype=torch.long,
                                                                          device=device),
                            "images": 0, "skipped": []}
    for batch in stream_rows(model, source, sae.site, tokens=sae.tokens, image_batch_size=image_batch_size):
        sums["skipped"].extend(batch.skipped)
        sums["images"] = batch.consumed - len(sums["skipped"])
        if batch.rows is None:
            continue
        x = batch.rows.to(device, sae.W_dec.dtype)
        f = sae.encode(x)
        active = f > 0
        sums["n"] += x.shape[0]
        sums["sum"] += x.double().sum(dim=0)
        sums["sq"] += float(x.double().pow(2).sum())
        sums["sse"] += float((sae.decode(f) - x).double().pow(2).sum())
        sums["active"] += int(active.sum())
        sums["fired"] += active.sum(dim=0)
    return sums


def _downstream(model, sae: SparseAutoencoder, source: Any, labels: Sequence[str], classes: list[str],
                templates, image_batch_size: int, progress: bool | None) -> tuple[float, float, int]:
    """Zero-shot accuracy of ``model`` on ``source`` without and with the reconstruction spliced in, and the
    number of images scored."""
    labels = list(labels)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise InvalidArgumentError("labels", unknown[:5], "class names from classes")
    length = source_length(source)
    if length is not None and length != len(labels):
        raise InvalidArgumentError("labels", f"{len(labels)} labels", f"one label per item of source ({length})")
    original = model.zero_shot(source, classes, templates, batch_size=image_batch_size, progress=progress)
    if max(original.positions, default=-1) >= len(labels):
        raise InvalidArgumentError("labels", f"{len(labels)} labels", "one label per item of source")
    info = model.site(sae.site)
    with model.edit(sae.site, splice(sae, info.layout, model.prefix_tokens)):
        spliced = model.zero_shot(source, classes, templates, batch_size=image_batch_size, progress=progress)
    truth = torch.tensor([classes.index(labels[p]) for p in original.positions])
    return (float((original.top1 == truth).float().mean()), float((spliced.top1 == truth).float().mean()),
            len(original.positions))
