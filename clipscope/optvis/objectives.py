"""Objectives for feature visualization: what :func:`~clipscope.optvis.render` maximizes.

An :class:`Objective` wraps ``fn(ctx) -> values``: given a :class:`Context` (the
captured activations, the image embedding and the images of one optimization
step) it returns one value per batch element, shape ``(B,)`` (a scalar is
broadcast). Rendering *maximizes* the sum of these values, so penalties
(:func:`l2`, :func:`blur`, :func:`total_variation`) are subtracted:
``channel("visual.layer4.0", 7) - 0.1 * total_variation()``.

Objectives combine with ``+``, ``-``, ``*``/``/`` by a number, unary ``-`` and
:meth:`Objective.sum` (or Python's ``sum``). :func:`batched` gives each batch
element its own objective, which is how ``render`` draws many units in one batch.

Unit objectives read activations through :meth:`clipscope.hooks.Unit.read`, so
one definition serves conv (ResNet) and token (ViT) sites alike.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..hooks import Unit, feature_last


class Context:
    """What an objective sees at one step.

    ``acts`` maps each captured site name to its activation in canonical layout
    (with gradients); ``embedding`` is the raw (unnormalized) image embedding
    ``(B, embed_dim)``, computed only for objectives that declare ``reads_embedding``;
    ``image`` is the parameterization's output ``(B, 3, H, W)`` in [0, 1], before the
    robustness transforms.
    """

    def __init__(self, model, acts: Mapping[str, torch.Tensor], embedding: torch.Tensor | None,
                 image: torch.Tensor):
        self.model = model
        self.acts = acts
        self._embedding = embedding
        self.image = image
        self._parts: tuple[dict[str, tuple[torch.Tensor, ...]], tuple | None, tuple] | None = None

    @property
    def embedding(self) -> torch.Tensor:
        if self._embedding is None:
            raise RuntimeError("the image embedding was not computed: the forward pass stopped at the deepest site "
                               "the objective reads. An objective that reads ctx.embedding must say so: "
                               "Objective(fn, name, reads_embedding=True)")
        return self._embedding

    @property
    def batch(self) -> int:
        return self.image.shape[0]

    def layout(self, site: str) -> str:
        """The canonical layout (``"conv"``, ``"tokens"`` or ``"vector"``) of ``site``."""
        return self.model.site(site).layout

    def read(self, unit: Unit) -> torch.Tensor:
        """``unit``'s value per batch element ``(B,)``, in the site's own units."""
        return self.model.read(unit, self.acts[unit.site])

    def element(self, i: int) -> Context:
        """A one-element context holding batch element ``i`` (views; gradients flow back)."""
        if self._parts is None:
            self._parts = ({s: self.acts[s].unbind(0) for s in self.acts},
                           None if self._embedding is None else self._embedding.unbind(0), self.image.unbind(0))
        acts, emb, img = self._parts
        return Context(self.model, {s: parts[i].unsqueeze(0) for s, parts in acts.items()},
                       None if emb is None else emb[i].unsqueeze(0), img[i].unsqueeze(0))


class Objective:
    """A quantity to maximize: ``fn(ctx)`` returns ``(B,)`` values (or a scalar, broadcast).

    ``units`` are the units ``fn`` reads and ``sites`` any further sites whose
    activations it needs: ``render`` captures exactly :attr:`sites` and checks
    both against the model before optimizing. ``elementwise`` says that element
    ``i``'s value depends only on element ``i`` (so it can be computed on a
    one-element :class:`Context`); batch-level objectives such as
    :func:`diversity` set it to ``False``. ``second_order`` says that ``fn``
    differentiates the forward pass itself (so ``render`` runs attention with
    PyTorch's twice-differentiable math kernel). ``reads_embedding`` says that ``fn``
    reads ``ctx.embedding``; without it ``render`` runs the image tower only as far as
    the deepest site the objective reads (and not at all for image-only penalties).
    """

    def __init__(self, fn: Callable[[Context], torch.Tensor], name: str, *, units: Iterable[Unit] = (),
                 sites: Iterable[str] = (), elementwise: bool = True, second_order: bool = False,
                 reads_embedding: bool = False):
        self.fn = fn
        self.name = name
        self.units = tuple(units)
        self.extra_sites = tuple(sites)
        self.elementwise = elementwise
        self.second_order = second_order
        self.reads_embedding = reads_embedding

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site whose activations this objective reads, in first-use order."""
        return tuple(dict.fromkeys([u.site for u in self.units] + list(self.extra_sites)))

    def __call__(self, ctx: Context) -> torch.Tensor:
        values = self.fn(ctx)
        return values.expand(ctx.batch) if values.ndim == 0 else values

    def check(self, model) -> None:
        """Raise the hooks layer's ``ValueError`` if a site is unknown or a unit does not fit its site."""
        for name in self.sites:
            model.site(name)
        for u in self.units:
            u.check(model.site(u.site))

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # -- arithmetic -----------------------------------------------------------------
    def _derive(self, fn: Callable, name: str, *others: Objective) -> Objective:
        """A new objective computed from ``self`` (and ``others``), needing what they need."""
        parts = (self, *others)
        return Objective(fn, name, units=[u for o in parts for u in o.units],
                         sites=[s for o in parts for s in o.extra_sites],
                         elementwise=all(o.elementwise for o in parts),
                         second_order=any(o.second_order for o in parts),
                         reads_embedding=any(o.reads_embedding for o in parts))

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            return self._derive(lambda ctx: self(ctx) + other, f"{self.name} + {other:g}")
        if not isinstance(other, Objective):
            return NotImplemented
        return self._derive(lambda ctx: self(ctx) + other(ctx), f"{self.name} + {other.name}", other)

    __radd__ = __add__

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)):
            raise TypeError(f"an objective can only be multiplied by a number, not {type(k).__name__}")
        return self._derive(lambda ctx: k * self(ctx), f"{k:g} * ({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)):
            raise TypeError(f"an objective can only be divided by a number, not {type(k).__name__}")
        return self * (1.0 / k)

    def __neg__(self) -> Objective:
        return self._derive(lambda ctx: -self(ctx), f"-({self.name})")

    def __sub__(self, other: Objective | float) -> Objective:
        return self + (-other)

    def __rsub__(self, other: float) -> Objective:
        return (-self) + other

    @staticmethod
    def sum(objectives: Iterable[Objective]) -> Objective:
        """The sum of ``objectives`` (at least one)."""
        objectives = list(objectives)
        if not objectives:
            raise ValueError("Objective.sum needs at least one objective")
        total = objectives[0]
        for o in objectives[1:]:
            total = total + o
        return total


# ---------------------------------------------------------------------------------------
# Units


def unit_label(u: Unit) -> str:
    """A short name for ``u``: ``site[index]``, ``site[direction]``, plus ``@tokenT`` or ``@y,x``."""
    what = f"[{u.index}]" if u.index is not None else "[direction]" if u.direction is not None else ""
    where = f"@token{u.token}" if u.token is not None else f"@{u.position[0]},{u.position[1]}" if u.position else ""
    return f"{u.site}{what}{where}"


def unit(u: Unit) -> Objective:
    """Maximize ``u``'s activation (:meth:`~clipscope.ClipModel.read`: the mean over positions, tokens pooled as
    ``model.token_pool`` says, unless a token or position is given)."""
    return Objective(lambda ctx: ctx.read(u), unit_label(u), units=[u])


def channel(site: str, index: int, position: tuple[int, int] | None = None) -> Objective:
    """Maximize channel/feature ``index`` of ``site``, read as :func:`unit` reads it (or at ``position``)."""
    return unit(Unit.channel(site, index, position))


def neuron(site: str, index: int, *, token: int | None = None, position: tuple[int, int] | None = None) -> Objective:
    """Maximize feature ``index`` at one ``token`` (token sites) or one ``(y, x)`` ``position`` (conv sites).

    With neither given, the same as :func:`channel`.
    """
    return unit(Unit(site, index=index, token=token, position=position))


def direction(site: str, vector: torch.Tensor, *, token: int | None = None,
              position: tuple[int, int] | None = None) -> Objective:
    """Maximize the dot product of ``site``'s activation with ``vector`` (over its channels/features, not normalized)."""
    return unit(Unit.along(site, vector, token=token, position=position))


def text_direction(model, prompt: str | Sequence[str]) -> Objective:
    """Maximize the cosine similarity (in [-1, 1]) of the image embedding with a prompt's text embedding.

    Several prompts are averaged into one direction (their normalized embeddings'
    mean, renormalized), as in CLIP's prompt ensembles.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    with torch.no_grad():
        target = F.normalize(model.encode_text(prompts).mean(dim=0), dim=-1)
    label = prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts"
    return Objective(lambda ctx: F.normalize(ctx.embedding, dim=-1) @ target.to(ctx.embedding.device),
                     f"text_direction({label!r})", reads_embedding=True)


def diversity(site: str) -> Objective:
    """Push the batch elements apart at ``site`` (lucid's diversity term).

    Each element's activation, with features last and positions/tokens flattened
    to ``(N, C)``, gives a Gram matrix ``(C, C)``; element ``i``'s value is minus
    the mean cosine similarity of its Gram matrix with every other element's
    (in [-1, 1]; 0 for a batch of one). Not elementwise.
    """
    def fn(ctx: Context) -> torch.Tensor:
        acts = feature_last(ctx.acts[site], ctx.layout(site)).float()
        b, c = acts.shape[0], acts.shape[-1]
        if b < 2:
            return acts.new_zeros(b)
        x = acts.reshape(b, -1, c)
        grams = F.normalize((x.transpose(1, 2) @ x).flatten(1), dim=1)
        sim = grams @ grams.T
        return -(sim.sum(dim=1) - sim.diagonal()) / (b - 1)
    return Objective(fn, f"diversity({site})", sites=[site], elementwise=False)


def batched(objectives: Sequence[Objective | Unit]) -> Objective:
    """One objective per batch element: element ``i`` maximizes ``objectives[i]`` (Units become :func:`unit`).

    The batch must have ``len(objectives)`` elements. Elementwise objectives are
    evaluated on element ``i`` alone; batch-level ones on the whole batch, keeping
    element ``i``'s value.
    """
    objs = [unit(o) if isinstance(o, Unit) else o for o in objectives]
    if not objs:
        raise ValueError("batched() needs at least one objective")

    def fn(ctx: Context) -> torch.Tensor:
        if ctx.batch != len(objs):
            raise ValueError(f"batched objective has {len(objs)} entries but the batch has {ctx.batch} images")
        return torch.cat([o(ctx.element(i)) if o.elementwise else o(ctx)[i:i + 1] for i, o in enumerate(objs)])

    return Objective(fn, f"batched({len(objs)})", units=[u for o in objs for u in o.units],
                     sites=[s for o in objs for s in o.extra_sites], elementwise=False,
                     second_order=any(o.second_order for o in objs),
                     reads_embedding=any(o.reads_embedding for o in objs))


# ---------------------------------------------------------------------------------------
# Image regularizers (penalties: subtract them)


def l2() -> Objective:
    """Mean squared distance of each image from mid-grey 0.5 (intensity squared; a penalty)."""
    return Objective(lambda ctx: (ctx.image - 0.5).pow(2).flatten(1).mean(dim=1), "l2")


def blur() -> Objective:
    """Mean squared difference between each image and its 3x3 box blur (high-frequency energy; a penalty)."""
    def fn(ctx: Context) -> torch.Tensor:
        x = ctx.image
        smooth = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return (x - smooth).pow(2).flatten(1).mean(dim=1)
    return Objective(fn, "blur")


def total_variation() -> Objective:
    """Mean absolute difference between neighbouring pixels, vertical plus horizontal (intensity; a penalty)."""
    def fn(ctx: Context) -> torch.Tensor:
        x = ctx.image
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(dim=1)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
        return dy + dx
    return Objective(fn, "total_variation")
