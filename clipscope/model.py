"""The model layer: :func:`load` any CLIP and wrap it in one :class:`ClipModel` interface.

Name forms accepted by :func:`load`:

- ``"organism"``: the built-in model organism (offline, ships with the package);
- an open_clip model name with a pretrained tag: ``load("ViT-B-32", pretrained="openai")``;
  with ``pretrained=None`` the architecture is randomly initialised;
- an open_clip name with a local checkpoint: ``load("ViT-B-32", pretrained="/path/w.safetensors")``;
- ``"hf-hub:ORG/REPO"``: an open_clip model on the Hugging Face hub;
- a local folder holding ``open_clip_config.json`` and the weights;
- ``"hf:ORG/REPO"``: a transformers ``CLIPModel`` (needs the ``hf`` extra);
- ``"endpoint:https://HOST/score"``: a deployed zero-shot endpoint, a black box that does zero-shot
  classification only (:mod:`clipscope.endpoint`; every other capability raises ``BlackBoxError``).

Weights load safely: safetensors, or ``torch.load(weights_only=True)``; a
checkpoint that needs pickled code is refused (:class:`~clipscope.hub.UnsafeCheckpointError`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, prompts
from .backends import Architecture, Readout
from .data import EmbeddedImages, ImageLoadError, iter_images, list_image_files, source_length
from .hooks import TOKEN_POOLS, Activations, HookedModel, Site, TokenPool, Tower, Unit, site_names, unit_means
from .progress import progress_bar
from .validate import InvalidArgumentError, check_choice, check_int, check_names

#: Class lists whose embeddings a model keeps (least recently used dropped first): notebooks and audits reuse
#: a handful; a server answering arbitrary label sets must not grow without bound.
CLASS_CACHE_SIZE = 256

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


#: Device names :func:`load` accepts: auto, cpu, mps, cuda or cuda:N.
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'mps'"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the device for ``device``; ``"auto"`` picks cuda, then mps, then cpu.

    Raises :class:`~clipscope.validate.InvalidArgumentError` naming ``device`` for any other name,
    and for a device this machine does not have.
    """
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise InvalidArgumentError("device", device, f"one of {_DEVICE_CHOICES}")
    if name != "auto":
        _check_available(torch.device(name), device)
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _check_available(dev: torch.device, asked: Any) -> None:
    """Raise :class:`~clipscope.validate.InvalidArgumentError` if this machine lacks ``dev``."""
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device", asked, "CUDA is not available on this machine "
                                                    "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidArgumentError("device", asked, f"this machine has {torch.cuda.device_count()} CUDA "
                                                    f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not _mps_available():
        raise InvalidArgumentError("device", asked, "MPS is not available on this machine; use 'auto' or 'cpu'")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Return the dtype for ``precision`` (fp32, fp16, bf16); ``"auto"`` is fp16 on cuda, else fp32.

    Raises :class:`~clipscope.validate.InvalidArgumentError` naming ``precision`` for any other value.
    """
    check_choice("precision", precision, ["auto", *_PRECISIONS])
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _PRECISIONS[precision]


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ZeroShotClassifier:
    """A zero-shot head: one unit-norm embedding per class and the model's logit scale.

    Made by :meth:`ClipModel.classifier`. ``weights`` is float32 ``(n_classes, embed_dim)`` on the CPU;
    it is fixed when the classifier is made (an ablation of the text tower must be active then to
    count). Every method takes image embeddings ``(n, embed_dim)`` on any device (they are normalized
    here) and answers on that device.
    """

    classes: tuple[str, ...]
    templates: tuple[str, ...]
    weights: torch.Tensor
    logit_scale: float

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``logit_scale * cos(image, class)``, float32 ``(n, n_classes)``."""
        emb = F.normalize(image_embeddings.float(), dim=-1)
        return self.logit_scale * emb @ self.weights.to(emb.device).T

    def probs(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax of :meth:`logits`), float32 ``(n, n_classes)``, rows sum to 1."""
        return self.logits(image_embeddings).softmax(dim=-1)

    def top1(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Index of the most probable class per image, int64 ``(n,)``."""
        return self.logits(image_embeddings).argmax(dim=-1)

    def predict(self, image_embeddings: torch.Tensor) -> list[str]:
        """Name of the most probable class per image."""
        return [self.classes[i] for i in self.top1(image_embeddings).tolist()]


