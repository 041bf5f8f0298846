"""Render: optimize images that maximize an objective, many units at once in one batch."""
from __future__ import annotations

import contextlib
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hooks import Unit
from ..io import write_bytes_atomic
from ..pages import image_grid, image_uri
from ..progress import manual_bar
from ..validate import InvalidArgumentError, check_choice, check_int, check_number
from .facets import second_order_forward
from .objectives import Context, Objective, batched, unit, unit_label
from .param import ImageParam, check_size, make_param
from .transform import ClipInput, Compose, standard_transforms


@dataclass
class RenderResult:
    """The images a :func:`render` call produced.

    - ``images``: float32 ``(B, 3, H, W)`` in [0, 1], on the CPU;
    - ``trace``: float32 ``(steps, B)``, each element's objective value at each
      step (measured on the transformed images, before that step's update);
    - ``units``: what element ``i`` maximized (the :class:`~clipscope.hooks.Unit`
      or :class:`~clipscope.optvis.objectives.Objective` given);
    - ``seed``: the seed used.
    """

    images: torch.Tensor
    trace: torch.Tensor
    units: list[Unit | Objective]
    seed: int

    @property
    def labels(self) -> list[str]:
        """A short name per image."""
        return [unit_label(u) if isinstance(u, Unit) else u.name for u in self.units]

    def pil_images(self) -> list:
        """The images as ``PIL.Image`` (8-bit RGB)."""
        from PIL import Image
        arrays = (self.images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arrays]

    def plot(self, columns: int = 8, scale: float = 1.6):
        """A grid of the images titled by unit, ``scale`` inches per image; returns the figure."""
        import matplotlib.pyplot as plt
        n = len(self.images)
        cols = max(1, min(columns, n))
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(scale * cols, scale * rows + 0.3), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, img, label in zip(axes.flat, self.images, self.labels):
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(label, fontsize=7)
        fig.tight_layout()
        return fig

    def grid(self, columns: int = 8, tile: int = 128, gap: int = 2):
        """The images tiled ``columns`` per row, each resized to ``tile`` pixels; returns one ``PIL.Image``
        (see :func:`clipscope.pages.image_grid`)."""
        return image_grid(self.pil_images(), columns=columns, tile=tile, gap=gap)

    def _repr_html_(self) -> str:
        final = self.trace[-1].tolist() if len(self.trace) else [float("nan")] * len(self.images)
        caption = ", ".join(f"{label} ({v:.3g})" for label, v in zip(self.labels, final))
        return (f'<img src="{image_uri(self.grid())}"/><p>{len(self.images)} image(s), {len(self.trace)} steps, '
                f"seed {self.seed}; final objective: {html.escape(caption)}</p>")

    def save(self, folder: str | Path) -> list[Path]:
        """Write one PNG per image, ``NNN_label.png``, into ``folder`` (each written atomically); returns the paths."""
        folder = Path(folder)
        paths = []
        for i, (img, label) in enumerate(zip(self.pil_images(), self.labels)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:80]
            paths.append(write_bytes_atomic(folder / f"{i:03d}_{slug}.png", buf.getvalue()))
        return paths


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward also lets through gradient that would raise a negative input,
    for the batch elements where the ordinary ReLU gradient is zero everywhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0)
        # descent moves x by -grad: keep only components that would not push a negative x lower
        redirected = grad * ~((x < 0) & (grad > 0))
        dead = relu_grad.flatten(1).abs().sum(dim=1) == 0
        return torch.where(dead.view(-1, *[1] * (x.ndim - 1)), redirected, relu_grad)


@contextlib.contextmanager
def redirected_relus(model):
    """Inside the block, ReLUs use :class:`_RedirectedReLU`'s gradient: for a
    :class:`~clipscope.model.ClipModel`, the image-tower activations its backend declares
    (:meth:`~clipscope.model.ClipModel.redirectable_activations`); for a bare ``nn.Module``, its every ``nn.ReLU``.

    A unit read after a ReLU that is zero on the starting image gets no gradient at all and
    its image never changes; redirecting the gradient for the first steps of an optimization
    (as Lucid did for CLIP's feature visualizations) gets it moving. Forward values are unchanged.
    """
    relus = (model.redirectable_activations() if not isinstance(model, torch.nn.Module)
             else [m for m in model.modules() if isinstance(m, torch.nn.ReLU)])
    for m in relus:
        m.forward = _RedirectedReLU.apply
    try:
        yield
    finally:
        for m in relus:
            del m.forward


def optimization_site(model, site: str) -> str:
    """The site to optimize a unit of ``site`` at; returns a site name (what :func:`render` uses).

    A ResNet block (or stage) ends in an in-place ReLU, so a unit read at its output is 0,
    with 0 gradient, wherever its pre-activation is negative: from a flat grey start many
    units never move. Where the unit fires the pre-ReLU value equals the output, so
    maximizing the pre-ReLU value (:meth:`~clipscope.model.ClipModel.pre_activation_site`)
    maximizes the same unit and always has a gradient. Sites with no final ReLU (transformer
    blocks, convolutions, ``.pre`` sites themselves) are returned unchanged; unknown sites raise
    :class:`~clipscope.validate.InvalidArgumentError` with close matches.
    """
    return model.pre_activation_site(site)


