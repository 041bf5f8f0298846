"""Model families behind one :class:`~clipscope.model.ClipModel`: the only code that knows module names.

A *backend* (an adapter) loads one family of CLIP models and describes the model it built:
which sites are the blocks of each tower, where each block's pre-activation value is, how many
prefix tokens and which patch grid a ViT image tower has, which sites are attention modules and
which activation modules feature visualization may redirect. Everything above this layer
(optvis, neurons, typographic, audit, widgets, the CLI) asks the model for these
(:meth:`~clipscope.model.ClipModel.blocks`, :meth:`~clipscope.model.ClipModel.pre_activation_site`,
:attr:`~clipscope.model.ClipModel.prefix_tokens`, ...) and never parses site names.

Backends are found through a prefix registry (:data:`REGISTRY`): ``"hf:ORG/REPO"`` is a transformers
``CLIPModel`` (:mod:`clipscope.backends.transformers`); every other name, the organism included, is
open_clip's (:mod:`clipscope.backends.open_clip`). Each backend module has
``load(name, pretrained, device, dtype) -> LoadedModel``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import prompts
from ..hooks import AttentionHeads, Tower

#: ``(name prefix, backend module)`` pairs, tried in order; names matching none go to :data:`DEFAULT_BACKEND`.
REGISTRY: tuple[tuple[str, str], ...] = (("hf:", "transformers"),)
DEFAULT_BACKEND = "open_clip"


@dataclass(frozen=True)
class Readout:
    """How a transformer image tower turns its last residual stream ``(L, D)`` into the image embedding
    (module and parameter paths in the wrapped ``nn.Module``).

    - ``pool``: ``"token"`` (one token, ``token``), ``"mean"`` (the mean over the patch tokens, those after
      the prefix tokens), or a description of another pooling (e.g. open_clip's attentional pooler), which
      :mod:`clipscope.decompose` refuses by that name;
    - ``token``: the pooled token for ``pool="token"`` (0: the class token);
    - ``norm``: the final LayerNorm; ``norm_after_pool``: whether it normalizes the pooled vector (``True``)
      or every token before pooling (``False``; the same for one token);
    - ``projection``: the projection matrix (a parameter), ``None`` where there is none;
      ``projection_transposed``: it is stored ``(out, in)`` as ``nn.Linear`` stores its weight (the
      embedding is ``pooled @ P.T``), else ``(in, out)`` (``pooled @ P``).
    """

    pool: str
    norm: str
    projection: str | None
    token: int = 0
    norm_after_pool: bool = False
    projection_transposed: bool = False


@dataclass(frozen=True)
class Architecture:
    """What a backend declares about one model (site names, never module paths, unless said).

    - ``blocks``: per tower (``"visual"``, ``"text"``), its top-level blocks in forward order
      (ResNet stages, transformer blocks);
    - ``pre_activations``: ``{site: site holding its value before the final activation}`` for the
      sites that end in one (a ResNet bottleneck and its stage: the residual sum before the last
      ReLU); every other site is its own pre-activation;
    - ``prefix_tokens``: tokens of the image tower's token sites before the patch tokens (class
      token, registers); 0 for a convolutional tower;
    - ``patch_grid``: ``(rows, columns)`` of the image tower's patch tokens, ``None`` for a
      convolutional tower;
    - ``attention``: per tower, its attention sites in forward order;
    - ``redirectable``: module paths (in the wrapped ``nn.Module``) of the image tower's ReLU
      activations, whose gradient feature visualization may redirect;
    - ``text_tokens_needed``: for a batch of token ids ``(B, context)``, how many leading positions
      give the same embeddings as the whole context (the model's ``encode_text`` then takes the
      batch cut there); ``None`` where no cut is exact;
    - ``readout``: how a transformer image tower pools, normalizes and projects (:class:`Readout`);
      ``None`` for a convolutional tower;
    - ``heads``: ``{attention site: AttentionHeads}`` for the transformer blocks whose attention splits
      into heads (:class:`~clipscope.hooks.AttentionHeads`: its block, the site before its MLP, the
      number of heads, the explicit computation of :mod:`clipscope.backends.attention` and the output
      projection by head), which gives them head-level sites and residual-stream aliases.
    """

    blocks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pre_activations: Mapping[str, str] = field(default_factory=dict)
    prefix_tokens: int = 0
    patch_grid: tuple[int, int] | None = None
    attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    redirectable: tuple[str, ...] = ()
    text_tokens_needed: Callable[[torch.Tensor], int] | None = None
    readout: Readout | None = None
    heads: Mapping[str, AttentionHeads] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """What a backend hands to :class:`~clipscope.model.ClipModel`: its constructor's arguments
    except the device and dtype (fields named as its parameters)."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    pretrained: str | None
    image_size: tuple[int, int]
    image_mean: Sequence[float]
    image_std: Sequence[float]
    towers: Sequence[Tower]
    architecture: Architecture
    backend: str
    default_templates: Sequence[str] = prompts.DEFAULT_TEMPLATES


def backend_for(name: str) -> str:
    """The backend module name (``"transformers"``, ``"open_clip"``) that loads model ``name``."""
    for prefix, backend in REGISTRY:
        if isinstance(name, str) and name.startswith(prefix):
            return backend
    return DEFAULT_BACKEND


def load(name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``name`` with the backend :func:`backend_for` picks; returns a :class:`LoadedModel` on
    ``device`` in ``dtype``. Errors are the backend's (see :func:`clipscope.load`)."""
    module = importlib.import_module(f"{__name__}.{backend_for(name)}")
    return module.load(name, pretrained, device, dtype)


def relu_paths(root: nn.Module, prefix: str) -> tuple[str, ...]:
    """Module paths of the ``nn.ReLU`` modules of ``root`` under ``prefix`` (a module path)."""
    return tuple(n for n, m in root.named_modules()
                 if isinstance(m, nn.ReLU) and (n == prefix or n.startswith(prefix + ".")))