@dataclass
class ZeroShotResult:
    """Zero-shot class probabilities for a set of images.

    ``probs`` is a float32 ``(n_images, n_classes)`` tensor whose rows sum to 1;
    ``keys[i]`` identifies row ``i``: the image's path for path inputs (a file, a
    folder's files, a list of paths), its position in the input otherwise;
    ``positions[i]`` is row ``i``'s position in the input (in a folder: in its sorted
    file list). ``skipped`` lists ``(key, reason)`` for images that could not be read.
    """

    probs: torch.Tensor
    classes: list[str]
    templates: tuple[str, ...]
    keys: list[Any] = field(default_factory=list)
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    @property
    def top1(self) -> torch.Tensor:
        """Index of the most probable class per image, shape ``(n_images,)``."""
        return self.probs.argmax(dim=1)

    @property
    def predictions(self) -> list[str]:
        """Name of the most probable class per image."""
        return [self.classes[i] for i in self.top1.tolist()]

    def to_frame(self):
        """Return a DataFrame: one row per image, indexed by its key (see the class docstring), with a
        ``prediction`` column and one probability column per class."""
        import pandas as pd
        frame = pd.DataFrame(self.probs.numpy(), columns=self.classes)
        frame.insert(0, "prediction", self.predictions)
        frame.index = pd.Index(list(self.keys) if self.keys else range(len(frame)), name="image", dtype=object)
        return frame

    def plot(self, max_images: int = 8, ax=None):
        """Bar chart of the class probabilities of the first ``max_images`` images; returns the figure."""
        import matplotlib.pyplot as plt
        n = min(check_int("max_images", max_images, low=1), len(self.probs))
        if ax is None:
            fig, axes = plt.subplots(1, max(n, 1), figsize=(2.4 * max(n, 1), 0.3 * len(self.classes) + 1.2),
                                     sharey=True, squeeze=False)
            axes = axes[0]
        else:
            fig, axes = ax.figure, [ax]
        for i, a in enumerate(axes[:n]):
            a.barh(range(len(self.classes)), self.probs[i].numpy(), color="tab:blue")
            a.set_xlim(0, 1)
            a.set_title(f"{self.keys[i] if self.keys else i}: {self.predictions[i]}", fontsize=8)
            a.set_xlabel("probability")
        axes[0].set_yticks(range(len(self.classes)), self.classes)
        axes[0].invert_yaxis()
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        head = self.to_frame().head(20).to_html(float_format=lambda v: f"{v:.3f}")
        note = f"<p>{len(self.probs)} images, {len(self.classes)} classes, {len(self.templates)} template(s)"
        if self.skipped:
            note += f"; {len(self.skipped)} unreadable image(s) skipped"
        return note + "</p>" + head


class Layers(tuple):
    """The hookable sites of a model (a tuple of :class:`~clipscope.hooks.Site`), printable as a table.

    ``architecture`` is what the model's backend declared about it (used by :meth:`blocks`).
    """

    def __new__(cls, sites: Iterable[Site] = (), architecture: Architecture | None = None) -> "Layers":
        layers = super().__new__(cls, sites)
        layers.architecture = architecture or Architecture()
        return layers

    def names(self) -> list[str]:
        return [s.name for s in self]

    def filter(self, tower: str | None = None, layout: str | None = None, contains: str | None = None) -> "Layers":
        """Return the sites of one tower, one layout, and/or whose name contains a substring."""
        return Layers((s for s in self if (tower is None or s.tower == tower)
                       and (layout is None or s.layout == layout)
                       and (contains is None or contains in s.name)), self.architecture)

    def blocks(self, tower: str = "visual") -> "Layers":
        """Return the top-level blocks of ``tower`` among these sites, in forward order.

        These are the ResNet stages (``visual.layer1`` .. ``visual.layer4``) or the transformer
        blocks (``visual.transformer.resblocks.N`` for open_clip, ``visual.encoder.layers.N`` for
        transformers models; ``text.`` likewise), the usual places to look for units, as the model's
        backend declares them (:meth:`ClipModel.blocks`).
        """
        by_name = {s.name: s for s in self}
        return Layers((by_name[n] for n in self.architecture.blocks.get(tower, ()) if n in by_name),
                      self.architecture)

    def to_frame(self):
        """Return a DataFrame with name, tower, layout, shape, units and module type per site."""
        import pandas as pd
        return pd.DataFrame([{"name": s.name, "tower": s.tower, "layout": s.layout, "shape": s.shape,
                              "units": s.n_units, "type": s.module_type} for s in self])

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False)

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False)


# ---------------------------------------------------------------------------------------
# The wrapper


