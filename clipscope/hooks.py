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
- ``"vector"``: ``(B, D)`` (pooled embeddings, projections).

A :class:`Unit` names a site plus an index into it, and reads or ablates itself
the same way for every layout, so objectives and dataset-example mining need no
per-architecture code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .validate import InvalidArgumentError, check_int, check_number, check_vector

Layout = Literal["conv", "tokens", "vector"]


@dataclass(frozen=True)
class Site:
    """One hookable place in a model.

    ``shape`` is the per-example activation shape in the canonical layout
    (``(C, H, W)``, ``(L, D)`` or ``(D,)``). ``point`` is ``"output"`` for a
    module's output or ``"input"`` for its first input (``.pre`` sites).
    ``seq_first`` records that the module itself emits ``(L, B, D)``.
    """

    name: str
    module: str
    tower: Literal["visual", "text"]
    point: Literal["output", "input"]
    layout: Layout
    shape: tuple[int, ...]
    module_type: str
    seq_first: bool = False

    @property
    def n_units(self) -> int:
        """Number of channels (``conv``) or features (``tokens``/``vector``)."""
        return self.shape[0] if self.layout == "conv" else self.shape[-1]

    def canonical(self, raw: torch.Tensor) -> torch.Tensor:
        """Return ``raw`` (as the module emitted it) as a batch-first view."""
        return raw.transpose(0, 1) if self.seq_first else raw


