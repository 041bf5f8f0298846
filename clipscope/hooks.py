"""Named activation sites of both CLIP towers, unit addressing, capture and ablation.

Every module of the image and text towers whose forward returns a tensor is a
*site*, named after its place in the module tree with a tower prefix:
``visual.layer4.5`` (a ResNet block's output), ``visual.transformer.resblocks.11.mlp.c_fc``,
``text.transformer.resblocks.3``. Activation modules that ReLU in place also get
an input site with the suffix ``.pre``: ``visual.layer4.5.act3.pre`` is a ResNet
bottleneck's residual sum *before* its final ReLU (open_clip's blocks apply
``ReLU(inplace=True)``, so the value is cloned before the ReLU overwrites it).

Activations are always handed out in one canonical, batch-first layout, whatever
the module produced:

- ``"conv"``: ``(B, C, H, W)`` (ResNet feature maps);
- ``"tokens"``: ``(B, L, D)`` (transformer residual streams; models that run
  their transformer sequence-first are transposed here, once);
- ``"vector"``: ``(B, D)`` (pooled embeddings, projections);
- ``"heads"``: ``(B, L, heads, F)`` (per-head values of a transformer block's attention);
- ``"pattern"``: ``(B, heads, queries, keys)`` (attention weights after the softmax).

Transformer blocks whose backend declares their attention heads (:class:`AttentionHeads`) also have
*head-level sites*, for an attention site ``A`` of a block ``B``:

- ``A.pattern``: the attention weights after the softmax, ``(heads, queries, keys)`` per example;
- ``A.v``: each head's values, ``(L, heads, d_head)``;
- ``A.z``: each head's value-weighted sum before the output projection, ``(L, heads, d_head)``;
- ``A.result``: each head's contribution to the residual stream after the output projection, without
  its bias, ``(L, heads, D)``: ``A.result.sum(heads) + bias`` is the attention output;
- ``B.resid_pre``, ``B.resid_mid`` (after the attention is added, before the MLP) and
  ``B.resid_post`` (the block's output): the residual stream, ``(L, D)``.

The fused attention kernel computes none of the per-head tensors, so while a head-level site is
captured or ablated its attention module runs the backend's explicit computation instead (the same
values to float rounding); at all other times the model runs unchanged, at no extra cost.

*Feature sites* (:meth:`HookedModel.attach`) read a site through a sparse autoencoder: ``S.sae`` (for an
SAE attached to ``S`` under the name ``sae``) holds its feature activations in ``S``'s layout with one unit
per feature, ``S.sae.pre`` their pre-activations. Editing feature activations (ablating, patching) edits ``S``
by the decoder's image of the change, so the SAE's reconstruction error is kept; steering adds a feature's
decoder direction to ``S``.

A :class:`Unit` names a site plus an index into it, and reads or ablates itself
the same way for every layout, so objectives and dataset-example mining need no
per-architecture code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .validate import InvalidArgumentError, check_int, check_number, check_vector

Layout = Literal["conv", "tokens", "vector", "heads", "pattern"]

#: The per-head tensors of an explicit attention computation, in the order it produces them.
HEAD_POINTS = ("v", "pattern", "z", "result")
#: Site-name suffixes with a meaning of their own (an in-place ReLU's input, head-level and residual-stream
#: sites), which :meth:`HookedModel.attach` refuses as the name of a feature site.
RESERVED_SITE_NAMES = ("pre", *HEAD_POINTS, "resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class Site:
    """One hookable place in a model.

    ``shape`` is the per-example activation shape in the canonical layout
    (``(C, H, W)``, ``(L, D)``, ``(D,)``, ``(L, heads, F)`` or ``(heads, queries, keys)``).
    ``point`` is ``"output"`` for a module's output, ``"input"`` for its first input (``.pre``
    sites, ``resid_pre``, ``resid_mid``), or one of :data:`HEAD_POINTS` for a per-head tensor of the
    explicit attention computation of the attention module ``module``.
    ``seq_first`` records that the module itself emits ``(L, B, D)``.
    A *feature site* (:meth:`HookedModel.attach`) has point ``"features"`` (a sparse autoencoder's feature
    activations) or ``"pre_features"`` (their pre-activations), computed from the activation of the site
    ``base``, whose layout it shares; ``module_type`` is the autoencoder's class name.
    """

    name: str
    module: str
    tower: Literal["visual", "text"]
    point: Literal["output", "input", "v", "pattern", "z", "result", "features", "pre_features"]
    layout: Layout
    shape: tuple[int, ...]
    module_type: str
    seq_first: bool = False
    base: str | None = None

    @property
    def n_units(self) -> int:
        """Number of channels (``conv``), features (``tokens``/``vector``; per head for ``heads``) or
        keys (``pattern``)."""
        return self.shape[0] if self.layout == "conv" else self.shape[-1]

    @property
    def n_heads(self) -> int:
        """Number of attention heads of a head-level site (``heads``, ``pattern``); 0 for other sites."""
        return self.shape[1] if self.layout == "heads" else self.shape[0] if self.layout == "pattern" else 0

    @property
    def n_tokens(self) -> int:
        """Token positions of a token-like site (``tokens``, ``heads``; the queries of a ``pattern``); 0 otherwise."""
        return self.shape[0] if self.layout in ("tokens", "heads") else self.shape[1] if self.layout == "pattern" \
            else 0

    def canonical(self, raw: torch.Tensor) -> torch.Tensor:
        """Return ``raw`` (as the module emitted it) as a batch-first view."""
        return raw.transpose(0, 1) if self.seq_first else raw


@dataclass(frozen=True, eq=False)
class Unit:
    """A site plus an index: what objectives read, mining ranks and ablation zeroes.

    - ``index``: channel (``conv``), feature/neuron (``tokens``, ``vector``; the head's own features
      on a ``heads`` site) or key position (``pattern``).
    - ``token``: token position (``tokens``, ``heads``; the query position on ``pattern``). ``None``
      means all tokens.
    - ``position``: ``(y, x)`` spatial position (``conv`` only). ``None`` means all positions.
    - ``direction``: a vector over the channels/features, used instead of ``index``.
    - ``head_index``: the attention head on a head-level site (``heads``, ``pattern``), which needs one.

    Build units with the class methods :meth:`channel`, :meth:`neuron`,
    :meth:`token_at`, :meth:`along` and :meth:`head`. A head unit reads like a token unit on its head's
    own ``(L, F)`` slice (a ``pattern`` site's ``(queries, keys)``).
    """

    site: str
    index: int | None = None
    token: int | None = None
    position: tuple[int, int] | None = None
    direction: torch.Tensor | None = None
    head_index: int | None = None

    def __post_init__(self):
        """Check the types once, at construction: ranges depend on the site and are checked by :meth:`check`."""
        if not isinstance(self.site, str) or not self.site.strip():
            raise InvalidArgumentError("site", self.site, "a site name (a non-empty string, see model.layers())")
        if self.index is not None:
            object.__setattr__(self, "index", check_int("index", self.index))
        if self.token is not None:
            object.__setattr__(self, "token", check_int("token", self.token))
        if self.position is not None:
            object.__setattr__(self, "position", _check_position(self.position))
        if self.head_index is not None:
            object.__setattr__(self, "head_index", check_int("head", self.head_index))
        if self.direction is not None:
            if self.index is not None:
                raise InvalidArgumentError("direction", "<vector>", "give an index or a direction, not both")
            object.__setattr__(self, "direction", check_vector("direction", self.direction))

    @classmethod
    def channel(cls, site: str, index: int, position: tuple[int, int] | None = None) -> "Unit":
        """A conv channel, optionally at one spatial position ``(y, x)``."""
        return cls(site, index=index, position=position)

    @classmethod
    def neuron(cls, site: str, index: int, token: int | None = None) -> "Unit":
        """A feature of a token or vector site, optionally at one token."""
        return cls(site, index=index, token=token)

    @classmethod
    def token_at(cls, site: str, token: int) -> "Unit":
        """A whole token (all features at one position) of a ``tokens`` site."""
        return cls(site, token=token)

    @classmethod
    def along(cls, site: str, direction: torch.Tensor, token: int | None = None,
              position: tuple[int, int] | None = None) -> "Unit":
        """A direction vector in a site's channel/feature space."""
        return cls(site, direction=direction, token=token, position=position)

    @classmethod
    def head(cls, site: str, head: int, token: int | None = None, index: int | None = None) -> "Unit":
        """Attention head ``head`` of a head-level site (``A.result``, ``A.z``, ``A.v``, ``A.pattern``).

        Without ``index`` the unit is the head's whole vector at each token (its ``d_head`` values on
        ``A.z``/``A.v``, its write to the residual stream on ``A.result``, its attention row on
        ``A.pattern``): :meth:`read` gives its L2 norm at ``token``, or the mean of the norms over all
        tokens; ablation sets the whole vector. ``index`` picks one feature (a key on ``A.pattern``).
        """
        return cls(site, index=index, token=token, head_index=head)

    def __repr__(self) -> str:
        parts = [repr(self.site)]
        if self.head_index is not None:
            parts.append(f"head={self.head_index}")
        if self.index is not None:
            parts.append(f"index={self.index}")
        if self.direction is not None:
            parts.append(f"direction=<{self.direction.numel()}-d>")
        if self.token is not None:
            parts.append(f"token={self.token}")
        if self.position is not None:
            parts.append(f"position={self.position}")
        return f"Unit({', '.join(parts)})"

    # -- validation ---------------------------------------------------------------
    def check(self, site: Site) -> None:
        """Raise :class:`~clipscope.validate.InvalidArgumentError` naming the field and its valid range
        if the unit does not fit ``site``."""
        kind = "channels" if site.layout == "conv" else "keys" if site.layout == "pattern" else "features"
        n = site.n_units
        self._check_head(site)
        if self.index is not None and not 0 <= self.index < n:
            raise InvalidArgumentError("index", self.index, f"out of range for {site.name!r} with {n} {kind} "
                                                            f"(valid: 0..{n - 1})")
        if self.direction is not None and self.direction.numel() != n:
            raise InvalidArgumentError("direction", f"<{self.direction.numel()} entries>",
                                       f"direction has {self.direction.numel()} entries but {site.name!r} has "
                                       f"{n} {kind}; give one entry per {kind[:-1]}")
        if self.token is not None:
            if site.layout not in ("tokens", "heads", "pattern"):
                raise InvalidArgumentError("token", self.token, f"token= needs a tokens site; {site.name!r} has "
                                                                f"layout {site.layout!r}")
            length = site.n_tokens
            if not -length <= self.token < length:
                raise InvalidArgumentError("token", self.token, f"out of range for {site.name!r} with {length} "
                                                                f"tokens (valid: {-length}..{length - 1})")
        if self.position is not None:
            if site.layout != "conv":
                raise InvalidArgumentError("position", self.position, f"position= needs a conv site; {site.name!r} "
                                                                      f"has layout {site.layout!r}")
            y, x = self.position
            _, h, w = site.shape
            if not (0 <= y < h and 0 <= x < w):
                raise InvalidArgumentError("position", self.position, f"outside {site.name!r}'s {h}x{w} grid "
                                                                      f"(valid: (0..{h - 1}, 0..{w - 1}))")
        if self.index is None and self.direction is None and self.token is None and self.position is None \
                and self.head_index is None:
            raise InvalidArgumentError("unit", self, "a unit that selects something: give index, direction, "
                                                     "token or position (this one selects nothing)")

    def _check_head(self, site: Site) -> None:
        """A head-level site needs ``head_index`` in range; every other site takes none."""
        heads = site.n_heads
        if heads and self.head_index is None:
            raise InvalidArgumentError("head", None, f"{site.name!r} is a head-level site with {heads} heads: "
                                                     f"address it with Unit.head(site, head) (valid heads: "
                                                     f"0..{heads - 1})")
        if heads and not 0 <= self.head_index < heads:
            raise InvalidArgumentError("head", self.head_index, f"out of range for {site.name!r} with {heads} "
                                                                f"heads (valid: 0..{heads - 1})")
        if not heads and self.head_index is not None:
            raise InvalidArgumentError("head", self.head_index, f"head= needs a head-level site (layout 'heads' "
                                                                f"or 'pattern': an attention site's .pattern, .v, "
                                                                f".z or .result); {site.name!r} has layout "
                                                                f"{site.layout!r}")

    # -- reading ------------------------------------------------------------------
    def _on_head(self, acts: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
        """``acts`` narrowed to this unit's head, as a ``tokens`` view ``(B, L, F)`` (a pattern's
        ``(B, queries, keys)``); other layouts unchanged. Writes to the view reach ``acts``."""
        if layout == "heads":
            return acts[:, :, self.head_index], "tokens"
        if layout == "pattern":
            return acts[:, self.head_index], "tokens"
        return acts, layout

    def _selector(self, layout: Layout) -> list[Any]:
        """Index into the feature-last view that picks this unit's token/position."""
        where: list[Any] = [slice(None)] * (4 if layout == "conv" else 3 if layout == "tokens" else 2)
        if self.position is not None:
            where[1], where[2] = self.position
        if self.token is not None:
            where[1] = self.token
        return where

    def activation_map(self, acts: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Return this unit's value at every position: ``(B, H, W)`` for conv, ``(B, L)`` for tokens and
        head units (queries for a pattern), ``(B,)`` for vectors.

        ``token`` and ``position`` are ignored here (the map covers all of them).
        A whole-token, whole-position or whole-head unit (no index, no direction) reads as the L2 norm.
        """
        acts, layout = self._on_head(acts, layout)
        view = feature_last(acts, layout)
        if self.index is not None:
            return view[..., self.index]
        if self.direction is not None:
            return view @ self.direction.to(view.device, view.dtype)
        return view.norm(dim=-1)

    def read(self, acts: torch.Tensor, layout: Layout, *, pool: TokenPool = "all", prefix: int = 0) -> torch.Tensor:
        """Return one value per example, shape ``(B,)``, in the site's own units.

        At a given ``token``/``position`` the value there; otherwise the mean over all spatial
        positions, and over tokens (a head unit's tokens, or a pattern's queries) as ``pool`` says
        (:func:`pool_tokens`; ``prefix`` is the number of tokens before the patch tokens).
        """
        values = self.activation_map(acts, layout)
        if self.position is not None:
            return values[:, self.position[0], self.position[1]]
        if self.token is not None:
            return values[:, self.token]
        if values.ndim == 2 and layout != "conv":
            return pool_tokens(values, pool, prefix)
        return values.flatten(1).mean(dim=1) if values.ndim > 1 else values

    def value_in(self, source: torch.Tensor, layout: Layout) -> torch.Tensor:
        """This unit's value in ``source`` (canonical layout), in the form :meth:`ablate_` takes to set it
        back: the selected region (for a direction: the component along the normalized direction)."""
        acts, layout = self._on_head(source, layout)
        view = feature_last(acts, layout)
        where = self._selector(layout)
        if self.direction is not None:
            d = self.direction.to(view.device, view.dtype)
            return view[tuple(where)] @ (d / d.norm())
        if self.index is not None:
            where[-1] = self.index
        return view[tuple(where)]

    # -- ablation -----------------------------------------------------------------
    def ablate_(self, acts: torch.Tensor, layout: Layout, value: float | torch.Tensor = 0.0) -> None:
        """Set this unit in ``acts`` (canonical layout, modified in place) to ``value``.

        For a direction, the component along the (normalized) direction is set to
        ``value``; everything orthogonal to it is kept.
        """
        acts, layout = self._on_head(acts, layout)
        view = feature_last(acts, layout)
        where = self._selector(layout)
        if self.direction is not None:
            d = self.direction.to(view.device, view.dtype)
            d = d / d.norm()
            region = view[tuple(where)]
            coef = region @ d
            view[tuple(where)] = region - (coef - value).unsqueeze(-1) * d
            return
        if self.index is not None:
            where[-1] = self.index
        view[tuple(where)] = value

    def add_(self, acts: torch.Tensor, layout: Layout, vector: torch.Tensor) -> None:
        """Add ``vector`` (one entry per channel/feature of ``acts``) at this unit's token/position, or at
        every one, in ``acts`` (canonical layout, modified in place); the unit's index is not used."""
        acts, layout = self._on_head(acts, layout)
        view = feature_last(acts, layout)
        where = tuple(self._selector(layout))
        view[where] = view[where] + vector.to(view.device, view.dtype)


def _check_position(position: Any) -> tuple[int, int]:
    """``position`` as a ``(y, x)`` pair of ints, or an error naming it."""
    if isinstance(position, (str, bytes)) or not isinstance(position, Sequence) or len(position) != 2:
        raise InvalidArgumentError("position", position, "a (y, x) pair of integers")
    try:
        return check_int("position", position[0]), check_int("position", position[1])
    except InvalidArgumentError:
        raise InvalidArgumentError("position", position, "a (y, x) pair of integers") from None


#: How a ``tokens`` site is read as one number per image when no token is named: the mean over the
#: patch tokens (the analogue of a conv channel's mean over positions), the class token alone (what
#: CLIP-Dissect reads and the image embedding pools), or the mean over every token.
TOKEN_POOLS: tuple[str, ...] = ("patches", "class", "all")
TokenPool = Literal["patches", "class", "all"]


def pool_tokens(values: torch.Tensor, pool: TokenPool, prefix: int) -> torch.Tensor:
    """Reduce ``values`` ``(B, L, ...)`` over its token axis as ``pool`` says (see :data:`TOKEN_POOLS`); the
    first ``prefix`` tokens come before the patch tokens (class token, registers). Returns ``(B, ...)``."""
    if pool == "class":
        return values[:, 0]
    if pool == "patches":
        return values[:, prefix:].mean(dim=1)
    return values.mean(dim=1)


def unit_means(acts: torch.Tensor, layout: Layout, *, pool: TokenPool = "all", prefix: int = 0) -> torch.Tensor:
    """Every unit's value per example, ``(B, n_units)``: the mean over positions, tokens pooled as ``pool``
    says (:func:`pool_tokens`), vectors as they are.

    Head-level layouts have no such table (a feature index means nothing without a head): they raise
    :class:`~clipscope.validate.InvalidArgumentError`; read them per head with :meth:`Unit.head`."""
    if layout in ("heads", "pattern"):
        raise InvalidArgumentError("layout", layout, "'conv', 'tokens' or 'vector': a head-level site's units are "
                                                     "read per head (Unit.head)")
    view = feature_last(acts, layout)
    if layout == "tokens":
        return pool_tokens(view, pool, prefix)
    return view if view.ndim == 2 else view.flatten(1, -2).mean(dim=1)


def feature_last(acts: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Return a view of canonical ``acts`` with the channel/feature axis last (conv: ``(B, H, W, C)``)."""
    return acts.movedim(1, -1) if layout == "conv" else acts


def feature_first(acts: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of :func:`feature_last`: a feature-last view back in the canonical layout."""
    return acts.movedim(-1, 1) if layout == "conv" else acts


# ----------------------------------------------------------------------------------
# Site discovery


_ACTIVATIONS = (nn.ReLU,)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state") and isinstance(output.last_hidden_state, torch.Tensor):
        return output.last_hidden_state
    return None


def _classify(shape: tuple[int, ...], batch: int) -> tuple[Layout, tuple[int, ...], bool] | None:
    """Return (layout, per-example canonical shape, seq_first) for a raw activation shape.

    Only modules' outputs and inputs come here; head-level sites (a 4-D attention pattern is not a
    conv map) are derived from the attention sites by :func:`with_head_sites`."""
    if len(shape) == 4 and shape[0] == batch:
        return "conv", tuple(shape[1:]), False
    if len(shape) == 3 and shape[0] == batch:
        return "tokens", tuple(shape[1:]), False
    if len(shape) == 3 and shape[1] == batch:
        return "tokens", (shape[0], shape[2]), True
    if len(shape) == 2 and shape[0] == batch:
        return "vector", (shape[1],), False
    return None


@dataclass(frozen=True)
class Tower:
    """How to find one tower's sites: ``prefixes`` maps module-path prefixes to site-name
    prefixes (``{"visual": "visual"}``; ``{"": "text."}`` claims every module no earlier
    tower claimed), and ``run(batch)`` runs the tower on a dummy batch of ``batch`` examples."""

    name: Literal["visual", "text"]
    prefixes: Mapping[str, str]
    run: Callable[[int], Any]

    def site_name(self, module_name: str) -> str | None:
        for module_prefix, site_prefix in self.prefixes.items():
            if module_name.startswith(module_prefix):
                return site_prefix + module_name[len(module_prefix):]
        return None


def _shape_recorder(found: dict, name: str, site_name: str, module: nn.Module, point: str = "output"):
    """A hook that records the first shape a module emits (``output``) or receives (``input``)."""
    if point == "output":
        def hook(_m, _inp, out):
            t = _first_tensor(out)
            if t is not None and site_name not in found:
                found[site_name] = (name, site_name, module, point, t.shape)
        return hook

    def pre_hook(_m, inp):
        if inp and isinstance(inp[0], torch.Tensor) and site_name not in found:
            found[site_name] = (name, site_name, module, point, inp[0].shape)
    return pre_hook


def _run_for_shapes(tower: Tower, batch: int, found: dict, fake_tensors: bool) -> None:
    """Run ``tower`` on a dummy batch for its shapes only: on fake tensors (shapes and dtypes, no data, no
    arithmetic), or for real where a fake run cannot go (a model that reads a tensor's values)."""
    if fake_tensors:
        from torch._subclasses.fake_tensor import FakeTensorMode  # torch's shape propagation (as in torch.export)
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                tower.run(batch)
            return
        except Exception:  # any op without a fake implementation, or a value read from data
            found.clear()
    with torch.no_grad():
        tower.run(batch)


def discover_sites(root: nn.Module, towers: Sequence[Tower], *, fake_tensors: bool = True) -> dict[str, Site]:
    """Find every site by running each tower once on a dummy batch, recording output shapes.

    With ``fake_tensors`` (the default) the run propagates shapes only, on torch's fake tensors: no
    arithmetic, so discovery on a large model costs a fraction of a forward pass (``bench/site_discovery.py``);
    a tower that cannot run on fake tensors is run for real. ``fake_tensors=False`` always runs for real.
    Returns ``{site name: Site}`` in forward order."""
    batch = 3  # differs from every token count a CLIP tower produces (1 + g*g, context length)
    named = [(n, m) for n, m in root.named_modules() if n]
    claimed: set[str] = set()
    sites: dict[str, Site] = {}
    for tower in towers:
        members = []
        for n, m in named:
            site_name = None if n in claimed else tower.site_name(n)
            if site_name is not None:
                members.append((n, site_name, m))
                claimed.add(n)
        found: dict[str, tuple[str, str, nn.Module, str, torch.Size]] = {}
        handles = []
        for name, site_name, module in members:
            handles.append(module.register_forward_hook(_shape_recorder(found, name, site_name, module)))
            if isinstance(module, _ACTIVATIONS):
                handles.append(module.register_forward_pre_hook(
                    _shape_recorder(found, name, site_name + ".pre", module, point="input")))
        try:
            _run_for_shapes(tower, batch, found, fake_tensors)
        finally:
            for h in handles:
                h.remove()
        order = {site_name: i for i, (_, site_name, _) in enumerate(members)}
        for key in sorted(found, key=lambda k: (order[k.removesuffix(".pre")], not k.endswith(".pre"))):
            mod_name, site_name, module, point, shape = found[key]
            cls = _classify(tuple(shape), batch)
            if cls is None:
                continue
            layout, per_example, seq_first = cls
            sites[site_name] = Site(site_name, mod_name, tower.name, point, layout, per_example,
                                    type(module).__name__, seq_first)
    return sites


# ----------------------------------------------------------------------------------
# Head-level sites


@dataclass(frozen=True)
class AttentionHeads:
    """A backend's declaration of one transformer block's attention heads: what the hooks layer needs.

    - ``site``: the attention site (its module returns the attention output, bias included);
    - ``block``: the transformer block site it belongs to (input ``resid_pre``, output ``resid_post``);
    - ``mid``: the site whose input is the residual stream after the attention and before the MLP
      (the block's second LayerNorm): ``resid_mid``;
    - ``heads``: the number of heads;
    - ``forward``: the family's explicit computation, called as ``forward(module, points, *args,
      **kwargs)`` in place of the module's own forward while a head-level site is in use; it passes its
      per-head tensors through ``points`` (:class:`HeadPoints`) and returns what the module returns;
    - ``projection``: ``projection(module) -> (W, b)``, the output projection split by head: ``W`` of
      shape ``(heads, d_head, D)`` and ``b`` ``(D,)``, so that a head's result is ``z[..., h, :] @ W[h]``
      (a layer scale between the attention and the residual stream folded in: the result is what the
      head adds to the stream).
    """

    site: str
    block: str
    mid: str
    heads: int
    forward: Callable[..., Any]
    projection: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]


class HookPoint(nn.Module):
    """An identity module: somewhere to hang forward hooks on a tensor that no module of the model emits.
    It owns no parameters and is not part of the model's module tree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HeadPoints:
    """The hook points of one attention module's explicit computation (one :class:`HookPoint` per
    :data:`HEAD_POINTS` entry) and how many captures and ablations use each."""

    def __init__(self):
        self.points = {kind: HookPoint() for kind in HEAD_POINTS}
        self._users = dict.fromkeys(HEAD_POINTS, 0)

    def __call__(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """Pass the ``kind`` tensor (canonical layout, batch first) through its hook point; returns it as
        the hooks left it (an ablation may replace it)."""
        return self.points[kind](tensor)

    def wants(self, kind: str) -> bool:
        """Whether a capture or an ablation uses ``kind`` now (an explicit computation need not build an
        unused ``result``, which is ``heads`` times larger than the attention output)."""
        return self._users[kind] > 0

    def use(self, kind: str, count: int) -> None:
        """Count ``count`` more (or, negative, fewer) users of ``kind``."""
        self._users[kind] += count


def with_head_sites(sites: Mapping[str, Site], heads: Mapping[str, AttentionHeads]) -> dict[str, Site]:
    """``sites`` plus the head-level sites (after each attention site) and the residual-stream aliases
    (after each block site) of the attention modules in ``heads`` (keyed by attention site).

    Shapes are derived from the discovered ones (no extra forward pass): for an attention output of
    ``(L, D)`` and ``h`` heads, ``pattern`` is ``(h, L, L)``, ``v`` and ``z`` ``(L, h, D / h)``,
    ``result`` ``(L, h, D)``, and the aliases ``(L, D)``. A declaration whose sites were not found
    adds nothing.
    """
    extra: dict[str, dict[str, Site]] = {}
    for spec in heads.values():
        attn, block, mid = sites.get(spec.site), sites.get(spec.block), sites.get(spec.mid)
        if attn is None or block is None or mid is None or attn.layout != "tokens":
            continue
        (length, width), h = attn.shape, spec.heads
        shapes = {"v": ("heads", (length, h, width // h)), "pattern": ("pattern", (h, length, length)),
                  "z": ("heads", (length, h, width // h)), "result": ("heads", (length, h, width))}
        extra[attn.name] = {f"{attn.name}.{kind}": Site(f"{attn.name}.{kind}", attn.module, attn.tower, kind,
                                                          layout, shape, attn.module_type)
                            for kind, (layout, shape) in shapes.items()}
        extra.setdefault(block.name, {}).update({
            f"{block.name}.resid_pre": dataclasses.replace(block, name=f"{block.name}.resid_pre", point="input"),
            f"{block.name}.resid_mid": dataclasses.replace(mid, name=f"{block.name}.resid_mid", point="input"),
            f"{block.name}.resid_post": dataclasses.replace(block, name=f"{block.name}.resid_post")})
    out: dict[str, Site] = {}
    for name, site in sites.items():
        out[name] = site
        out.update(extra.get(name, {}))
    return out


# ----------------------------------------------------------------------------------
# Capture and ablation


class Activations(Mapping[str, torch.Tensor]):
    """Activations recorded by :meth:`HookedModel.capture`, by site name, in canonical layout.

    Every forward pass inside the ``with`` block appends its batch, so
    ``acts[site]`` holds all examples seen, concatenated along dimension 0.
    """

    def __init__(self, sites: Sequence[str]):
        self._chunks: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

    def _add(self, site: str, value: torch.Tensor) -> None:
        self._chunks[site].append(value)

    def __getitem__(self, site: str) -> torch.Tensor:
        chunks = self._chunks[site]
        if not chunks:
            raise KeyError(f"{site!r} recorded nothing: no forward pass reached it inside the capture block")
        if len(chunks) > 1:
            self._chunks[site] = chunks = [torch.cat(chunks, dim=0)]
        return chunks[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._chunks)

    def __len__(self) -> int:
        return len(self._chunks)


def site_names(sites: str | Iterable[str]) -> list[str]:
    """One site name or several, as a list without repeats (first-use order)."""
    if isinstance(sites, str):
        return [sites]
    if not isinstance(sites, Iterable):
        raise InvalidArgumentError("sites", sites, "a site name or a list of site names (see model.layers())")
    names = list(sites)
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgumentError("sites", names, f"site names (strings); {name!r} is not one")
    return list(dict.fromkeys(names))


class _ReachedSites(Exception):
    """Raised inside a forward pass by :meth:`HookedModel.run_until` once every site has recorded."""


class HookedModel:
    """Site discovery, capture and ablation over one ``nn.Module``.

    Sites are found lazily, on first use, by :func:`discover_sites`; ``heads`` (keyed by attention
    site) adds the head-level sites and residual-stream aliases of those attention modules
    (:func:`with_head_sites`).
    """

    def __init__(self, root: nn.Module, towers: Sequence[Tower], heads: Mapping[str, AttentionHeads] | None = None):
        self._root = root
        self._towers = towers
        self._heads = dict(heads or {})
        self._sites: dict[str, Site] | None = None
        self._ablated_towers: list[str] = []
        self._recorded_towers: list[str] = []
        self._head_points: dict[str, HeadPoints] = {}  # attention module path -> its hook points
        self._explicit: dict[str, tuple[int, Any]] = {}  # module path -> (users, its own instance forward)
        self._saes: dict[str, nn.Module] = {}  # feature site (and its .pre site) -> its sparse autoencoder

    @property
    def sites(self) -> dict[str, Site]:
        if self._sites is None:
            self._sites = with_head_sites(discover_sites(self._root, self._towers), self._heads)
        return self._sites

    def site(self, name: str) -> Site:
        """Return the :class:`Site` called ``name``; unknown names raise
        :class:`~clipscope.validate.InvalidArgumentError` with close matches."""
        if not isinstance(name, str):
            raise InvalidArgumentError("site", name, "a site name (a string); model.layers() lists them")
        try:
            return self.sites[name]
        except KeyError:
            import difflib
            close = difflib.get_close_matches(name, list(self.sites), n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise InvalidArgumentError("site", name, f"Unknown site; model.layers() lists all "
                                                     f"{len(self.sites)} sites.{hint}") from None

    def attention_heads(self, site: str) -> AttentionHeads:
        """The declaration of the attention site ``site``; raises
        :class:`~clipscope.validate.InvalidArgumentError` listing the valid ones if it has none."""
        self.site(site)
        if site not in self._heads:
            valid = list(self._heads)
            raise InvalidArgumentError("site", site, "an attention site with head-level sites"
                                                     + (f" (one of {valid[0]!r} .. {valid[-1]!r})" if valid
                                                        else "; this model declares none"))
        return self._heads[site]

    def attach(self, sae: nn.Module, name: str = "sae") -> str:
        """Add the *feature site* ``f"{sae.site}.{name}"`` (and its pre-activation site, the same name plus
        ``.pre``) whose activation is ``sae``'s feature activations of the base site ``sae.site``, in the base
        site's layout with ``sae.n_features`` units. Returns the feature site's name.

        ``sae`` is a :class:`clipscope.sae.SparseAutoencoder` (or anything with its ``site``, ``d_in``,
        ``n_features``, ``encode``, ``pre_activation``, ``decoder_direction``, ``W_dec`` and
        ``input_scale``). Raises :class:`~clipscope.validate.InvalidArgumentError` for a base site that is
        not a conv, tokens or vector site of this model, a ``d_in`` that differs from its units, a name in
        use or one of :data:`RESERVED_SITE_NAMES`."""
        missing = [a for a in ("site", "d_in", "n_features", "encode", "pre_activation", "decoder_direction",
                               "W_dec", "input_scale") if not hasattr(sae, a)]
        if missing or not isinstance(sae, nn.Module):
            raise InvalidArgumentError("sae", type(sae).__name__, "a clipscope.sae.SparseAutoencoder"
                                       + (f" (this lacks {', '.join(missing)})" if missing else ""))
        base = self._sae_base(sae)
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_SITE_NAMES:
            raise InvalidArgumentError("name", name, "a name of letters, digits and underscores (e.g. 'sae') "
                                                     f"other than the site suffixes {', '.join(RESERVED_SITE_NAMES)}")
        site_name = f"{base.name}.{name}"
        if site_name in self.sites or f"{site_name}.pre" in self.sites:
            raise InvalidArgumentError("name", name, f"a name not in use at {base.name!r} "
                                                     f"({site_name!r} exists; detach it first)")
        shape = (sae.n_features, *base.shape[1:]) if base.layout == "conv" else (*base.shape[:-1], sae.n_features)
        sites = [Site(n, base.module, base.tower, point, base.layout, shape, type(sae).__name__, base=base.name)
                 for n, point in ((site_name, "features"), (f"{site_name}.pre", "pre_features"))]
        names = list(self.sites)
        after = max(i for i, n in enumerate(names) if n == base.name or self.sites[n].base == base.name)
        items = list(self.sites.items())
        self._sites = dict(items[:after + 1] + [(s.name, s) for s in sites] + items[after + 1:])
        self._saes.update({s.name: sae for s in sites})
        return site_name

    def _sae_base(self, sae: nn.Module) -> Site:
        """The base site of ``sae``, checked: a conv, tokens or vector site of this model with ``sae.d_in`` units."""
        valid = [s.name for s in self.sites.values() if s.layout in ("conv", "tokens", "vector") and s.base is None]
        if sae.site not in valid:
            import difflib
            close = difflib.get_close_matches(str(sae.site), valid, n=5, cutoff=0.6)
            raise InvalidArgumentError("sae.site", sae.site, "a conv, tokens or vector site of this model ("
                                       + (f"close: {', '.join(close)}" if close else
                                          f"{len(valid)} sites, e.g. {', '.join(valid[:3])}; model.layers() lists them")
                                       + ")")
        base = self.sites[sae.site]
        if sae.d_in != base.n_units:
            raise InvalidArgumentError("sae.d_in", sae.d_in, f"{base.n_units}, the units of {base.name!r}")
        return base

    def detach(self, site: str) -> None:
        """Remove the feature site ``site`` (the name :meth:`attach` returned) and its pre-activation site."""
        if site not in self._saes or self.sites[site].point != "features":
            attached = [n for n, s in self.sites.items() if s.point == "features"]
            raise InvalidArgumentError("site", site, f"an attached feature site (attached: {attached or 'none'})")
        for name in (site, f"{site}.pre"):
            del self._saes[name], self._sites[name]

    def sae(self, site: str) -> nn.Module:
        """The sparse autoencoder of the feature site (or pre-activation site) ``site``."""
        info = self.site(site)
        if info.base is None:
            attached = [n for n, s in self.sites.items() if s.point == "features"]
            raise InvalidArgumentError("site", site, f"an attached feature site (attached: {attached or 'none'})")
        return self._saes[info.name]

    def _feature_sae(self, site: Site) -> nn.Module:
        return self._saes[site.name]

    def _hook_target(self, site: Site) -> Site:
        """The site whose module a hook for ``site`` goes on: a feature site's base site, else ``site``."""
        return self.sites[site.base] if site.base is not None else site

    def _module(self, site: Site) -> nn.Module:
        if site.point in HEAD_POINTS:
            return self._head_points.setdefault(site.module, HeadPoints()).points[site.point]
        return self._root.get_submodule(site.module)

    @property
    def ablated_towers(self) -> set[str]:
        """Towers with an ablation currently in force."""
        return set(self._ablated_towers)

    @property
    def hooked_towers(self) -> set[str]:
        """Towers with an ablation or a capture currently in force (whose sites must see the full forward pass)."""
        return set(self._ablated_towers) | set(self._recorded_towers)

    @contextlib.contextmanager
    def _explicit_attention(self, sites: Sequence[Site]) -> Iterator[None]:
        """Run the attention modules of the head-level sites among ``sites`` by their backend's explicit
        computation while the block lasts (nested uses are counted; the module's own forward is back after
        the last). Other modules, and these outside the block, run unchanged; if setting up one site
        fails, those set up before it are undone."""
        done: list[Site] = []
        try:
            for site in sites:
                if site.point in HEAD_POINTS:
                    self._use_explicit(site)
                    done.append(site)
            yield
        finally:
            for site in reversed(done):
                self._release_explicit(site)

    def _use_explicit(self, site: Site) -> None:
        """Count one more use of the head-level ``site``; its attention module's first use swaps in the
        explicit computation. Nothing changes if this raises."""
        points = self._head_points.setdefault(site.module, HeadPoints())
        users, own = self._explicit.get(site.module, (0, None))
        if users == 0:
            module = self._root.get_submodule(site.module)
            spec = next(s for s in self._heads.values() if self.sites[s.site].module == site.module)
            own = module.__dict__.get("forward")
            module.forward = functools.partial(spec.forward, module, points)
        points.use(site.point, 1)
        self._explicit[site.module] = (users + 1, own)

    def _release_explicit(self, site: Site) -> None:
        """Undo one :meth:`_use_explicit` of ``site``; the last use of a module gives it back its own forward."""
        self._head_points[site.module].use(site.point, -1)
        users, own = self._explicit.pop(site.module)
        if users > 1:
            self._explicit[site.module] = (users - 1, own)
            return
        module = self._root.get_submodule(site.module)
        if own is None:
            del module.forward
        else:
            module.forward = own

    @contextlib.contextmanager
    def capture(self, sites: str | Iterable[str], *, grad: bool = False) -> Iterator[Activations]:
        """Record the activations of ``sites`` during the forward passes inside the block.

        With ``grad=False`` values are detached copies; with ``grad=True`` they stay
        in the autograd graph (for objectives). Values are always copies, so later
        in-place operations in the model cannot change what was recorded.
        """
        with self._recording(sites, grad, on_record=None) as acts:
            yield acts

    def run_until(self, forward: Callable[[], Any], sites: str | Iterable[str], *, grad: bool = False) -> Activations:
        """Call ``forward()`` but stop it as soon as every site of ``sites`` has recorded its activation.

        Returns the activations (as :meth:`capture` records them); the rest of the forward
        pass, e.g. a tower's later blocks and projection, is never computed. Each site's
        module must run once per forward pass (true of CLIP towers). Raises ``ValueError``
        if ``forward()`` finishes without reaching every site. With no sites, ``forward()`` is
        not called at all.
        """
        names = site_names(sites)
        pending = set(names)
        if not pending:
            return Activations([])

        def recorded(name: str) -> None:
            pending.discard(name)
            if not pending:
                raise _ReachedSites

        with self._recording(names, grad, on_record=recorded) as acts:
            try:
                forward()
            except _ReachedSites:
                return acts
        raise ValueError(f"the forward pass never reached {sorted(pending)}")

    @contextlib.contextmanager
    def _recording(self, sites: str | Iterable[str], grad: bool,
                   on_record: Callable[[str], None] | None) -> Iterator[Activations]:
        names = site_names(sites)
        resolved = [self.site(n) for n in names]
        acts = Activations(names)
        handles = []

        def record(site: Site, target: Site, t: torch.Tensor) -> None:
            t = target.canonical(t)
            if site.base is not None:
                with contextlib.nullcontext() if grad else torch.no_grad():
                    t = _sae_values(self._feature_sae(site), site, t)
            acts._add(site.name, t.clone() if grad else t.detach().clone())
            if on_record is not None:
                on_record(site.name)

        for site in resolved:
            target = self._hook_target(site)
            module = self._module(target)
            if target.point == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, inp, site=site, target=target: record(site, target, inp[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _inp, out, site=site, target=target: record(site, target, _first_tensor(out))))
        towers = sorted({site.tower for site in resolved})
        self._recorded_towers.extend(towers)
        try:
            with self._explicit_attention([self._hook_target(site) for site in resolved]):
                yield acts
        finally:
            for h in handles:
                h.remove()
            for t in towers:
                self._recorded_towers.remove(t)

    @contextlib.contextmanager
    def edit(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Replace the activation of ``site`` by ``fn(activation)`` in every forward pass inside the block.

        ``fn`` gets a copy of the activation in the site's canonical, batch-first layout (it may modify it
        in place) and returns a tensor of the same shape. On a feature site (:meth:`attach`) ``fn`` edits the
        feature activations ``f`` and the base site's activation ``x`` becomes ``x + (fn(f) - f) @ W_dec``
        (in the base site's units): the SAE's reconstruction error is kept.
        """
        if not callable(fn):
            raise InvalidArgumentError("fn", fn, "a function from an activation tensor to one of the same shape")
        with self._editing({self.site(site).name: fn}):
            yield

    @contextlib.contextmanager
    def _editing(self, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Apply ``{site: fn}`` (see :meth:`edit`) in every forward pass inside the block."""
        resolved = [self.sites[name] for name in edits]
        for site in resolved:
            if site.point == "pre_features":
                raise InvalidArgumentError("site", site.name, f"a site that writes to the model: "
                                                              f"{site.name!r} holds pre-activations (edit "
                                                              f"{site.name.removesuffix('.pre')!r})")
        handles = []
        try:
            for site in resolved:
                target = self._hook_target(site)
                fn = edits[site.name] if site.base is None else _through_features(self._feature_sae(site), site,
                                                                                   edits[site.name])
                handles.append(_edit_hook(self._module(target), target.point, _canonical_edit(target, fn)))
            targets = [self._hook_target(site) for site in resolved]
            towers = sorted({site.tower for site in resolved})
            self._ablated_towers.extend(towers)
            try:
                with self._explicit_attention(targets):
                    yield
            finally:
                for t in towers:
                    self._ablated_towers.remove(t)
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def ablate(self, units: Unit | Iterable[Unit],
               value: float | torch.Tensor | Mapping[str, torch.Tensor] = 0.0) -> Iterator[None]:
        """Set ``units`` to ``value`` (default 0) in every forward pass inside the block.

        ``value`` is a number, a tensor broadcastable to each unit's selected region, or a mapping
        ``{site: tensor}`` in the sites' canonical layout (such as :class:`Activations`), from which each
        unit takes its own value (:meth:`Unit.value_in`): a tensor of one example's shape applies to every
        example (mean-ablation with means over a reference set), a batch as long as the forward pass's
        patches each example from its counterpart (activations captured on other inputs). Units of a
        feature site set feature activations; the base site changes by the decoder's image of the change.
        """
        by_site = self._units_by_site(units)
        if isinstance(value, Mapping):
            sources = _check_sources(value, [self.sites[n] for n in by_site])
        elif not isinstance(value, torch.Tensor):
            value = check_number("value", value)
        edits = {}
        for name, site_units in by_site.items():
            site = self.sites[name]

            def edit(view: torch.Tensor, site=site, site_units=site_units) -> torch.Tensor:
                source = _source_batch(sources[site.name], view) if isinstance(value, Mapping) else None
                for u in site_units:
                    u.ablate_(view, site.layout, value if source is None else u.value_in(source, site.layout))
                return view
            edits[name] = edit
        with self._editing(edits):
            yield

    @contextlib.contextmanager
    def steer(self, units: Unit | Iterable[Unit], alpha: float) -> Iterator[None]:
        """Add ``alpha`` times each unit's write direction (:meth:`write_direction`) to its site's activation
        (a feature unit's: to its base site's), at the unit's token or position, or at every one, in every
        forward pass inside the block."""
        alpha = check_number("alpha", alpha)
        writes: dict[str, list[tuple[Unit, torch.Tensor]]] = {}
        for name, site_units in self._units_by_site(units).items():
            target = self._hook_target(self.sites[name])
            writes.setdefault(target.name, []).extend((u, alpha * self.write_direction(u)) for u in site_units)
        edits = {}
        for name, site_writes in writes.items():
            layout = self.sites[name].layout

            def edit(view: torch.Tensor, layout=layout, site_writes=site_writes) -> torch.Tensor:
                for u, vector in site_writes:
                    u.add_(view, layout, vector)
                return view
            edits[name] = edit
        with self._editing(edits):
            yield

    def write_direction(self, unit: Unit) -> torch.Tensor:
        """What one unit of ``unit`` adds to its site, as a vector over the site's channels/features (a
        feature unit's: over its base site's, the SAE's decoder direction): a neuron's basis vector, a
        direction unit's normalized direction. Detached; on the SAE's device for feature units."""
        site = self.site(unit.site)
        unit.check(site)
        if unit.index is None and unit.direction is None:
            raise InvalidArgumentError("units", unit, "units with an index or a direction (a whole token, "
                                                      "position or head has no write direction)")
        if site.point == "pre_features":
            raise InvalidArgumentError("units", unit, f"units of a site that writes to the model; "
                                                      f"{site.name!r} holds pre-activations (use "
                                                      f"{site.name.removesuffix('.pre')!r})")
        if site.base is None:
            if unit.direction is not None:
                return unit.direction / unit.direction.norm()
            return torch.nn.functional.one_hot(torch.tensor(unit.index), site.n_units).float()
        sae = self._feature_sae(site)
        with torch.no_grad():
            if unit.direction is not None:
                d = unit.direction.to(sae.W_dec.device, sae.W_dec.dtype)
                return (d / d.norm()) @ sae.W_dec / sae.input_scale
            return sae.decoder_direction(unit.index).detach()

    def _units_by_site(self, units: Unit | Iterable[Unit]) -> dict[str, list[Unit]]:
        """``units`` checked against their sites (none of a pre-activation feature site, which nothing writes
        back from) and grouped by site name (first-use order)."""
        by_site: dict[str, list[Unit]] = {}
        for u in _check_units(units):
            site = self.site(u.site)
            u.check(site)
            if site.point == "pre_features":
                raise InvalidArgumentError("units", u, f"units of a site that writes to the model; {site.name!r} "
                                                       f"holds pre-activations (use "
                                                       f"{site.name.removesuffix('.pre')!r})")
            by_site.setdefault(site.name, []).append(u)
        return by_site


def _canonical_edit(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (on a copy of the canonical activation of ``site``) as an edit of the raw tensor the module
    emits; raises :class:`~clipscope.validate.InvalidArgumentError` if ``fn`` changes the shape, dtype or
    device."""
    def edit(raw: torch.Tensor) -> torch.Tensor:
        view = site.canonical(raw.clone())
        return site.canonical(_checked_output(fn(view), view, site.name))
    return edit


def _checked_output(out: Any, view: torch.Tensor, where: str) -> torch.Tensor:
    """``out``, the result of an edit function given ``view``; raises
    :class:`~clipscope.validate.InvalidArgumentError` naming ``fn`` unless it is a tensor of ``view``'s shape,
    dtype and device (``where`` names the site in the message)."""
    if isinstance(out, torch.Tensor) and (out.shape, out.dtype, out.device) == (view.shape, view.dtype, view.device):
        return out
    got = f"<{type(out).__name__} of shape {tuple(out.shape)}, {out.dtype} on {out.device}>" \
        if isinstance(out, torch.Tensor) else f"<{type(out).__name__}>"
    raise InvalidArgumentError("fn", got, f"a function returning a tensor of the activation's shape "
                                          f"{tuple(view.shape)}, dtype {view.dtype} and device {view.device} "
                                          f"at {where!r}")


def _sae_values(sae: nn.Module, site: Site, base: torch.Tensor) -> torch.Tensor:
    """The feature activations (``site.point == "features"``) or pre-activations of ``sae`` for the canonical
    activation ``base`` of its base site, in ``site``'s canonical layout, in the SAE's dtype."""
    encode = sae.encode if site.point == "features" else sae.pre_activation
    return feature_first(encode(feature_last(base, site.layout).to(sae.W_dec.dtype)), site.layout)


def _through_features(sae: nn.Module, site: Site,
                      fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit of a base site's canonical activation ``x`` from ``fn``, an edit of ``sae``'s features ``f``
    (the feature site ``site``'s canonical layout): ``x + (fn(f) - f) @ W_dec`` (in the base site's units), so
    that the reconstruction error is kept and an edit that changes nothing leaves ``x`` exactly as it was."""
    layout = site.layout

    def edit(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(feature_last(x, layout).to(sae.W_dec.dtype))
        view = feature_first(f.clone(), layout)
        changed = feature_last(_checked_output(fn(view), view, site.name), layout)
        delta = (changed - f) @ sae.W_dec / sae.input_scale
        return x + feature_first(delta, layout).to(x.dtype)
    return edit


def _edit_hook(module: nn.Module, point: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Register a hook on ``module`` that replaces its first input (``point == "input"``) or its output
    (tensor, tuple or model output) by ``edit`` of it; returns the handle."""
    if point == "input":
        return module.register_forward_pre_hook(lambda _m, inp: (edit(inp[0]),) + tuple(inp[1:]))

    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            return edit(out)
        if isinstance(out, tuple):
            return (edit(out[0]),) + tuple(out[1:])
        out.last_hidden_state = edit(out.last_hidden_state)
        return out
    return module.register_forward_hook(hook)


def _check_sources(value: Mapping[str, Any], sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """``ablate``'s mapping ``value`` as ``{site: (n, *shape) tensor}`` for ``sites``, or an error naming the
    site whose value is missing or of the wrong shape."""
    out = {}
    for site in sites:
        try:
            tensor = value[site.name]
        except KeyError:  # also what Activations raise for a site that recorded nothing
            tensor = None
        if not isinstance(tensor, torch.Tensor):
            unrecorded = isinstance(value, Activations) and site.name in list(value)
            raise InvalidArgumentError("value", f"<{site.name!r} recorded nothing>" if unrecorded
                                       else f"<mapping without a tensor for {site.name!r}>",
                                       f"a tensor for every ablated site (e.g. captured activations or "
                                       f"model.mean_activations of {site.name!r})")
        shape = tuple(tensor.shape)
        if shape != site.shape and shape[1:] != site.shape:
            raise InvalidArgumentError("value", f"<{site.name!r}: shape {shape}>",
                                       f"one example's shape {site.shape} or a batch (n, *{site.shape})")
        out[site.name] = tensor.unsqueeze(0) if shape == site.shape else tensor
    return out


def _source_batch(source: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``source`` on ``acts``' device and dtype, checked to be one example or as many as ``acts`` holds."""
    if source.shape[0] not in (1, acts.shape[0]):
        raise InvalidArgumentError("value", f"<a batch of {source.shape[0]}>",
                                   f"one example or a batch of {acts.shape[0]}, as many as the forward pass runs")
    return source.to(acts.device, acts.dtype)


def _check_units(units: Any) -> list[Unit]:
    """``units`` (one :class:`Unit` or several) as a non-empty list, or an error naming the bad item."""
    if isinstance(units, Unit):
        return [units]
    if not isinstance(units, Iterable) or isinstance(units, (str, bytes)):
        raise InvalidArgumentError("units", units, "a Unit or a list of Units (Unit.channel, Unit.neuron, ...)")
    unit_list = list(units)
    if not unit_list:
        raise InvalidArgumentError("units", unit_list, "at least one Unit")
    for u in unit_list:
        if not isinstance(u, Unit):
            raise InvalidArgumentError("units", u, "Unit objects (Unit.channel, Unit.neuron, ...)")
    return unit_list