def optimization_sites(model, objective: Objective) -> dict[str, str]:
    """``{site: site optimized instead}`` for the sites of ``objective``'s units that end in an activation
    (see :func:`optimization_site`); sites optimized as they are do not appear."""
    moved = {u.site: optimization_site(model, u.site) for u in objective.units}
    return {site: target for site, target in moved.items() if target != site}


AUTOCAST = {"bf16": torch.bfloat16}  # render's ``autocast`` names -> the dtype of the forward pass


@dataclass(frozen=True)
class StepSpeed:
    """How :func:`render` runs each step's forward and backward pass; the images, Adam's state and
    the trace stay float32 either way.

    - ``channels_last``: the model input goes in channels-last (NHWC) memory order, which the
      convolutions (oneDNN on the CPU, cuDNN on a GPU) carry through a ResNet tower; values equal
      the default's to float rounding.
    - ``autocast``: ``"bf16"`` runs the forward pass under :func:`torch.autocast` in bfloat16
      (convolutions and matmuls in bf16: about 3 significant digits, fast on CPUs with AVX-512 BF16
      or AMX and on recent GPUs); ``None`` runs it in the model's dtype.
    """

    channels_last: bool = False
    autocast: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.channels_last, bool):
            raise InvalidArgumentError("channels_last", self.channels_last, "True or False")
        check_choice("autocast", self.autocast, [None, *AUTOCAST])

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory order the forward pass runs in; the values are unchanged."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward(self, device: str | torch.device) -> contextlib.AbstractContextManager:
        """The context to run the forward pass in on ``device``: autocast to ``autocast``'s dtype, or none."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=AUTOCAST[self.autocast])


def render(model, objective_or_units: Objective | Unit | Sequence[Objective | Unit], *,
           param: str | ImageParam = "fourier", transforms: Callable | Sequence[Callable] | None = None,
           size: int | tuple[int, int] | None = None, steps: int = 256, lr: float | None = None,
           batch: int | None = None, seed: int = 0, redirect_steps: int = 16, exact_site: bool = False,
           channels_last: bool = False, autocast: str | None = None,
           progress: bool = True, callback: Callable[[int, torch.Tensor], None] | None = None) -> RenderResult:
    """Optimize a batch of images to maximize an objective; returns a :class:`RenderResult`.

    - ``objective_or_units``: one :class:`Objective` or :class:`~clipscope.hooks.Unit`,
      rendered ``batch`` times (default: the batch of an ``ImageParam`` given, else 1);
      or a sequence of them, one per batch element, all optimized together in one
      batch (:func:`~clipscope.optvis.objectives.batched`).
    - ``param``: ``"fourier"`` (default), ``"pixels"``, ``"maco"`` or an
      :class:`~clipscope.optvis.param.ImageParam` (its batch size must match).
    - ``transforms``: applied to the images before the model at every step; ``None``
      is :func:`~clipscope.optvis.transform.standard_transforms`, ``()`` none. The
      model's own resize and normalization (:class:`~clipscope.optvis.transform.ClipInput`)
      always comes last.
    - ``size``: the rendered image size, default the model's input size (an
      ``ImageParam`` given brings its own).
    - ``lr``: Adam's learning rate, default the parameterization's ``lr``.
    - ``seed``: seeds the initial images and the random transforms; the same seed
      gives the same images (bit for bit on the CPU).
    - ``redirect_steps``: for this many first steps, ReLUs pass gradient that would raise a
      dead unit (:func:`redirected_relus`), so units read after a ReLU that start at zero
      still move; 0 turns it off.
    - ``exact_site``: units are optimized at their site's pre-activation
      (:func:`optimization_site`: before a ResNet block's final ReLU), so units that are dead
      after the ReLU still render, and the trace holds the pre-activation values; the images
      and labels keep the units asked for. ``True`` optimizes every unit at its own site.
    - ``channels_last``, ``autocast``: how each step's forward pass runs (:class:`StepSpeed`):
      channels-last memory order (same values), and ``"bf16"`` to run it in bfloat16 under
      autocast. Both are off by default; ``bench/optvis_vs_lucent.py`` measures them.
    - ``callback``: called after every step with the step index (from 0) and the batch's
      objective values ``(B,)`` (e.g. to drive a widget's progress bar).

    Each step is one forward and one backward pass of the image tower on the whole
    batch, capturing only the sites the objective reads; unless the objective reads the
    image embedding (``text_direction``), the forward pass stops at the deepest of them.
    """
    steps, seed = check_int("steps", steps, low=1), check_int("seed", seed)
    redirect_steps = check_int("redirect_steps", redirect_steps, low=0)
    if not isinstance(exact_site, bool):
        raise InvalidArgumentError("exact_site", exact_site, "True or False")
    speed = StepSpeed(channels_last, autocast)
    batch = None if batch is None else check_int("batch", batch, low=1)
    size = None if size is None else check_size("size", size)
    lr = None if lr is None else check_number("lr", lr, low=0)
    if callback is not None and not callable(callback):
        raise InvalidArgumentError("callback", callback, "a function (step, values) or None")
    objective, units = _objective_and_units(objective_or_units, param, batch)
    objective.check(model)
    moved = {} if exact_site else optimization_sites(model, objective)
    image_param = _image_param(model, param, len(units), size, seed)
    pipeline = Compose([_transforms(transforms, image_param), ClipInput(model)])
    trace = _optimize(model, objective, moved, image_param, pipeline, steps=steps, lr=lr, seed=seed,
                      redirect_steps=redirect_steps, speed=speed, progress=progress, callback=callback)
    with torch.no_grad():
        images = image_param().float().cpu()
    return RenderResult(images, trace, list(units), seed)


def _objective_and_units(objective_or_units: Objective | Unit | Sequence[Objective | Unit], param: str | ImageParam,
                         batch: int | None) -> tuple[Objective, list[Unit | Objective]]:
    """What :func:`render` optimizes; returns the (batched) objective and what each batch element maximizes."""
    items = list(objective_or_units) if isinstance(objective_or_units, (list, tuple)) else None
    if items is not None:
        if not items:
            raise InvalidArgumentError("objective_or_units", items, "at least one Objective or Unit")
        if batch is not None and batch != len(items):
            raise InvalidArgumentError("batch", batch, f"{len(items)} (one batch element per objective/unit "
                                                       "given) or None")
        objective, units = batched(items), items
    else:
        n = batch if batch is not None else param.batch if isinstance(param, ImageParam) else 1
        single = objective_or_units
        objective = unit(single) if isinstance(single, Unit) else single
        units = [single] * n
    if not isinstance(objective, Objective):
        raise TypeError(f"expected an Objective, a Unit or a sequence of them, got {type(objective_or_units).__name__}")
    return objective, units


def _image_param(model, param: str | ImageParam, n: int, size: tuple[int, int] | None, seed: int) -> ImageParam:
    """The ``n`` images :func:`render` optimizes; returns ``param`` itself when it is an ``ImageParam``."""
    if isinstance(param, ImageParam):
        if param.batch != n:
            raise InvalidArgumentError("batch", n, f"the parameterization holds {param.batch} images; give "
                                                   f"batch={param.batch} or None")
        return param
    return make_param(param, n, size or model.image_size, seed=seed, device=model.device)


def _transforms(transforms: Callable | Sequence[Callable] | None, image_param: ImageParam) -> Callable:
    """:func:`render`'s ``transforms`` as one callable; returns the standard ones for ``None``."""
    if transforms is None:
        return standard_transforms(image_param.size)
    if not callable(transforms):
        return Compose(transforms)
    return transforms


def _optimize(model, objective: Objective, moved: dict[str, str], image_param: ImageParam, pipeline: Callable, *,
              steps: int, lr: float | None, seed: int, redirect_steps: int, speed: StepSpeed, progress: bool,
              callback: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
    """Run :func:`render`'s Adam steps on ``image_param``; returns the trace, float32 ``(steps, B)`` on the CPU."""
    targets = list(dict.fromkeys(moved.get(site, site) for site in objective.sites))
    optimizer = torch.optim.Adam(image_param.parameters(), lr=image_param.lr if lr is None else lr)
    generator = torch.Generator().manual_seed(seed)
    trace = []
    with torch.enable_grad(), manual_bar(progress, True, "render", total=steps) as bar:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            image = image_param()
            x = speed.input(pipeline(image, generator=generator))
            values = _objective_values(model, objective, moved, targets, image, x, redirect=step < redirect_steps,
                                       speed=speed)
            if values.shape != (image_param.batch,):
                raise ValueError(f"objective {objective.name!r} returned shape {tuple(values.shape)}; "
                                 f"expected ({image_param.batch},), one value per batch element")
            (-values.sum()).backward()
            optimizer.step()
            trace.append(values.detach())
            if callback is not None:
                callback(step, trace[-1])
            bar.update(1)
            if progress and (step % 16 == 0 or step == steps - 1):
                bar.set_postfix(objective=f"{values.detach().mean().item():.3g}")
    return torch.stack(trace).float().cpu()


def _objective_values(model, objective: Objective, moved: dict[str, str], targets: list[str], image: torch.Tensor,
                      x: torch.Tensor, *, redirect: bool, speed: StepSpeed) -> torch.Tensor:
    """One forward pass of the model input ``x`` made from ``image``; returns the objective's values ``(B,)``."""
    forward_context = second_order_forward if objective.second_order else contextlib.nullcontext
    relus = redirected_relus(model) if redirect else contextlib.nullcontext()
    with forward_context(), relus, speed.forward(model.device):
        if objective.reads_embedding:
            with model.capture(targets, grad=True) as acts:
                embedding = model.encode_image(x, normalize=False)
        else:   # the tower runs only as far as the deepest site read (not at all for image-only terms)
            acts, embedding = model.activations(x, targets, grad=True), None
    read = {site: acts[moved.get(site, site)] for site in objective.sites}  # asked names, moved values
    return objective(Context(model, read, embedding, image))