class ClipModel:
    """One interface over open_clip and transformers CLIP models.

    Parameters are frozen (``requires_grad=False``) and the model is in eval
    mode: clipscope inspects models, it does not train them. Gradients still
    flow to input images, which feature visualization needs.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, *, name: str,
                 pretrained: str | None, device: torch.device, dtype: torch.dtype,
                 image_size: tuple[int, int], image_mean: Sequence[float], image_std: Sequence[float],
                 towers: Sequence[Tower], default_templates: Sequence[str] = prompts.DEFAULT_TEMPLATES,
                 backend: str = "open_clip", architecture: Architecture | None = None):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.device = device
        self.dtype = dtype
        self.image_size = image_size
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.default_templates = tuple(default_templates)
        self.backend = backend
        self.architecture = architecture or Architecture()
        self._token_pool: TokenPool = "patches"
        self._hooked = HookedModel(model, towers, self.architecture.heads)
        self._class_cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._pixel_stats_cache: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> (2, 3, 1, 1) mean, std
        self._embed_dim: int | None = None
        self._embedding_transforms: list[str] = []  # tags of the transform_embeddings blocks in force
        self._attached: dict[str, _SAEState] = {}  # feature site -> its SAE's state before it was attached

    def __repr__(self) -> str:
        tag = f", pretrained={self.pretrained!r}" if self.pretrained else ""
        return f"ClipModel({self.name!r}{tag}, device={self.device}, dtype={self.dtype}, backend={self.backend})"

    @property
    def id(self) -> str:
        """A string that identifies the weights, any :meth:`transform_embeddings` in force and the sparse
        autoencoders attached (:meth:`attach`; for cache keys)."""
        saes = [f"{site}={weights_digest(self.sae(site))}" for site in self._attached]
        return "|".join([self.name, str(self.pretrained), str(self.dtype), *self._embedding_transforms, *saes])

    @contextlib.contextmanager
    def transform_embeddings(self, fn: Callable[[torch.Tensor], torch.Tensor], tag: str) -> Iterator[None]:
        """Inside the block every image and text embedding the model computes is ``fn(embedding)`` (the
        embedding before L2 normalization, ``(B, embed_dim)`` in, the same shape out), so everything built on
        :meth:`encode_image` / :meth:`encode_text` (zero-shot heads, attack evaluation) sees the transformed
        space; per-component analyses (:mod:`clipscope.decompose`) do not. ``tag`` names the transform in
        :attr:`id` for the duration, so caches keyed by the id never mix transformed and plain embeddings.
        Restored on exit, also after an error."""
        if not isinstance(tag, str) or not tag or "|" in tag:
            raise InvalidArgumentError("tag", tag, "a non-empty string without '|' that names the transform")
        net, names = self.model, ("encode_image", "encode_text")
        own = {name: net.__dict__[name] for name in names if name in net.__dict__}  # instance-level overrides

        def wrap(encode: Callable) -> Callable:
            return lambda *args, **kwargs: fn(encode(*args, **kwargs))

        for name in names:
            object.__setattr__(net, name, wrap(getattr(net, name)))
        self._embedding_transforms.append(tag)
        try:
            yield
        finally:
            self._embedding_transforms.pop()
            for name in names:
                if name in own:
                    object.__setattr__(net, name, own[name])
                else:
                    object.__delattr__(net, name)

    @property
    def logit_scale(self) -> float:
        """The learned temperature, as the multiplier applied to cosine similarities (e.g. 100.0)."""
        return float(self.model.logit_scale.detach().float().exp().clamp(max=100.0))

    # -- text ---------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Return token ids, shape ``(n_texts, context_length)``, on the model's device."""
        return self._tokenizer(_check_texts(texts)).to(self.device)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, *, normalize: bool = True,
                    batch_size: int = 256, progress: bool | None = None) -> torch.Tensor:
        """Return text embeddings, float32 ``(n_texts, embed_dim)``.

        ``texts`` are strings (tokenized here; the result is on the CPU, like
        :meth:`encode_image` on images, so the two multiply on any device) or token
        ids from :meth:`tokenize` (the result is on the device the ids were on).
        Unit-normalized when ``normalize`` (the default). Where the backend offers it, each batch is
        encoded only up to its longest prompt (equal embeddings, fewer FLOPs), except while a capture
        or an ablation of the text tower is in force (its sites then see every position).
        """
        batch_size = check_int("batch_size", batch_size, low=1)
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        needed = self.architecture.text_tokens_needed
        if "text" in self._hooked.hooked_towers:
            needed = None
        chunks = []
        for start in progress_bar(range(0, len(tokens), batch_size), progress, len(tokens) > batch_size,
                                  "encode text"):
            batch = tokens[start:start + batch_size]
            batch = batch if needed is None else batch[:, :needed(batch)]
            chunks.append(self.model.encode_text(batch.to(self.device)).float())
        out = torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim, device=self.device)
        out = F.normalize(out, dim=-1) if normalize else out
        return out.to(texts.device) if isinstance(texts, torch.Tensor) else out.cpu()

    @property
    def embed_dim(self) -> int:
        """Size of the joint image-text embedding space."""
        if self._embed_dim is None:
            with torch.no_grad():
                self._embed_dim = int(self.encode_text(["a"], normalize=False).shape[-1])
        return self._embed_dim

    # -- images -------------------------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] as model input: ``(pixels - image_mean) / image_std`` per channel.

        ``pixels`` is a float tensor ``(B, 3, H, W)`` or ``(3, H, W)``; the result has its shape,
        dtype and device (cast it to :attr:`dtype` for the model; no resizing happens here).
        """
        mean, std = self._pixel_stats("pixels", pixels)
        return (pixels - mean) / std

    def unnormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: model inputs back to pixels (in [0, 1] for real images; not clamped)."""
        mean, std = self._pixel_stats("inputs", inputs)
        return inputs * std + mean

    def _pixel_stats(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(name, x, "a float tensor (B, 3, H, W) or (3, H, W)")
        if not x.is_floating_point():
            raise InvalidArgumentError(f"{name}.dtype", x.dtype, "a floating-point dtype (pixels in [0, 1])")
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise InvalidArgumentError(f"{name}.shape", tuple(x.shape), "(B, 3, H, W) or (3, H, W)")
        key = (x.dtype, x.device)
        if key not in self._pixel_stats_cache:  # built once per dtype and device, not at every optimization step
            self._pixel_stats_cache[key] = torch.tensor([self.image_mean, self.image_std], dtype=x.dtype,
                                                        device=x.device).view(2, 3, 1, 1)
        stats = self._pixel_stats_cache[key]
        return stats[0], stats[1]

    def resize_to_input(self, image: Any) -> Any:
        """A PIL ``image`` as the model sees it: :attr:`preprocess` (resize, crop) without the normalization.

        Returns an 8-bit RGB ``PIL.Image`` of :attr:`image_size` (for showing what a unit saw).
        """
        from PIL import Image
        pixels = self.unnormalize(self.preprocess(image).float()).clamp(0, 1)
        return Image.fromarray((pixels * 255).round().byte().permute(1, 2, 0).numpy())

    def encode_image(self, images: Any, *, normalize: bool = True, batch_size: int = 64,
                     progress: bool | None = None) -> torch.Tensor:
        """Return image embeddings, float32 ``(n_images, embed_dim)``.

        - A preprocessed ``(B, 3, H, W)`` tensor runs in one forward pass on the
          model's device with gradients flowing to the input (for optimization); the
          result is on the device the tensor was on.
        - Anything else (PIL images, paths, a folder, a ``datasets`` table, a list
          of these) is loaded, preprocessed and encoded in batches without
          gradients, with a progress bar; the result is on the CPU. If any image is
          unreadable, :class:`~clipscope.data.ImageLoadError` lists every bad one
          (use :meth:`embed` to skip them instead).
        """
        batch_size = check_int("batch_size", batch_size, low=1)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            out = self.model.encode_image(images.to(self.device, self.dtype)).float()
            out = F.normalize(out, dim=-1) if normalize else out
            return out.to(images.device)
        result = self.embed(images, normalize=normalize, batch_size=batch_size, progress=progress)
        if result.skipped:
            listing = "; ".join(f"{k}: {r}" for k, r in result.skipped[:10])
            raise ImageLoadError(f"{result.n_skipped} image(s) could not be read: {listing}", result.skipped)
        return result.embeddings

    def embed(self, source: Any, *, normalize: bool = True, batch_size: int = 64,
              progress: bool | None = None, desc: str = "encode images") -> EmbeddedImages:
        """Encode every readable image of ``source``; unreadable ones are skipped and listed.

        Returns :class:`~clipscope.data.EmbeddedImages` (float32 CPU embeddings, the key and the
        position in ``source`` of each row, and the skipped ``(key, reason)`` pairs). A folder is
        listed once.
        """
        batch_size = check_int("batch_size", batch_size, low=1)
        items, total = _items_and_length(source)
        keys, positions, chunks, skipped, batch, batch_rows = [], [], [], [], [], []

        def flush():
            if batch:
                x = torch.stack(batch).to(self.device, self.dtype)
                with torch.no_grad():
                    emb = self.model.encode_image(x).float()
                chunks.append((F.normalize(emb, dim=-1) if normalize else emb).cpu())
                keys.extend(key for key, _ in batch_rows)
                positions.extend(position for _, position in batch_rows)
                batch.clear()
                batch_rows.clear()

        show = total is None or total > batch_size
        for position, (key, item) in enumerate(progress_bar(items, progress, show, desc, total=total)):
            if isinstance(item, ImageLoadError):
                skipped.append((key, str(item)))
                continue
            tensor = item if isinstance(item, torch.Tensor) else self.preprocess(item)
            if tuple(tensor.shape[-2:]) != tuple(self.image_size):
                skipped.append((key, f"tensor image of size {tuple(tensor.shape[-2:])}; the model "
                                     f"takes {tuple(self.image_size)} (pass PIL images to have them resized)"))
                continue
            batch.append(tensor)
            batch_rows.append((key, position))
            if len(batch) == batch_size:
                flush()
        flush()
        dim = chunks[0].shape[1] if chunks else self.embed_dim
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, dim)
        return EmbeddedImages(embeddings, keys, skipped, positions)

    # -- zero-shot ----------------------------------------------------------------------
    def class_embeddings(self, classes: Sequence[str], templates: str | Sequence[str] | None = None) -> torch.Tensor:
        """Return unit-norm class embeddings, float32 ``(n_classes, embed_dim)`` on the CPU, one prompt
        ensemble per class.

        ``classes`` must be unique, non-empty strings and ``templates`` valid (see
        :func:`~clipscope.prompts.resolve_templates`); otherwise
        :class:`~clipscope.validate.InvalidArgumentError` names the parameter. Cached by (model, classes,
        templates), the :data:`CLASS_CACHE_SIZE` most recently used class lists; the cache is bypassed while
        an ablation touches the text tower.
        """
        classes = check_names("classes", classes)
        return self._class_embeddings(classes, prompts.resolve_templates(templates, self.default_templates))

    def _class_embeddings(self, classes: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        key = (self.id, tuple(classes), templates)
        cacheable = "text" not in self._hooked.ablated_towers
        if cacheable and key in self._class_cache:
            self._class_cache.move_to_end(key)
            return self._class_cache[key]
        texts = [p for c in classes for p in prompts.fill(templates, c)]
        with torch.no_grad():
            emb = self.encode_text(texts, normalize=True).view(len(classes), len(templates), -1)
        out = F.normalize(emb.mean(dim=1), dim=-1)
        if cacheable:
            self._class_cache[key] = out
            if len(self._class_cache) > CLASS_CACHE_SIZE:  # least recently used first
                self._class_cache.popitem(last=False)
        return out

    def classifier(self, classes: Sequence[str], templates: str | Sequence[str] | None = None) -> ZeroShotClassifier:
        """The zero-shot head for ``classes``: a :class:`ZeroShotClassifier` with logits / probs / predict
        on image embeddings. Class embeddings as in :meth:`class_embeddings` (prompt ensembles, cached)."""
        classes = check_names("classes", classes)
        templates = prompts.resolve_templates(templates, self.default_templates)
        return ZeroShotClassifier(tuple(classes), templates, self._class_embeddings(classes, templates),
                                  self.logit_scale)

    def zero_shot(self, images: Any, classes: Sequence[str], templates: str | Sequence[str] | None = None, *,
                  batch_size: int = 64, progress: bool | None = None) -> ZeroShotResult:
        """Classify ``images`` among ``classes``; returns a :class:`ZeroShotResult`.

        Probabilities are ``softmax(logit_scale * cos(image, class))`` with each
        class embedded as the mean of its normalized prompt embeddings
        (``templates``: a list, a set name such as ``"openai_imagenet"``, or
        ``None`` for the model's default). Rows are keyed by the image's path for
        path inputs, by position otherwise. Unreadable images are skipped, listed in
        the result's ``skipped`` and reported in one :class:`UserWarning`.
        """
        head = self.classifier(classes, templates)
        batch_size = check_int("batch_size", batch_size, low=1)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            with torch.no_grad():
                img = self.encode_image(images).cpu()
            keys, positions, skipped = list(range(len(img))), list(range(len(img))), []
        else:
            embedded = self.embed(images, batch_size=batch_size, progress=progress)
            img, keys, positions, skipped = embedded.embeddings, embedded.keys, embedded.positions, embedded.skipped
        skipped = [(_path_key(images, k), reason) for k, reason in skipped]
        if skipped:
            _warn_skipped(skipped, len(keys) + len(skipped))
        return ZeroShotResult(head.probs(img), list(head.classes), head.templates, [_path_key(images, k) for k in keys],
                              skipped, positions)

    # -- hooks --------------------------------------------------------------------------
    def layers(self) -> Layers:
        """Every hookable site of both towers, with canonical shape and layout (see :mod:`clipscope.hooks`)."""
        return Layers(self._hooked.sites.values(), self.architecture)

    # -- architecture (declared by the backend: callers never parse site names) ---------------
    def blocks(self, tower: str = "visual") -> list[str]:
        """Names of the top-level blocks of ``tower`` (``"visual"`` or ``"text"``) in forward order: ResNet
        stages or transformer blocks, the usual places to look for units. Empty if the backend knows none."""
        check_choice("tower", tower, ["visual", "text"])
        return list(self.architecture.blocks.get(tower, ()))

    def attention_sites(self, tower: str = "visual") -> list[str]:
        """Names of the attention modules of ``tower`` in forward order (a ResNet's attention pooling;
        a transformer block's self-attention)."""
        check_choice("tower", tower, ["visual", "text"])
        return list(self.architecture.attention.get(tower, ()))

    def head_count(self, tower: str = "visual") -> int:
        """Attention heads per transformer block of ``tower`` (``"visual"`` or ``"text"``), as the backend
        declares them for head-level sites (:mod:`clipscope.hooks`); 0 for a tower without any (a ResNet)."""
        counts = [self.architecture.heads[a].heads for a in self.attention_sites(tower) if a in self.architecture.heads]
        return counts[0] if counts else 0

    def output_projection(self, attention_site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection of ``attention_site`` split by head: ``(W, b)``, ``W`` of shape
        ``(heads, d_head, D)`` and ``b`` ``(D,)``, detached, in the model's dtype and on its device.

        Head ``h``'s result (the site ``f"{attention_site}.result"``) is ``z[..., h, :] @ W[h]`` with ``z``
        the site ``f"{attention_site}.z"``, and the attention output is the sum over heads plus ``b``.
        Raises :class:`~clipscope.validate.InvalidArgumentError` for a site without head-level sites.
        """
        spec = self._hooked.attention_heads(attention_site)
        return spec.projection(self.model.get_submodule(self.site(attention_site).module))

    def mean_activations(self, images: Any, sites: str | Iterable[str], *, batch_size: int = 64,
                         progress: bool | None = None) -> dict[str, torch.Tensor]:
        """The mean over ``images`` of each image-tower site's activations: ``{site: tensor}``, float32 on the
        CPU, one example's canonical shape (``model.site(name).shape``).

        ``images`` is a preprocessed ``(N, 3, H, W)`` tensor or anything :meth:`encode_image` takes (an
        unreadable image raises :class:`~clipscope.data.ImageLoadError` naming every bad one); the tower
        runs only as far as the deepest site. Mean-ablation over a reference set is
        ``model.ablate(units, value=model.mean_activations(reference, sites))``.
        """
        names = site_names(sites)
        batch_size = check_int("batch_size", batch_size, low=1)
        totals: dict[str, torch.Tensor] = {}
        count = 0
        for batch in self._preprocessed_batches(images, batch_size, progress):
            with torch.no_grad():
                acts = self.activations(batch, names)
            for name in names:
                total = acts[name].cpu().double().sum(dim=0)  # float64 on the CPU: MPS has none
                totals[name] = totals[name] + total if name in totals else total
            count += len(batch)
        if not count:
            raise InvalidArgumentError("images", images, "at least one image to average over")
        return {name: (total / count).float() for name, total in totals.items()}

    def _preprocessed_batches(self, images: Any, batch_size: int, progress: bool | None) -> Iterable[torch.Tensor]:
        """``images`` as preprocessed ``(n <= batch_size, 3, H, W)`` batches; raises
        :class:`~clipscope.data.ImageLoadError` naming every unreadable image once all were read."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            yield from images.split(batch_size)
            return
        batch, bad = [], []
        total = source_length(images)
        for key, item in progress_bar(iter_images(images), progress, total is None or total > batch_size,
                                      "mean activations", total=total):
            if isinstance(item, ImageLoadError):
                bad.append((key, str(item)))
                continue
            batch.append(item if isinstance(item, torch.Tensor) else self.preprocess(item))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
        if bad:
            listing = "; ".join(f"{k}: {r}" for k, r in bad[:10])
            raise ImageLoadError(f"{len(bad)} image(s) could not be read: {listing}", bad)

    def pre_activation_site(self, site: str) -> str:
        """The site holding ``site``'s value before its final activation; ``site`` itself if none.

        A ResNet bottleneck (and its stage) ends in an in-place ReLU: its pre-activation site is the
        residual sum before that ReLU (``visual.layer4.0.act3.pre`` for ``visual.layer4``). Where a unit
        fires the two are equal; where it does not, the pre-activation still has a gradient. Unknown
        sites raise :class:`~clipscope.validate.InvalidArgumentError` with close matches. A feature site's is
        its SAE's pre-activation site, ``f"{site}.pre"``.
        """
        info = self.site(site)
        if info.point == "features":
            return f"{site}.pre"
        return self.architecture.pre_activations.get(site, site)

    @property
    def prefix_tokens(self) -> int:
        """Tokens of the image tower's token sites before its patch tokens (class token, registers); 0 for
        a convolutional image tower."""
        return self.architecture.prefix_tokens

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """``(rows, columns)`` of the image tower's patch tokens; ``None`` for a convolutional tower."""
        return self.architecture.patch_grid

    @property
    def readout(self) -> Readout | None:
        """How a transformer image tower pools its last residual stream, normalizes and projects it into the
        embedding (:class:`~clipscope.backends.Readout`); ``None`` for a convolutional tower."""
        return self.architecture.readout

    @property
    def token_pool(self) -> TokenPool:
        """How a unit of the image tower's token sites is read as one number per image wherever no token is
        named (dataset examples, labels, rendered words, objectives, defences): ``"patches"`` (default: the mean
        over the patch tokens, as a conv channel is read as its mean over positions), ``"class"`` (the class
        token alone, as the CLIP-Dissect reference reads ViT units) or ``"all"`` (every token). Settable; the
        text tower's tokens are always averaged."""
        return self._token_pool

    @token_pool.setter
    def token_pool(self, pool: TokenPool) -> None:
        pool = check_choice("token_pool", pool, TOKEN_POOLS)
        if pool == "class" and not self.prefix_tokens:
            raise InvalidArgumentError("token_pool", pool, f"'patches' or 'all': {self.name}'s image tower has no "
                                                           f"class token")
        self._token_pool = pool

    def _pooling(self, site: Site) -> dict[str, Any]:
        """Keyword arguments of :meth:`Unit.read` / :func:`unit_means` for ``site`` under :attr:`token_pool`."""
        grid = self.patch_grid
        tokens = site.shape[0] if site.layout in ("tokens", "heads") else site.shape[1] if site.layout == "pattern" else 0
        if site.tower != "visual" or grid is None or tokens != self.prefix_tokens + grid[0] * grid[1]:
            return {"pool": "all", "prefix": 0}
        return {"pool": self._token_pool, "prefix": self.prefix_tokens}

    def unit_values(self, site: str, acts: Activations | torch.Tensor) -> torch.Tensor:
        """Every unit of ``site`` read as one number per example, ``(B, n_units)`` in the site's own units: the
        mean over positions for conv sites, tokens pooled as :attr:`token_pool` says, vectors as they are."""
        info = self.site(site)
        tensor = acts if isinstance(acts, torch.Tensor) else acts[info.name]
        return unit_means(tensor, info.layout, **self._pooling(info))

    def redirectable_activations(self) -> list[nn.Module]:
        """The image tower's ReLU modules, whose gradient feature visualization may redirect
        (:func:`clipscope.optvis.render.redirected_relus`)."""
        return [self.model.get_submodule(path) for path in self.architecture.redirectable]

    @property
    def edits_in_force(self) -> bool:
        """Whether an :meth:`ablate`, :meth:`edit` or :meth:`steer` block is in force: the model then computes
        something :attr:`id` does not describe, so nothing computed now may be cached under the id."""
        return bool(self._hooked.ablated_towers)

    def site(self, name: str) -> Site:
        """The :class:`~clipscope.hooks.Site` called ``name`` (unknown names raise with close matches)."""
        return self._hooked.site(name)

    def capture(self, sites: str | Iterable[str], *, grad: bool = False) -> contextlib.AbstractContextManager[Activations]:
        """``with model.capture(sites) as acts:`` records activations of the forward passes inside the block."""
        return self._hooked.capture(sites, grad=grad)

    def activations(self, images: torch.Tensor, sites: str | Iterable[str], *, grad: bool = False) -> Activations:
        """Run the image tower on a preprocessed ``(B, 3, H, W)`` batch only as far as the deepest of ``sites``.

        Returns their activations as :meth:`capture` records them (detached copies unless
        ``grad=True``); the tower's later blocks, pooling and projection are skipped, so a
        unit in a middle block costs only the blocks below it. Ablations in force apply.
        """
        names = site_names(sites)
        wrong = [n for n in names if self.site(n).tower != "visual"]
        if wrong:
            raise InvalidArgumentError("sites", wrong, "sites of the image tower, which activations() runs; "
                                                       "these are not image-tower sites")
        if not (isinstance(images, torch.Tensor) and images.ndim == 4):
            raise TypeError("activations() takes a preprocessed (B, 3, H, W) tensor (see model.preprocess)")
        x = images.to(self.device, self.dtype)
        return self._hooked.run_until(lambda: self.model.encode_image(x), names, grad=grad)

    def ablate(self, units: Unit | Iterable[Unit],
               value: float | torch.Tensor | Mapping[str, torch.Tensor] = 0.0) -> contextlib.AbstractContextManager[None]:
        """``with model.ablate(units):`` sets the units to ``value`` inside the block: a number (default 0), a
        tensor, or ``{site: tensor}`` from which each unit takes its own slice: one example's shape for
        mean-ablation (:meth:`mean_activations` over a reference set) or a batch captured on other inputs
        (an :class:`~clipscope.hooks.Activations`) for patching."""
        return self._hooked.ablate(units, value)

    def edit(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """``with model.edit(site, fn):`` replaces ``site``'s activation (canonical layout, batch first; a copy
        that ``fn`` may modify in place) by ``fn(activation)``, of the same shape, in every forward pass inside
        the block. On a feature site (:meth:`attach`) ``fn`` edits the feature activations and the base site
        changes by the decoder's image of the change (the reconstruction error is kept)."""
        return self._hooked.edit(site, fn)

    def steer(self, units: Unit | Iterable[Unit], alpha: float) -> contextlib.AbstractContextManager[None]:
        """``with model.steer(units, alpha):`` adds ``alpha`` times each unit's write direction to its site in
        every forward pass inside the block (at the unit's token or position, else everywhere): a neuron's
        basis vector, a direction unit's normalized direction, a feature unit's decoder direction (added to
        the SAE's base site). ``alpha`` is in the site's units (a feature's: its activation units)."""
        return self._hooked.steer(units, alpha)

    def attach(self, sae: nn.Module, name: str = "sae") -> str:
        """Attach a :class:`clipscope.sae.SparseAutoencoder` (moved to this model's device and frozen, as the
        model's own parameters are, until :meth:`detach`) as the feature
        site ``f"{sae.site}.{name}"``, returned: its units are the SAE's features, in the layout of the base
        site ``sae.site``, and every unit tool (capture, ablate, steer, dataset examples, rendered words,
        labels, feature visualization of ``f"{site}.pre"``, the atlas) takes them. Raises
        :class:`~clipscope.validate.InvalidArgumentError` naming ``sae.site`` or ``sae.d_in`` when the SAE
        does not fit this model, or ``name`` when the site exists or is a reserved suffix
        (:data:`~clipscope.hooks.RESERVED_SITE_NAMES`)."""
        site = self._hooked.attach(sae, name)
        earlier = next((state for state in self._attached.values() if state.sae is sae), None)
        self._attached[site] = earlier or _SAEState.of(sae)
        sae.to(self.device).requires_grad_(False)
        return site

    def detach(self, site: str) -> None:
        """Remove the feature site ``site`` that :meth:`attach` returned (and its ``.pre`` site); once no site
        uses its SAE any more, the SAE is back on the device and with the ``requires_grad`` it had."""
        self._hooked.detach(site)
        state = self._attached.pop(site)
        if all(other.sae is not state.sae for other in self._attached.values()):
            state.restore()

    def sae(self, site: str) -> nn.Module:
        """The sparse autoencoder of the attached feature site ``site`` (or of its ``.pre`` site)."""
        return self._hooked.sae(site)

    def read(self, unit: Unit, acts: Activations | torch.Tensor) -> torch.Tensor:
        """Return ``unit``'s value per example ``(B,)`` from captured activations."""
        site = self.site(unit.site)
        unit.check(site)
        tensor = acts if isinstance(acts, torch.Tensor) else acts[site.name]
        return unit.read(tensor, site.layout, **self._pooling(site))


@dataclass
class _SAEState:
    """What :meth:`ClipModel.attach` changes of a sparse autoencoder, as it was before: its device and each
    parameter's ``requires_grad``."""

    sae: nn.Module
    device: torch.device | None
    requires_grad: dict[str, bool]

    @classmethod
    def of(cls, sae: nn.Module) -> "_SAEState":
        tensor = next(itertools.chain(sae.parameters(), sae.buffers()), None)
        return cls(sae, tensor.device if tensor is not None else None,
                   {name: p.requires_grad for name, p in sae.named_parameters()})

    def restore(self) -> None:
        if self.device is not None:
            self.sae.to(self.device)
        for name, p in self.sae.named_parameters():
            p.requires_grad_(self.requires_grad.get(name, p.requires_grad))


_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def weights_digest(module: nn.Module) -> str:
    """A short hash (16 hex digits) of ``module``'s configuration (``module.config()`` where it has one) and
    tensors: what cache keys need of a sparse autoencoder. Cached per module and recomputed only when a
    tensor was replaced or changed in place since (its object, storage or version counter moved; a write through
    ``tensor.data`` bypasses the counter and is not seen)."""
    tensors = module.state_dict(keep_vars=True)
    config = repr(module.config() if hasattr(module, "config") else "")
    key = (config, *((name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                     for name, t in tensors.items()))
    cached = _DIGESTS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha1(config.encode())
    for name, tensor in tensors.items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    _DIGESTS[module] = (key, digest.hexdigest()[:16])
    return _DIGESTS[module][1]


def _check_texts(texts: Any) -> list[str]:
    """Return ``texts`` (one string or several) as a list of strings; raise naming ``texts`` otherwise."""
    if isinstance(texts, str):
        return [texts]
    items = list(texts) if isinstance(texts, Iterable) else None
    if items is None or not all(isinstance(t, str) for t in items):
        raise InvalidArgumentError("texts", texts, "a string, a list of strings or a tensor of token ids")
    return items


def _path_key(images: Any, key: Any) -> Any:
    """The result key of the item that :func:`~clipscope.data.iter_images` keyed ``key``: its path for a
    path item, else ``key`` (a folder's items are keyed by path already)."""
    if not isinstance(key, int):
        return key
    if isinstance(images, (str, os.PathLike)):
        item = images
    elif isinstance(images, (list, tuple)):
        item = images[key]
    else:
        return key
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else key


def _items_and_length(source: Any) -> tuple[Iterable[tuple[Any, Any]], int | None]:
    """:func:`~clipscope.data.iter_images` of ``source`` (``(key, image_or_error)`` pairs, a folder's keyed
    by path) and the number of items (``None`` when unknown), listing a folder only once."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        files = list_image_files(source)
        return ((str(path), item) for path, (_, item) in zip(files, iter_images(files))), len(files)
    return iter_images(source), source_length(source)


def _warn_skipped(skipped: Sequence[tuple[Any, str]], total: int) -> None:
    listing = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(f"zero_shot skipped {len(skipped)} of {total} image(s) that could not be read "
                  f"(listed in the result's .skipped): {listing}{more}", UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Loading


def load(name: str, pretrained: str | None = None, device: str | torch.device = "auto",
         precision: str = "auto") -> ClipModel:
    """Load a CLIP model by name and return a :class:`ClipModel`.

    See the module docstring for the accepted ``name`` forms; the backend that loads it is found by
    :func:`clipscope.backends.backend_for`. ``device="auto"`` picks cuda, then mps, then cpu;
    ``precision`` is ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"auto"`` (fp16 on cuda, fp32 elsewhere).

    Raises :class:`~clipscope.hub.UnknownModelError` for names that match nothing
    (with close matches), :class:`~clipscope.hub.WeightsNotAvailableError` when
    the weights are neither cached nor downloadable (with how to get them),
    :class:`~clipscope.hub.UnsafeCheckpointError` for checkpoints that need pickled code,
    :class:`~clipscope.hub.CheckpointError` for a malformed weights file or model folder (naming
    the file and what is wrong), and :class:`~clipscope.validate.InvalidArgumentError` for a bad
    ``device``, ``precision`` or ``pretrained``.
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise InvalidArgumentError("pretrained", pretrained, "None, a pretrained tag or a checkpoint path")
    pretrained = None if pretrained is None else os.fspath(pretrained)
    if isinstance(name, str) and name.startswith("endpoint:"):  # a black box: no weights, no backend adapter
        from .endpoint import load as load_endpoint
        return load_endpoint(name, pretrained)
    loaded = backends.load(name, pretrained, dev, dtype)
    return ClipModel(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)}, device=dev, dtype=dtype)


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"NAME/TAG"`` (e.g. ``"RN50x4/openai"``) into (name, pretrained); other forms pass through.

    ``hf-hub:`` and ``hf:`` ids, folders and plain names come back with ``pretrained=None``.
    """
    if spec.startswith(("hf-hub:", "hf:")) or os.path.exists(spec) or "/" not in spec:
        return spec, None
    name, tag = spec.rsplit("/", 1)
    return name, tag


def load_from_env(default: str = "organism", variable: str = "CLIPSCOPE_MODEL", **kwargs) -> ClipModel:
    """Load the model named by the environment variable ``variable`` (``NAME`` or ``NAME/TAG``), else ``default``.

    This is how notebooks switch from the organism to a real model with one variable:
    ``CLIPSCOPE_MODEL=RN50x4/openai jupyter lab``.
    """
    name, tag = parse_model_spec(os.environ.get(variable) or default)
    return load(name, pretrained=tag, **kwargs)
