"""Which pixels drive an image-text match: captum attributions of CLIP's image-text score.

    from clipscope.attribution import Occlusion, attribute_match
    a = attribute_match(model, "apple_ipod.jpg", ["Granny Smith", "iPod"], target="iPod")
    a.plot()                          # image, attribution map, overlay
    a.mass_in((40, 150, 180, 200))    # share of the positive attribution inside a pixel box
    Occlusion(model, window=16, stride=8).attribute("apple_ipod.jpg", ["Granny Smith", "iPod"])

The attributed function is computed from the image *as the model sees it* (resized, centre-cropped,
values in [0, 1]; the model's own normalization is part of the function), so attributions are per
input pixel and channel, in units of the score:

- one text: the **cosine similarity** between the image embedding and the text's (prompt-ensembled)
  embedding;
- several texts: the zero-shot **probability** of ``target`` among them (the model's
  :meth:`~clipscope.model.ClipModel.classifier`, ``softmax(logit_scale * cos)``), so an attribution
  says what pushes the image towards ``target`` *and away from the other texts*.

One class per method, in captum's style (settings when made, ``attribute(image, texts)`` to run),
each wrapping captum's class of the same name: :class:`IntegratedGradients` (path integral from a
baseline image; the attributions sum to ``score - baseline_score``), :class:`Saliency` (absolute
gradient), :class:`InputXGradient`, :class:`SmoothGrad` (captum's ``NoiseTunnel`` over saliency) and
:class:`Occlusion` (the score's drop when a patch is replaced by the baseline). :func:`attribute_match`
is the one-call entry point that picks a class by name. The default is occlusion: on the organism it
is the method whose maps separate an attacking word from the object, measured in
``tests/test_attribution.py``; gradient maps of a small 64 px ResNet are noisy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from .io import figure_png
from .pages import esc, png_uri
from .validate import InvalidArgumentError, check_int, check_names, check_number

if TYPE_CHECKING:
    from .model import ClipModel, ZeroShotClassifier

__all__ = ["BASELINES", "METHODS", "Attribution", "IntegratedGradients", "InputXGradient", "MatchAttribution",
           "Occlusion", "Saliency", "SmoothGrad", "attribute_match"]

#: Baseline images by name (integrated gradients' start and occlusion's fill); a tensor is accepted too.
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
        return (f'<img src="{png_uri(figure_png(self.plot(), dpi=90))}"/><p>{esc(self.method)} attribution of the '
                f"{esc(self.objective)} of {esc(repr(self.target))} among "
                f"{esc(', '.join(map(repr, self.texts)))}: score {self.score:.4g}</p>")


# ---------------------------------------------------------------------------------------
# The attributed function


def _model_pixels(model: ClipModel, image: Any) -> torch.Tensor:
    """The image as the model sees it, ``(1, 3, H, W)`` float32 in [0, 1] on the model's device (the
    model's preprocessing, un-normalized; a tensor in [0, 1] is only resized to the input size)."""
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise InvalidArgumentError("image", f"<tensor of shape {tuple(image.shape)}>",
                                       "a PIL image, a path, or one (3, H, W) image tensor in [0, 1]")
        if tuple(x.shape[-2:]) != tuple(model.image_size):
            x = F.interpolate(x.float(), size=tuple(model.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x.float().clamp(0, 1).to(model.device)
    from .data import load_image
    inputs = model.preprocess(load_image(image)).unsqueeze(0).float()
    return model.unnormalize(inputs).clamp(0, 1).to(model.device)


def _check_baseline(baseline: str | torch.Tensor, model: ClipModel) -> str | torch.Tensor:
    """``baseline`` if it names one of :data:`BASELINES` or is a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor at
    the model's input size."""
    if isinstance(baseline, torch.Tensor):
        shape = tuple(baseline.shape[-3:]) if baseline.ndim in (3, 4) else ()
        if shape != (3, *model.image_size) or (baseline.ndim == 4 and baseline.shape[0] != 1):
            raise InvalidArgumentError("baseline", f"<tensor of shape {tuple(baseline.shape)}>",
                                       f"a (3, {model.image_size[0]}, {model.image_size[1]}) tensor in [0, 1]")
        return baseline
    if isinstance(baseline, str) and baseline in BASELINES:
        return baseline
    raise InvalidArgumentError("baseline", baseline,
                               f"unknown baseline; valid: {list(BASELINES)} or a (3, H, W) tensor in [0, 1]")


def _baseline_pixels(baseline: str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The baseline image for pixels ``x`` ``(1, 3, H, W)``, same shape, device and dtype."""
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(x.device, x.dtype)
        return b if b.ndim == 4 else b.unsqueeze(0)
    if baseline == "black":
        return torch.zeros_like(x)
    if baseline == "grey":
        return torch.full_like(x, 0.5)
    k = max(3, (min(x.shape[-2:]) // 8) | 1)   # blur: a box filter of about 1/8 of the image
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="reflect"), k, stride=1)


@dataclass(frozen=True)
class _MatchScore:
    """Pixels ``(B, 3, H, W)`` in [0, 1] -> the score of text ``index``, float32 ``(B,)``: its cosine
    similarity (``objective="similarity"``) or its zero-shot probability (``"probability"``)."""

    model: ClipModel
    classifier: ZeroShotClassifier
    index: int
    objective: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.of_embeddings(_embed(self.model, pixels))

    def of_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The score of image embeddings ``(B, embed_dim)``, float32 ``(B,)``."""
        if self.objective == "similarity":
            return self.classifier.logits(embeddings)[:, self.index] / self.classifier.logit_scale
        return self.classifier.probs(embeddings)[:, self.index]


def _embed(model: ClipModel, pixels: torch.Tensor) -> torch.Tensor:
    """Image embeddings (not normalized) of pixels ``(B, 3, H, W)`` in [0, 1], one differentiable forward pass."""
    return model.encode_image(model.normalize(pixels).to(model.dtype), normalize=False)


def _resolve_target(classifier: ZeroShotClassifier, first: torch.Tensor, target: str | None) -> int:
    """Index of ``target`` among the classifier's texts (default: the top prediction on embedding ``first``)."""
    texts = list(classifier.classes)
    if target is None:
        return int(classifier.top1(first)[0])
    if target not in texts:
        raise InvalidArgumentError("target", target, f"not among the texts {texts}")
    return texts.index(target)


# ---------------------------------------------------------------------------------------
# Methods


class MatchAttribution:
    """Base of the attribution methods: settings are fixed (and validated) when an object is made;
    :meth:`attribute` runs the method on one image and returns an :class:`Attribution`.

    Subclasses set ``name`` (the key in :data:`METHODS`) and ``description``, set ``baseline`` (through
    ``_check_baseline``) if they use one, and implement ``_run(score, x, base)``, returning the
    ``(1, 3, H, W)`` attributions and the completeness delta (``nan`` where the method has none).
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, model: ClipModel):
        self.model = model
        self.baseline: str | torch.Tensor | None = None

    def attribute(self, image: Any, texts: str | Sequence[str], *, target: str | None = None,
                  templates: str | Sequence[str] | None = None) -> Attribution:
        """Attribute the score of ``target`` among ``texts`` to the pixels of ``image``.

        - ``image``: a PIL image, a path, or a ``(3, H, W)`` tensor in [0, 1] (resized to the model's input);
        - ``texts``: one text (the score is the cosine similarity) or several (the zero-shot probability of
          ``target``, default: the model's top prediction among them), embedded with ``templates`` like class
          names (``("{}",)`` embeds them as written).
        """
        names = check_names("texts", [texts] if isinstance(texts, str) else texts)
        classifier = self.model.classifier(names, templates)
        x = _model_pixels(self.model, image)
        base = None if self.baseline is None else _baseline_pixels(self.baseline, x)
        with torch.no_grad():   # the image and the baseline in one forward pass
            emb = _embed(self.model, x if base is None else torch.cat([x, base]))
        index = _resolve_target(classifier, emb[:1], target)
        score = _MatchScore(self.model, classifier, index, "similarity" if len(names) == 1 else "probability")
        values = score.of_embeddings(emb)
        attr, delta = self._run(score, x, base)
        return Attribution(attr[0].detach().float().cpu(), x[0].detach().float().cpu(), names, names[index],
                           self.name, score.objective, float(values[0]),
                           float(values[1]) if base is not None else float("nan"), delta)

    def _run(self, score: _MatchScore, x: torch.Tensor, base: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        raise NotImplementedError


class IntegratedGradients(MatchAttribution):
    """Integrated gradients from ``baseline`` (a name in :data:`BASELINES` or a tensor) in ``n_steps`` path
    steps, ``batch_size`` images per forward pass; the attributions sum to ``score - baseline_score`` up to
    ``Attribution.delta``. Cost: ``n_steps`` images forward and backward, ``batch_size`` per pass, plus a
    few forward only (the two scores and captum's convergence check)."""

    name = "integrated_gradients"
    description = "integrated gradients from the baseline (attributions sum to score - baseline score)"

    def __init__(self, model: ClipModel, *, baseline: str | torch.Tensor = "grey", n_steps: int = 32,
                 batch_size: int = 16):
        super().__init__(model)
        self.baseline = _check_baseline(baseline, model)
        self.n_steps = check_int("n_steps", n_steps, low=1)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def _run(self, score, x, base):
        from captum.attr import IntegratedGradients as CaptumIG
        with torch.enable_grad():
            attr, delta = CaptumIG(score).attribute(x, baselines=base, n_steps=self.n_steps,
                                                    internal_batch_size=self.batch_size,
                                                    return_convergence_delta=True)
        return attr, float(delta.sum())


class Saliency(MatchAttribution):
    """The absolute gradient of the score with respect to each pixel and channel (one backward pass)."""

    name = "saliency"
    description = "absolute gradient of the score"

    def _run(self, score, x, base):
        from captum.attr import Saliency as CaptumSaliency
        with torch.enable_grad():
            return CaptumSaliency(score).attribute(x.clone().requires_grad_(), abs=True), float("nan")


class InputXGradient(MatchAttribution):
    """The pixels times the gradient of the score (one backward pass)."""

    name = "input_x_gradient"
    description = "input times gradient"

    def _run(self, score, x, base):
        from captum.attr import InputXGradient as CaptumIxG
        with torch.enable_grad():
            return CaptumIxG(score).attribute(x.clone().requires_grad_()), float("nan")


class SmoothGrad(MatchAttribution):
    """Saliency averaged over ``n_samples`` copies of the image with Gaussian noise of std ``noise`` (in
    [0, 1] pixel units), ``batch_size`` copies per pass; ``seed`` seeds torch's generator first, so a map
    is reproducible (captum's ``NoiseTunnel``)."""

    name = "smoothgrad"
    description = "saliency averaged over noisy copies of the image (captum NoiseTunnel)"

    def __init__(self, model: ClipModel, *, n_samples: int = 16, noise: float = 0.1, seed: int = 0,
                 batch_size: int = 16):
        super().__init__(model)
        self.n_samples = check_int("n_samples", n_samples, low=1)
        self.noise = check_number("noise", noise, low=0)
        self.seed = check_int("seed", seed)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def _run(self, score, x, base):
        from captum.attr import NoiseTunnel, Saliency as CaptumSaliency
        torch.manual_seed(self.seed)
        with torch.enable_grad():
            attr = NoiseTunnel(CaptumSaliency(score)).attribute(
                x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=self.n_samples,
                nt_samples_batch_size=self.batch_size, stdevs=self.noise)
        return attr, float("nan")


class Occlusion(MatchAttribution):
    """The drop of the score when a ``window`` x ``window`` patch (all channels) is replaced by ``baseline``,
    the patch moved ``stride`` pixels at a time; each pixel gets the mean drop over the patches covering it.

    ``stride`` is at most ``window`` (captum's rule); where they do not tile the input, the last patch of a
    row or column is cut at the image's edge, so every pixel is covered.

    **Cost.** On an ``H x W`` input the map takes ``P = (ceil((H - window) / stride) + 1) *
    (ceil((W - window) / stride) + 1)`` occluded images (:attr:`positions`), ``batch_size`` per forward
    pass, plus 3 un-occluded ones (the image and the baseline for the scores, in one pass, and captum's
    reference pass): ``P + 3`` images (:meth:`forward_passes`) in ``ceil(P / batch_size) + 2`` calls of the
    image tower.

    **Defaults:** ``window = min(H, W) // 4``, ``stride = window // 2``: ``P = 49`` at 64 px (the organism)
    and at 224 px, 52 images per map. The earlier default (``window = min(H, W) // 8``, same stride rule:
    ``P = 225``, 228 images; the old code ran 229) gave, on the 12 attacked organism images of
    ``tests/test_attribution.py``, text-box shares 0.46 (written shape) vs 0.30 (true shape), object
    shares 0.51 (true) vs 0.26 (written), the written shape more on the text in 8 of 12, and 0.96 of
    the true shape's mass on the object in 12 clean scenes (box area 0.35). The new default: 0.60 vs
    0.30, 0.35 vs 0.16, 8 of 12, and 0.82: the same answers (every assertion holds with a margin) from
    4.4x fewer forward passes, with blockier maps. ``window=8, stride=8`` (64 images) drops to 6 of 12.
    Seconds per map on 2 CPU cores (``bench/attribution_cost.py``, batch 16): organism 0.17 (old default)
    vs 0.046 (new); random-init RN50 at 224 px 28.7 vs 6.0 (on a CPU, RN50 runs no faster per image in
    batches; the organism's small passes run 3-4x faster in batches of 16 than one at a time).
    """

    name = "occlusion"
    description = "drop of the score when a patch is replaced by the baseline"

    def __init__(self, model: ClipModel, *, baseline: str | torch.Tensor = "grey", window: int | None = None,
                 stride: int | None = None, batch_size: int = 16):
        super().__init__(model)
        self.baseline = _check_baseline(baseline, model)
        side = min(model.image_size)
        self.window = max(2, side // 4) if window is None else check_int("window", window, low=1, high=side)
        self.stride = (max(1, self.window // 2) if stride is None
                       else check_int("stride", stride, low=1, high=self.window))
        self.batch_size = check_int("batch_size", batch_size, low=1)

    @property
    def positions(self) -> int:
        """Number of occluded images per map (window positions on the model's input)."""
        h, w = self.model.image_size
        return (-(-(h - self.window) // self.stride) + 1) * (-(-(w - self.window) // self.stride) + 1)

    def forward_passes(self) -> int:
        """Images run through the image tower per :meth:`attribute` call: ``positions + 3``."""
        return self.positions + 3

    def _run(self, score, x, base):
        from captum.attr import Occlusion as CaptumOcclusion
        with torch.no_grad():
            attr = CaptumOcclusion(score).attribute(
                x, sliding_window_shapes=(3, self.window, self.window), strides=(3, self.stride, self.stride),
                baselines=base, perturbations_per_eval=self.batch_size)
        return attr, float("nan")


_CLASSES = (IntegratedGradients, Saliency, InputXGradient, SmoothGrad, Occlusion)
#: Method name -> what it computes (the classes' ``name`` and ``description``).
METHODS = {cls.name: cls.description for cls in _CLASSES}


def attribute_match(model: ClipModel, image: Any, texts: str | Sequence[str], *, target: str | None = None,
                    method: str = "occlusion", templates: str | Sequence[str] | None = None,
                    baseline: str | torch.Tensor = "grey", n_steps: int = 32, batch_size: int = 16,
                    window: int | None = None, stride: int | None = None, n_samples: int = 16,
                    noise: float = 0.1, seed: int = 0) -> Attribution:
    """Attribute an image-text score to the image's pixels with the method named ``method``; returns an
    :class:`Attribution`. Same as ``Occlusion(model, ...).attribute(image, texts, ...)`` and so on.

    - ``image``, ``texts``, ``target``, ``templates``: see :meth:`MatchAttribution.attribute`;
    - ``method``: one of :data:`METHODS`; ``baseline``: ``"grey"`` (default, mid-grey), ``"black"``,
      ``"blur"`` or a tensor (integrated gradients' start and occlusion's fill);
    - ``batch_size``: images per forward pass (occluded copies, path steps, noisy copies);
    - ``n_steps``: integrated gradients' path steps; ``window`` / ``stride``: occlusion's patch side and
      step in pixels (default: 1/4 and 1/8 of the input size; cost in :class:`Occlusion`);
      ``n_samples`` / ``noise`` (std in [0, 1] pixel units) / ``seed``: smoothgrad.

    Settings a method does not use are ignored. The model runs in its own precision: on a GPU model
    loaded in fp16 (``precision="auto"``), score changes below fp16's resolution (about 1e-3) round to
    zero, and an occlusion map of a weak match can be all zeros. Load with ``precision="fp32"`` for
    attribution of small effects.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidArgumentError("method", method, f"{list(METHODS)}")
    settings = {"integrated_gradients": {"baseline": baseline, "n_steps": n_steps, "batch_size": batch_size},
                "smoothgrad": {"n_samples": n_samples, "noise": noise, "seed": seed, "batch_size": batch_size},
                "occlusion": {"baseline": baseline, "window": window, "stride": stride, "batch_size": batch_size}}
    cls = next(c for c in _CLASSES if c.name == method)
    return cls(model, **settings.get(method, {})).attribute(image, texts, target=target, templates=templates)
