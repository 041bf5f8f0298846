"""Which pixels drive an image-text match: captum attributions of CLIP's image-text score.

    from clipscope.attribution import attribute_match
    a = attribute_match(model, "apple_ipod.jpg", ["Granny Smith", "iPod"], target="iPod")
    a.plot()                          # image, attribution map, overlay
    a.mass_in((40, 150, 180, 200))    # share of the positive attribution inside a pixel box

The attributed function is computed from the image *as the model sees it* (resized, centre-cropped,
values in [0, 1]; the model's own normalization is part of the function), so attributions are per
input pixel and channel, in units of the score:

- one text: the **cosine similarity** between the image embedding and the text's (prompt-ensembled)
  embedding;
- several texts: the zero-shot **probability** of ``target`` among them,
  ``softmax(logit_scale * cos)``, so an attribution says what pushes the image towards ``target``
  *and away from the other texts*.

Methods wrap captum, one class each (default ``"occlusion"``: on the organism it is the method whose
maps separate an attacking word from the object, measured in ``tests/test_attribution.py``; gradient
maps of a small 64 px ResNet are noisy): ``"integrated_gradients"`` (path integral from a baseline
image; the attributions sum to ``score - baseline_score``), ``"saliency"`` (absolute gradient),
``"input_x_gradient"``, ``"smoothgrad"`` (captum's ``NoiseTunnel`` over saliency) and
``"occlusion"`` (the score's drop when a patch is replaced by the baseline).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["METHODS", "Attribution", "attribute_match"]

#: Method name -> what it computes.
METHODS = {
    "integrated_gradients": "integrated gradients from the baseline (attributions sum to score - baseline score)",
    "saliency": "absolute gradient of the score",
    "input_x_gradient": "input times gradient",
    "smoothgrad": "saliency averaged over noisy copies of the image (captum NoiseTunnel)",
    "occlusion": "drop of the score when a patch is replaced by the baseline",
}
BASELINES = ("black", "grey", "blur")


@dataclass
class Attribution:
    """Result of :func:`attribute_match`.

    - ``attributions``: float32 ``(3, H, W)`` on the CPU, per input pixel and channel, in units of
      the score (``H, W`` = the model's input size);
    - ``image``: float32 ``(3, H, W)`` in [0, 1], the image as the model saw it;
    - ``texts`` / ``target``: the texts scored and the one attributed;
    - ``objective``: ``"similarity"`` (cosine, one text) or ``"probability"`` (of ``target``);
    - ``score``: the objective on ``image``; ``baseline_score``: on the baseline (``nan`` for
      methods without one); ``delta``: integrated gradients' completeness error
      (``sum(attributions) - (score - baseline_score)``), ``nan`` for other methods.
    """

    attributions: torch.Tensor
    image: torch.Tensor
    texts: list[str]
    target: str
    method: str
    objective: str
    score: float
    baseline_score: float = float("nan")
    delta: float = float("nan")

    @property
    def map(self) -> torch.Tensor:
        """The attribution summed over colour channels, float32 ``(H, W)``."""
        return self.attributions.sum(dim=0)

    def mass_in(self, box: tuple[int, int, int, int]) -> float:
        """Share (0..1) of the positive attribution that lies inside the pixel box
        ``(left, top, right, bottom)`` (right/bottom exclusive), in the model's input coordinates;
        NaN when the map has no positive attribution at all."""
        left, top, right, bottom = (int(v) for v in box)
        positive = self.map.clamp(min=0)
        total = float(positive.sum())
        if total == 0:
            return float("nan")
        return float(positive[max(top, 0):bottom, max(left, 0):right].sum()) / total

    def to_frame(self):
        """One row: method, objective, target, score, baseline score, completeness delta, positive/negative sums."""
        import pandas as pd
        m = self.map
        return pd.DataFrame([{"method": self.method, "objective": self.objective, "target": self.target,
                              "score": self.score, "baseline_score": self.baseline_score, "delta": self.delta,
                              "positive": float(m.clamp(min=0).sum()), "negative": float(m.clamp(max=0).sum())}])

    def plot(self, axes=None, title: str | None = None):
        """Three panels: the image, the signed attribution map, and the positive part over the image;
        returns the figure."""
        import matplotlib.pyplot as plt
        if axes is None:
            fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.0))
        else:
            fig = axes[0].figure
        img = self.image.permute(1, 2, 0).clamp(0, 1).numpy()
        m = self.map.numpy()
        lim = float(abs(m).max()) or 1.0
        axes[0].imshow(img)
        axes[0].set_title("image", fontsize=8)
        axes[1].imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
        axes[1].set_title(f"{self.method}", fontsize=8)
        axes[2].imshow(img)
        pos = m.clip(min=0)
        axes[2].imshow(pos / (pos.max() or 1.0), cmap="magma", alpha=0.6)
        axes[2].set_title("positive part, over the image", fontsize=8)
        for ax in axes:
            ax.axis("off")
        what = "similarity" if self.objective == "similarity" else "P"
        fig.suptitle(title or f"{what}({self.target!r}) = {self.score:.3f}", fontsize=9)
        return fig

    def _repr_html_(self) -> str:
        import matplotlib.pyplot as plt
        fig = self.plot()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        return (f'<img src="data:image/png;base64,{png}"/><p>{html.escape(self.method)} attribution of the '
                f"{html.escape(self.objective)} of {html.escape(repr(self.target))} among "
                f"{html.escape(', '.join(map(repr, self.texts)))}: score {self.score:.4g}</p>")


def _model_pixels(model, image: Any) -> torch.Tensor:
    """The image as the model sees it, ``(1, 3, H, W)`` in [0, 1] (the model's preprocessing, un-normalized)."""
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        if x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected one (3, H, W) image tensor in [0, 1]; got shape {tuple(image.shape)}")
        if tuple(x.shape[-2:]) != tuple(model.image_size):
            x = F.interpolate(x.float(), size=tuple(model.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x.float().clamp(0, 1)
    from .data import load_image
    normalized = model.preprocess(load_image(image)).unsqueeze(0).float()
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std).view(1, 3, 1, 1)
    return (normalized * std + mean).clamp(0, 1)


def _baseline(kind: str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(kind, torch.Tensor):
        b = kind.to(x.device, x.dtype)
        return b if b.ndim == 4 else b.unsqueeze(0)
    if kind == "black":
        return torch.zeros_like(x)
    if kind == "grey":
        return torch.full_like(x, 0.5)
    if kind == "blur":
        k = max(3, (min(x.shape[-2:]) // 8) | 1)
        return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="reflect"), k, stride=1)
    raise ValueError(f"unknown baseline {kind!r}; valid: {list(BASELINES)} or a (3, H, W) tensor")


def attribute_match(model, image: Any, texts: str | Sequence[str], *, target: str | None = None,
                    method: str = "occlusion", templates: str | Sequence[str] | None = None,
                    baseline: str | torch.Tensor = "grey", n_steps: int = 32, internal_batch_size: int = 16,
                    window: int | None = None, stride: int | None = None, n_samples: int = 16,
                    noise: float = 0.1, seed: int = 0) -> Attribution:
    """Attribute an image-text score to the image's pixels; returns an :class:`Attribution`.

    - ``image``: a PIL image, a path, or a ``(3, H, W)`` tensor in [0, 1];
    - ``texts``: one text (the score is the cosine similarity) or several (the score is the
      zero-shot probability of ``target``, default: the model's top prediction among them);
      texts are embedded with ``templates`` like class names (``model.class_embeddings``;
      ``("{}",)`` embeds them as written);
    - ``method``: one of :data:`METHODS`; ``baseline``: ``"grey"`` (default, mid-grey), ``"black"``,
      ``"blur"`` or a tensor (integrated gradients' start and occlusion's fill);
    - ``n_steps`` / ``internal_batch_size``: integrated gradients' path steps and batch;
    - ``window`` / ``stride``: occlusion patch side and step in pixels (default: 1/8 and 1/16 of
      the input size); ``n_samples`` / ``noise`` (std in [0, 1] pixel units): smoothgrad.

    The model runs in its own precision: on a GPU model loaded in fp16 (``precision="auto"``),
    score changes below fp16's resolution (about 1e-3) round to zero, and an occlusion map of a
    weak match can be all zeros. Load with ``precision="fp32"`` for attribution of small effects.
    """
    from captum.attr import IntegratedGradients, InputXGradient, NoiseTunnel, Occlusion, Saliency

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("texts must be one non-empty string or a list of them")
    with torch.no_grad():
        text_emb = model.class_embeddings(texts, templates).to(model.device).float()   # (T, D), unit norm
    mean = torch.tensor(model.image_mean, device=model.device).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std, device=model.device).view(1, 3, 1, 1)
    x = _model_pixels(model, image).to(model.device)

    def similarities(pixels: torch.Tensor) -> torch.Tensor:
        emb = model.encode_image(((pixels - mean) / std).to(model.dtype), normalize=True).float()
        return emb @ text_emb.T                                                          # (B, T)

    with torch.no_grad():
        first = similarities(x)[0]
    if target is None:
        target = texts[int(first.argmax())]
    if target not in texts:
        raise ValueError(f"target {target!r} is not among the texts {texts}")
    j = texts.index(target)
    objective = "similarity" if len(texts) == 1 else "probability"

    def score(pixels: torch.Tensor) -> torch.Tensor:
        sims = similarities(pixels)
        if objective == "similarity":
            return sims[:, j]
        return torch.softmax(model.logit_scale * sims, dim=1)[:, j]

    base = _baseline(baseline, x)
    with torch.no_grad():
        value = float(score(x)[0])
        base_value = float(score(base)[0])
    delta = float("nan")
    with torch.enable_grad():
        if method == "integrated_gradients":
            attr, d = IntegratedGradients(score).attribute(x, baselines=base, n_steps=n_steps,
                                                           internal_batch_size=internal_batch_size,
                                                           return_convergence_delta=True)
            delta = float(d.sum())
        elif method == "saliency":
            attr = Saliency(score).attribute(x.clone().requires_grad_(), abs=True)
        elif method == "input_x_gradient":
            attr = InputXGradient(score).attribute(x.clone().requires_grad_())
        elif method == "smoothgrad":
            torch.manual_seed(seed)
            attr = NoiseTunnel(Saliency(score)).attribute(x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=n_samples,
                                                          nt_samples_batch_size=internal_batch_size, stdevs=noise)
        else:  # occlusion
            h, w = model.image_size
            side = window or max(2, min(h, w) // 8)
            step = stride or max(1, side // 2)
            with torch.no_grad():
                attr = Occlusion(score).attribute(x, sliding_window_shapes=(3, side, side), strides=(3, step, step),
                                                  baselines=base, perturbations_per_eval=internal_batch_size)
    if method not in ("integrated_gradients", "occlusion"):
        base_value = float("nan")
    return Attribution(attr[0].detach().float().cpu(), x[0].detach().float().cpu(), texts, target, method,
                       objective, value, base_value, delta)
