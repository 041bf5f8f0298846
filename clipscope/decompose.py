"""Direct-effect decomposition of a ViT image embedding over layers, heads, tokens and MLPs.

Method: Gandelsman, Efros & Steinhardt, "Interpreting CLIP's Image Representation via Text-Based
Decomposition" (ICLR 2024), sections 3-4. A transformer's last residual stream is the sum of what was
written into it (per token ``q``)::

    x[q] = x0[q] + sum_l ( sum_h sum_j A_l[h, q, j] v_l[j, h] @ W_l[h]  +  b_l )  +  sum_l m_l[q]

with ``x0`` the stream entering the first block (after any pre-LayerNorm), ``A_l`` layer ``l``'s
attention pattern, ``v_l`` its values, ``W_l[h]`` / ``b_l`` its output projection and ``m_l`` its
MLP's output (``resid_post - resid_mid``). The readout is linear once the final LayerNorm's scale is
frozen at its value in the actual forward pass: ``LN(x) = (x - mean(x)) / sigma * g + beta``, so each
part ``p`` becomes ``(p - mean(p)) / sigma * g @ P`` (``P`` the projection) and ``beta @ P`` is a part
of its own. Pooling is a weighted sum over query tokens: the class token with weight ``1 / sigma``, or
the mean over the patch tokens with weights ``1 / (N sigma_q)`` (LayerNorm before pooling, one
``sigma`` per token) or ``1 / (N sigma)`` (after pooling, the pooled vector's ``sigma``).

The parts sum to the image embedding before L2 normalization (``model.encode_image(x,
normalize=False)``); :func:`decompose` checks it on every batch. A part's *direct effect* towards a
class is the part dotted with the class's unit text embedding ``t``: an image's effects sum to
``e . t = |e| cos(e, t)``, the zero-shot logit before the logit scale, times the embedding's norm
``|e|`` (divide by ``|e|``, e.g. ``to_frame(cosine=True)``, to get parts of the cosine).

Entry point: :func:`decompose`, returning a :class:`Decomposition` (frame, head heatmaps over the
image, a layer x head grid plot). It needs the head-level sites of a transformer image tower
(``{attention}.pattern`` and ``{attention}.v``) and the residual-stream aliases of its blocks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backends import Readout
from .data import ImageLoadError, iter_images
from .io import figure_png
from .model import ClipModel, ZeroShotClassifier
from .pages import esc, png_uri
from .progress import progress_bar
from .validate import InvalidArgumentError, check_int, check_names

__all__ = ["Decomposition", "decompose"]

#: Poolings the decomposition supports (:attr:`clipscope.backends.Readout.pool`).
SUPPORTED_POOLING = ("token", "mean")
#: Largest relative error ``|sum of parts - embedding| / |embedding|`` accepted by :func:`decompose` before
#: it refuses the result, per dtype: fp32 sums measure at most 4e-7 on the tiny test ViTs and 7e-7 on a
#: random ViT-B/16 (bench/decompose_cost.py); fp16 and bf16 (activations rounded to 3 and 2 significant
#: digits) measure 1.2e-4 and 3.5e-4 on the tiny ViT, and deeper towers accumulate more rounding.
SUM_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class Decomposition:
    """The parts of ``n`` image embeddings, in embedding units or projected on ``K`` text directions.

    The last axis of every part is either the embedding (``targets is None``: ``K = embed_dim``) or one
    entry per target direction (``targets`` names them): the part dotted with the unit direction, in
    units of ``cos * |embedding|`` (the logit before the logit scale, times the embedding's norm).
    All tensors are float32 on the CPU.

    - ``heads``: ``(n, layers, heads, tokens, K)``, head ``h`` of layer ``l`` reading source token ``j``
      (tokens as the image tower orders them: ``prefix_tokens`` first, then the patch grid row by row);
    - ``attention_biases``: ``(n, layers, K)``, each attention layer's output bias;
    - ``mlps``: ``(n, layers, K)``; ``embeddings``: ``(n, K)``, the stream entering the first block;
    - ``norm_bias``: ``(n, K)``, the final LayerNorm's shift (the same for every image);
    - ``embedding``: ``(n, embed_dim)``, the model's own embedding before L2 normalization;
    - ``directions``: ``(K, embed_dim)`` unit target directions, ``None`` in embedding units;
    - ``images``: ``(n, 3, H, W)`` uint8, the images as the model saw them (for heatmap overlays);
    - ``layer_names``: the image tower's blocks; ``patch_grid``, ``prefix_tokens``: as the model declares.
    """

    heads: torch.Tensor
    attention_biases: torch.Tensor
    mlps: torch.Tensor
    embeddings: torch.Tensor
    norm_bias: torch.Tensor
    embedding: torch.Tensor
    targets: tuple[str, ...] | None
    directions: torch.Tensor | None
    images: torch.Tensor
    layer_names: tuple[str, ...]
    patch_grid: tuple[int, int]
    prefix_tokens: int

    @property
    def sizes(self) -> dict[str, int]:
        """Sizes of the axes: images, layers, heads, tokens, and the last axis (targets or embedding)."""
        n, layers, heads, tokens, k = self.heads.shape
        return {"images": n, "layers": layers, "heads": heads, "tokens": tokens,
                ("targets" if self.targets is not None else "embed_dim"): k}

    def total(self) -> torch.Tensor:
        """The sum of all parts, ``(n, K)``: the embedding itself in embedding units, else its dot product
        with each target direction (``cos * |embedding|``)."""
        return (self.heads.sum(dim=(1, 2, 3)) + self.attention_biases.sum(1) + self.mlps.sum(1)
                + self.embeddings + self.norm_bias)

    def project(self, directions: torch.Tensor | ZeroShotClassifier,
                names: Sequence[str] | None = None) -> "Decomposition":
        """Project a decomposition in embedding units on text directions; returns a new :class:`Decomposition`.

        ``directions``: a :class:`~clipscope.model.ZeroShotClassifier` (its class embeddings, named by its
        classes) or a ``(K, embed_dim)`` tensor (normalized here; ``names`` default ``"direction i"``).
        """
        if self.targets is not None:
            raise InvalidArgumentError("directions", "<directions>", "a decomposition in embedding units; this "
                                       f"one is already projected on {list(self.targets)}")
        if isinstance(directions, ZeroShotClassifier):
            names, directions = directions.classes, directions.weights
        dim = self.embedding.shape[1]
        if not isinstance(directions, torch.Tensor) or directions.ndim != 2 or directions.shape[1] != dim \
                or not directions.shape[0] or not torch.isfinite(directions).all() \
                or not (directions.norm(dim=1) > 0).all():
            raise InvalidArgumentError("directions", _shape_of(directions),
                                       f"a ZeroShotClassifier or a (K, {dim}) tensor of finite, non-zero rows")
        names = tuple(f"direction {i}" for i in range(len(directions))) if names is None else tuple(names)
        if len(names) != len(directions) or len(set(names)) != len(names):
            raise InvalidArgumentError("names", names, f"{len(directions)} unique names, one per direction")
        unit = F.normalize(directions.detach().float().cpu(), dim=-1)
        parts = {f: getattr(self, f) @ unit.T for f in ("heads", "attention_biases", "mlps", "embeddings",
                                                         "norm_bias")}
        return replace(self, **parts, targets=names, directions=unit)

    # -- views --------------------------------------------------------------------------
    def head_effects(self, target: str | int | None = None) -> torch.Tensor:
        """Each head's direct effect towards ``target``, summed over source tokens: ``(n, layers, heads)``."""
        return self.heads[..., self._target(target)].sum(dim=3)

    def heatmaps(self, target: str | int | None = None, heads: Any = None, *, upsample: bool = True) -> torch.Tensor:
        """Per-patch direct effect towards ``target`` of the selected heads, summed over them.

        ``heads``: ``None`` (every head of every layer), one ``(layer, head)`` pair or a list of pairs.
        Returns float32 ``(n, rows, columns)`` over the patch grid, or with ``upsample`` (the default)
        ``(n, H, W)`` over the model's input image, each pixel carrying its patch's value (nearest
        neighbour; a map then sums to its patch sum times the pixels per patch). Prefix tokens (the
        class token) have no place in the image and are left out.
        """
        mask = self._head_mask(heads)
        per_token = torch.einsum("nlhj,lh->nj", self.heads[..., self._target(target)], mask)
        rows, cols = self.patch_grid
        grid = per_token[:, self.prefix_tokens:].reshape(-1, rows, cols)
        if not upsample:
            return grid
        return F.interpolate(grid.unsqueeze(1), size=tuple(self.images.shape[-2:]), mode="nearest").squeeze(1)

    def to_frame(self, *, tokens: bool = False, cosine: bool = False):
        """One row per part and image, one column per target with its direct effect.

        Columns ``image``, ``part`` (``"embeddings"``, ``"head"``, ``"attention bias"``, ``"mlp"``,
        ``"final norm bias"``), ``layer`` and ``head`` (missing where they do not apply), ``token`` (with
        ``tokens``: one row per head and source token instead of per head), then the targets. An image's
        rows sum to ``e . t`` (``cos * |e|``), or with ``cosine`` (every effect divided by ``|e|``) to the
        cosine similarity, the zero-shot logit before the logit scale.
        """
        import numpy as np
        import pandas as pd
        self._require_targets("targets", None)
        n, layers, heads, n_tokens, k = self.heads.shape
        scale = 1 / self.embedding.norm(dim=1) if cosine else torch.ones(n)
        per_head = self.heads if tokens else self.heads.sum(3, keepdim=True)
        t = per_head.shape[3]
        parts = [  # (part, values (n, rows, K), layer / head / token of each row or None)
            ("embeddings", self.embeddings[:, None], None, None, None),
            ("head", per_head.reshape(n, -1, k), np.arange(layers).repeat(heads * t),
             np.tile(np.arange(heads).repeat(t), layers), np.tile(np.arange(t), layers * heads)),
            ("attention bias", self.attention_biases, np.arange(layers), None, None),
            ("mlp", self.mlps, np.arange(layers), None, None),
            ("final norm bias", self.norm_bias[:, None], None, None, None)]

        def labels(ids, rows: int):  # a part's row labels for every image; missing where the part has none
            return pd.array(np.tile(ids, n) if ids is not None else [None] * (n * rows), dtype="Int64")

        frames = []
        for part, values, layer, head, token in parts:
            rows = values.shape[1]
            columns = {"image": np.arange(n).repeat(rows), "part": part, "layer": labels(layer, rows),
                       "head": labels(head, rows)}
            if tokens:
                columns["token"] = labels(token if part == "head" else None, rows)
            effects = (values * scale[:, None, None]).reshape(n * rows, k).numpy()
            frames.append(pd.DataFrame({**columns, **dict(zip(self.targets, effects.T))}))
        return pd.concat(frames, ignore_index=True).sort_values("image", kind="stable", ignore_index=True)

    # -- plots ----------------------------------------------------------------------------
    def plot_grid(self, target: str | int | None = None, image: int | None = None, ax=None):
        """A layers x heads grid of each head's direct effect towards ``target`` (summed over tokens),
        for one ``image`` or the mean over all images (``None``); returns the figure."""
        import matplotlib.pyplot as plt
        effects = self.head_effects(target)
        name = self.targets[self._target(target)]
        values = effects.mean(0) if image is None else effects[self._image(image)]
        fig, ax = plt.subplots(figsize=(0.45 * values.shape[1] + 2.2, 0.35 * values.shape[0] + 1.4)) \
            if ax is None else (ax.figure, ax)
        lim = float(values.abs().max()) or 1.0
        shown = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        where = "mean over images" if image is None else f"image {image}"
        ax.set_title(f"direct effect towards {name!r} ({where})", fontsize=9)
        fig.colorbar(shown, ax=ax, label="cos x |embedding|")
        return fig

    plot = plot_grid

    def plot_heatmaps(self, target: str | int | None = None, heads: Any = None, image: int = 0, top: int = 5):
        """The image, then the per-patch direct effect towards ``target`` over it: of all heads together and
        of each of ``heads`` (a list of ``(layer, head)`` pairs; default the ``top`` heads with the largest
        effect on this image); returns the figure."""
        import matplotlib.pyplot as plt
        index = self._image(image)
        if heads is None:
            order = self.head_effects(target)[index].flatten().argsort(descending=True)
            count = self.sizes["heads"]
            heads = [(int(i) // count, int(i) % count) for i in order[:check_int("top", top, low=1)]]
        maps = [("all heads", self.heatmaps(target, upsample=False)[index])]
        maps += [(f"layer {l}, head {h}", self.heatmaps(target, (l, h), upsample=False)[index])
                 for l, h in self._pairs(heads)]
        lim = max(float(m.abs().max()) for _, m in maps) or 1.0
        picture = self.images[index].permute(1, 2, 0).numpy()
        extent = (0, picture.shape[1], picture.shape[0], 0)  # each patch's value over its pixels
        fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.5), squeeze=False)
        axes[0][0].imshow(picture)
        axes[0][0].set_title(f"image {image}", fontsize=8)
        for ax, (title, m) in zip(axes[0][1:], maps):
            ax.imshow(picture)
            ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6, extent=extent, interpolation="nearest")
            ax.set_title(f"{title}: {float(m.sum()):.3g}", fontsize=8)
        for ax in axes[0]:
            ax.axis("off")
        fig.suptitle(f"direct effect towards {self.targets[self._target(target)]!r} by patch", fontsize=9)
        return fig

    def _repr_html_(self) -> str:
        s = self.sizes
        text = (f"<p>Decomposition of {s['images']} image(s): {s['layers']} layers x {s['heads']} heads x "
                f"{s['tokens']} tokens, MLPs, embeddings and biases")
        if self.targets is None:
            return text + f", in embedding units ({s['embed_dim']} dims; project() on text directions).</p>"
        frame = self.to_frame()
        top = frame[frame["part"] == "head"].groupby(["layer", "head"])[list(self.targets)].mean()
        first = self.targets[0]
        top = top.reindex(top[first].abs().sort_values(ascending=False).index).head(10)
        return (text + f", towards {esc(', '.join(map(repr, self.targets)))} (cos x |embedding|).</p>"
                f'<img src="{png_uri(figure_png(self.plot_grid(0), dpi=80))}"/>'
                f"<p>Heads with the largest mean effect towards {esc(repr(first))}:</p>"
                + top.to_html(float_format=lambda v: f"{v:.4f}"))

    # -- argument checks -------------------------------------------------------------------
    def _require_targets(self, parameter: str, value: Any = None) -> None:
        if self.targets is None:
            raise InvalidArgumentError(parameter, value, "a decomposition projected on text directions: "
                                       "decompose(model, images, classes=[...]) or .project(model.classifier(...))")

    def _target(self, target: str | int | None) -> int:
        self._require_targets("target", target)
        if target is None and len(self.targets) == 1:
            return 0
        if isinstance(target, str) and target in self.targets:
            return self.targets.index(target)
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(self.targets):
            return target
        raise InvalidArgumentError("target", target, f"one of {list(self.targets)} or its index "
                                                     f"(0..{len(self.targets) - 1})")

    def _image(self, image: int) -> int:
        return check_int("image", image, low=0, high=self.heads.shape[0] - 1)

    def _pairs(self, heads: Any) -> list[tuple[int, int]]:
        layers, count = self.heads.shape[1:3]
        valid = f"a (layer, head) pair or a list of them, layer in 0..{layers - 1}, head in 0..{count - 1}"
        single = isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(v, int) for v in heads)
        items = [heads] if single else list(heads) if isinstance(heads, (list, tuple)) else None
        if not items or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in items):
            raise InvalidArgumentError("heads", heads, valid)
        try:
            return [(check_int("heads", l, low=0, high=layers - 1), check_int("heads", h, low=0, high=count - 1))
                    for l, h in items]
        except InvalidArgumentError:
            raise InvalidArgumentError("heads", heads, valid) from None

    def _head_mask(self, heads: Any) -> torch.Tensor:
        mask = torch.zeros(self.heads.shape[1:3])
        if heads is None:
            return mask + 1
        for layer, head in self._pairs(heads):
            mask[layer, head] = 1
        return mask