@dataclass(frozen=True, eq=False)
class Unit:
    """A site plus an index: what objectives read, mining ranks and ablation zeroes.

    - ``index``: channel (``conv``) or feature/neuron (``tokens``, ``vector``).
    - ``token``: token position (``tokens`` only). ``None`` means all tokens.
    - ``position``: ``(y, x)`` spatial position (``conv`` only). ``None`` means all positions.
    - ``direction``: a vector over the channels/features, used instead of ``index``.

    Build units with the class methods :meth:`channel`, :meth:`neuron`,
    :meth:`token_at` and :meth:`along`.
    """

    site: str
    index: int | None = None
    token: int | None = None
    position: tuple[int, int] | None = None
    direction: torch.Tensor | None = None

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

    def __repr__(self) -> str:
        parts = [repr(self.site)]
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
        kind = "channels" if site.layout == "conv" else "features"
        n = site.n_units
        if self.index is not None and not 0 <= self.index < n:
            raise InvalidArgumentError("index", self.index, f"out of range for {site.name!r} with {n} {kind} "
                                                            f"(valid: 0..{n - 1})")
        if self.direction is not None and self.direction.numel() != n:
            raise InvalidArgumentError("direction", f"<{self.direction.numel()} entries>",
                                       f"direction has {self.direction.numel()} entries but {site.name!r} has "
                                       f"{n} {kind}; give one entry per {kind[:-1]}")
        if self.token is not None:
            if site.layout != "tokens":
                raise InvalidArgumentError("token", self.token, f"token= needs a tokens site; {site.name!r} has "
                                                                f"layout {site.layout!r}")
            length = site.shape[0]
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
        if self.index is None and self.direction is None and self.token is None and self.position is None:
            raise InvalidArgumentError("unit", self, "a unit that selects something: give index, direction, "
                                                     "token or position (this one selects nothing)")

    # -- reading ------------------------------------------------------------------
    def _selector(self, layout: Layout) -> list[Any]:
        """Index into the feature-last view that picks this unit's token/position."""
        where: list[Any] = [slice(None)] * (4 if layout == "conv" else 3 if layout == "tokens" else 2)
        if self.position is not None:
            where[1], where[2] = self.position
        if self.token is not None:
            where[1] = self.token
        return where

    def activation_map(self, acts: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Return this unit's value at every position: ``(B, H, W)`` for conv, ``(B, L)`` for tokens, ``(B,)`` for vectors.

        ``token`` and ``position`` are ignored here (the map covers all of them).
        A whole-token or whole-position unit (no index, no direction) reads as the L2 norm.
        """
        view = feature_last(acts, layout)
        if self.index is not None:
            return view[..., self.index]
        if self.direction is not None:
            return view @ self.direction.to(view.device, view.dtype)
        return view.norm(dim=-1)

    def read(self, acts: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Return one value per example, shape ``(B,)``, in the site's own units.

        At a given ``token``/``position`` the value there; otherwise the mean over
        all tokens or spatial positions.
        """
        values = self.activation_map(acts, layout)
        if self.position is not None:
            return values[:, self.position[0], self.position[1]]
        if self.token is not None:
            return values[:, self.token]
        return values.flatten(1).mean(dim=1) if values.ndim > 1 else values

    # -- ablation -----------------------------------------------------------------
    def ablate_(self, acts: torch.Tensor, layout: Layout, value: float | torch.Tensor = 0.0) -> None:
        """Set this unit in ``acts`` (canonical layout, modified in place) to ``value``.

        For a direction, the component along the (normalized) direction is set to
        ``value``; everything orthogonal to it is kept.
        """
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


def _check_position(position: Any) -> tuple[int, int]:
    """``position`` as a ``(y, x)`` pair of ints, or an error naming it."""
    if isinstance(position, (str, bytes)) or not isinstance(position, Sequence) or len(position) != 2:
        raise InvalidArgumentError("position", position, "a (y, x) pair of integers")
    try:
        return check_int("position", position[0]), check_int("position", position[1])
    except InvalidArgumentError:
        raise InvalidArgumentError("position", position, "a (y, x) pair of integers") from None


def unit_means(acts: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Every unit's value per example, ``(B, n_units)``: the mean over positions/tokens (vectors as they are)."""
    view = feature_last(acts, layout)
    return view if view.ndim == 2 else view.flatten(1, -2).mean(dim=1)


def feature_last(acts: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Return a view of canonical ``acts`` with the channel/feature axis last (conv: ``(B, H, W, C)``)."""
    return acts.movedim(1, -1) if layout == "conv" else acts


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
    """Return (layout, per-example canonical shape, seq_first) for a raw activation shape."""
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


def discover_sites(root: nn.Module, towers: Sequence[Tower]) -> dict[str, Site]:
    """Find every site by running each tower once on a dummy batch, recording output shapes."""
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
            with torch.no_grad():
                tower.run(batch)
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

    Sites are found lazily, on first use, by :func:`discover_sites`.
    """

    def __init__(self, root: nn.Module, towers: Sequence[Tower]):
        self._root = root
        self._towers = towers
        self._sites: dict[str, Site] | None = None
        self._active_ablations = 0
        self._ablated_towers: list[str] = []
        self._recorded_towers: list[str] = []

    @property
    def sites(self) -> dict[str, Site]:
        if self._sites is None:
            self._sites = discover_sites(self._root, self._towers)
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

    def _module(self, site: Site) -> nn.Module:
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

        def record(site: Site, t: torch.Tensor) -> None:
            t = site.canonical(t)
            acts._add(site.name, t.clone() if grad else t.detach().clone())
            if on_record is not None:
                on_record(site.name)

        for site in resolved:
            module = self._module(site)
            if site.point == "output":
                handles.append(module.register_forward_hook(
                    lambda _m, _inp, out, site=site: record(site, _first_tensor(out))))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, inp, site=site: record(site, inp[0])))
        towers = sorted({site.tower for site in resolved})
        self._recorded_towers.extend(towers)
        try:
            yield acts
        finally:
            for h in handles:
                h.remove()
            for t in towers:
                self._recorded_towers.remove(t)

    @contextlib.contextmanager
    def ablate(self, units: Unit | Iterable[Unit], value: float | torch.Tensor = 0.0) -> Iterator[None]:
        """Set ``units`` to ``value`` (default 0) in every forward pass inside the block.

        ``value`` may be a scalar or a tensor broadcastable to the selected region
        (e.g. a mean activation to patch in).
        """
        unit_list = _check_units(units)
        if not isinstance(value, torch.Tensor):
            value = check_number("value", value)
        by_site: dict[str, list[Unit]] = {}
        for u in unit_list:
            site = self.site(u.site)
            u.check(site)
            by_site.setdefault(site.name, []).append(u)
        handles = []
        for name, site_units in by_site.items():
            site = self.sites[name]
            module = self._module(site)

            def edit(raw: torch.Tensor, site=site, site_units=site_units) -> torch.Tensor:
                out = raw.clone()
                view = site.canonical(out)
                for u in site_units:
                    u.ablate_(view, site.layout, value)
                return out

            if site.point == "output":
                def hook(_m, _inp, out, edit=edit):
                    if isinstance(out, torch.Tensor):
                        return edit(out)
                    if isinstance(out, tuple):
                        return (edit(out[0]),) + tuple(out[1:])
                    out.last_hidden_state = edit(out.last_hidden_state)
                    return out
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(_m, inp, edit=edit):
                    return (edit(inp[0]),) + tuple(inp[1:])
                handles.append(module.register_forward_pre_hook(pre_hook))
        towers = sorted({self.sites[n].tower for n in by_site})
        self._ablated_towers.extend(towers)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for t in towers:
                self._ablated_towers.remove(t)


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