def _shape_of(value: Any) -> Any:
    return f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------------------------------
# Computing the parts


@dataclass
class _Readout:
    """The frozen-scale readout of one model as linear maps from the residual stream to the last axis."""

    readout: Readout
    eps: float
    linear: torch.Tensor            # (D, K): p -> (p - mean p) * g @ P (@ T.T)
    shift: torch.Tensor             # (K,): beta @ P (@ T.T)
    head_maps: list[torch.Tensor]   # per layer (heads, d_head, K): W_l[h] @ linear
    bias_maps: list[torch.Tensor]   # per layer (K,): b_l @ linear
    directions: torch.Tensor | None  # (embed_dim, K) unit target directions, None in embedding units


def decompose(model: ClipModel, images: Any, *, classes: Sequence[str] | None = None,
              templates: str | Sequence[str] | None = None, batch_size: int = 8,
              progress: bool | None = None) -> Decomposition:
    """Split the image embeddings of ``images`` into the direct contributions of every (layer, head,
    source token), attention output bias, MLP, the embeddings and the final LayerNorm's shift.

    See the module docstring for the method (Gandelsman et al., ICLR 2024). ``images``: a preprocessed
    ``(n, 3, H, W)`` tensor or anything :meth:`~clipscope.model.ClipModel.encode_image` reads (PIL images,
    paths, a folder). With ``classes`` (and ``templates``, as for zero-shot) every part is projected at once
    on the classes' unit text embeddings, in units of ``cos * |embedding|`` (memory: ``n x layers x heads
    x tokens x classes`` floats); without, parts stay in embedding units (``x embed_dim``: 58 MB per image
    for ViT-B/16) and :meth:`Decomposition.project` projects them later. ``batch_size`` images per forward
    pass, with a progress bar (``progress``) when there is more than one batch.

    Returns a :class:`Decomposition` whose parts sum to ``model.encode_image(images, normalize=False)``
    (projected: its dot products with the targets). Raises
    :class:`~clipscope.validate.InvalidArgumentError` for a model without a transformer image tower, a
    pooling it does not support, bad images or arguments; ``RuntimeError`` if the parts do not sum to the
    embedding (an image tower with a component the decomposition does not model, e.g. scaled or normalized
    attention, or a hook that edits a block's output).
    """
    readout = _check_model(model)
    batch_size = check_int("batch_size", batch_size, low=1)
    classes = None if classes is None else check_names("classes", classes)
    inputs = _model_inputs(model, images)
    directions = None if classes is None else model.class_embeddings(classes, templates)
    maps = _readout_maps(model, readout, directions)
    batches = []
    for start in progress_bar(range(0, len(inputs), batch_size), progress, len(inputs) > batch_size, "decompose"):
        batches.append(_batch_parts(model, maps, inputs[start:start + batch_size]))
    parts = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    pixels = (model.unnormalize(inputs.float()).clamp(0, 1) * 255).round().to(torch.uint8)
    return Decomposition(**parts, targets=None if classes is None else tuple(classes), directions=directions,
                         images=pixels, layer_names=tuple(model.blocks("visual")), patch_grid=model.patch_grid,
                         prefix_tokens=model.prefix_tokens)


def _check_model(model: Any) -> Readout:
    """The model's readout, or an error naming why ``model`` cannot be decomposed."""
    if not isinstance(model, ClipModel):
        raise InvalidArgumentError("model", model, "a ClipModel (clipscope.load(...))")
    readout = model.readout
    if readout is None:
        raise InvalidArgumentError("model", model.name, "a model with a transformer (ViT) image tower: the "
                                   "decomposition splits the embedding over attention heads, and this model's "
                                   "image tower is convolutional (a ResNet)")
    if readout.pool not in SUPPORTED_POOLING:
        raise InvalidArgumentError("model", model.name, f"a ViT that pools its last tokens by the class token or "
                                   f"the mean over patches; this one pools by {readout.pool}, which the "
                                   "decomposition does not support")
    norm = model.model.get_submodule(readout.norm)
    if not isinstance(norm, nn.LayerNorm):
        raise InvalidArgumentError("model", model.name, f"a ViT whose final norm is a LayerNorm; {readout.norm} is "
                                   f"a {type(norm).__name__}")
    first = model.attention_sites("visual")[0] if model.attention_sites("visual") else None
    if first is None or f"{first}.pattern" not in model.layers().names():
        raise InvalidArgumentError("model", model.name, "a ViT with head-level sites ({attention}.pattern, "
                                   "{attention}.v); this backend does not provide them")
    return readout


def _model_inputs(model: ClipModel, images: Any) -> torch.Tensor:
    """``images`` as one preprocessed ``(n, 3, H, W)`` tensor on the CPU (raises for unreadable images)."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if images.shape[0] == 0 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(model.image_size):
            raise InvalidArgumentError("images", _shape_of(images), "a preprocessed (n, 3, "
                                       f"{model.image_size[0]}, {model.image_size[1]}) tensor with n >= 1, or "
                                       "images (PIL images, paths, a folder)")
        return images.detach().float().cpu()
    tensors, skipped = [], []
    for key, item in iter_images(images):
        if isinstance(item, ImageLoadError):
            skipped.append((key, str(item)))
        else:
            tensors.append(item if isinstance(item, torch.Tensor) else model.preprocess(item))
    if skipped:
        listing = "; ".join(f"{k}: {r}" for k, r in skipped[:10])
        raise ImageLoadError(f"{len(skipped)} image(s) could not be read: {listing}", skipped)
    if not tensors:
        raise InvalidArgumentError("images", images, "at least one image")
    return _model_inputs(model, torch.stack(tensors))


def _readout_maps(model: ClipModel, readout: Readout, directions: torch.Tensor | None) -> _Readout:
    """The frozen-scale readout as linear maps (float32, on the model's device), onto ``directions`` if given."""
    dev = model.device
    norm = model.model.get_submodule(readout.norm)
    width = norm.normalized_shape[-1]
    gain = norm.weight.float() if norm.weight is not None else torch.ones(width, device=dev)
    beta = norm.bias.float() if norm.bias is not None else torch.zeros(width, device=dev)
    if readout.projection is None:
        projection = torch.eye(width, device=dev)
    else:
        projection = model.model.get_parameter(readout.projection).detach().float()
        projection = projection.T if readout.projection_transposed else projection
    linear = gain[:, None] * projection
    linear = linear - linear.mean(dim=0, keepdim=True)  # centering: (p - mean p) @ G P == p @ (G P - mean_rows)
    shift = beta @ projection
    unit = None if directions is None else F.normalize(directions.to(dev).float(), dim=-1).T
    if unit is not None:
        linear, shift = linear @ unit, shift @ unit
    head_maps, bias_maps = [], []
    for site in model.attention_sites("visual"):
        weight, bias = model.output_projection(site)
        head_maps.append(torch.einsum("hed,dk->hek", weight.detach().to(dev).float(), linear))
        bias_maps.append(bias.detach().to(dev).float() @ linear)
    return _Readout(readout, float(norm.eps), linear, shift, head_maps, bias_maps, unit)


def _batch_parts(model: ClipModel, maps: _Readout, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of one batch (float32, CPU), checked to sum to the model's embedding."""
    blocks, attention = model.blocks("visual"), model.attention_sites("visual")
    sites = [f"{blocks[0]}.resid_pre"] + [f"{a}.{s}" for a in attention for s in ("pattern", "v")]
    sites += [f"{b}.{s}" for b in blocks for s in ("resid_mid", "resid_post")]
    with torch.no_grad(), model.capture(sites) as acts:
        embedding = model.encode_image(inputs.to(model.device, model.dtype), normalize=False).float()
    weights = _query_weights(acts[f"{blocks[-1]}.resid_post"].float(), maps.readout, maps.eps,
                             model.prefix_tokens)

    def pooled(stream: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nq,nqd->nd", weights, stream.float()) @ maps.linear

    heads = []
    for site, head_map in zip(attention, maps.head_maps):
        read = torch.einsum("nq,nhqj->nhj", weights, acts[f"{site}.pattern"].float())
        heads.append(read.unsqueeze(-1) * torch.einsum("njhe,hek->nhjk", acts[f"{site}.v"].float(), head_map))
    total_weight = weights.sum(dim=1, keepdim=True)
    parts = {"heads": torch.stack(heads, dim=1),
             "attention_biases": torch.stack([total_weight * b for b in maps.bias_maps], dim=1),
             "mlps": torch.stack([pooled(acts[f"{b}.resid_post"] - acts[f"{b}.resid_mid"]) for b in blocks], dim=1),
             "embeddings": pooled(acts[f"{blocks[0]}.resid_pre"]),
             "norm_bias": maps.shift.expand(len(inputs), -1)}
    _check_sum(parts, embedding, maps, model.dtype)
    return {key: value.cpu() for key, value in parts.items()} | {"embedding": embedding.cpu()}


def _query_weights(last: torch.Tensor, readout: Readout, eps: float, prefix: int) -> torch.Tensor:
    """``(n, L)`` weights ``w`` such that ``sum_q w[q] (x[q] - mean x[q])`` is the pooled, normalized vector
    before the LayerNorm's gain and shift, for the last residual stream ``x = last`` ``(n, L, D)``: the
    pooling's weights times the LayerNorm's ``1 / sigma`` frozen at its value in this forward pass."""
    def sigma(x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x.var(dim=-1, unbiased=False) + eps)

    weights = torch.zeros(last.shape[:2], device=last.device)
    if readout.pool == "token":
        weights[:, readout.token] = 1 / sigma(last[:, readout.token])
    else:
        patches = last[:, prefix:]
        scale = sigma(patches.mean(dim=1)).unsqueeze(1) if readout.norm_after_pool else sigma(patches)
        weights[:, prefix:] = 1 / (scale * patches.shape[1])
    return weights


def _check_sum(parts: dict[str, torch.Tensor], embedding: torch.Tensor, maps: _Readout, dtype: torch.dtype) -> None:
    """Raise ``RuntimeError`` unless the parts sum to ``embedding`` (to its dot products with the targets,
    for projected parts), relative to the embedding's norm, within :data:`SUM_TOLERANCE`."""
    total = (parts["heads"].sum(dim=(1, 2, 3)) + parts["attention_biases"].sum(1) + parts["mlps"].sum(1)
             + parts["embeddings"] + parts["norm_bias"])
    reference = embedding if maps.directions is None else embedding @ maps.directions
    error = float(((total - reference).norm(dim=1) / embedding.norm(dim=1)).max())
    if not error <= SUM_TOLERANCE.get(dtype, SUM_TOLERANCE[torch.float32]):
        raise RuntimeError(f"the decomposition's parts miss the image embedding by {error:.2g} of its norm: this "
                           "image tower has a component the decomposition does not model (e.g. a hook on a block, "
                           "scaled or normalized attention)")
