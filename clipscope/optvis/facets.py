"""Faceted feature visualization (Goh et al. 2021, "Multimodal Neurons in Artificial Neural Networks").

A *facet* is a linear probe on a lower site's spatially pooled activations
``g(x)`` that separates images of one kind (faces, text, indoor scenes...) from
generic images. The faceted objective for a unit with activation ``f`` is

    f(g(x)) + strength * w^T (g(x) * grad_g f(g(x)))

where ``w`` are the probe's weights and the product is taken elementwise and
summed over positions/tokens: the attribution of ``f`` to the lower layer,
weighted towards the facet. It steers the rendering towards the facet while it
still maximizes the unit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks import Unit, feature_last
from ..probe import LinearProbe, fit_linear_probe
from .objectives import Context, Objective, unit_label


def pooled_activations(model, site: str, images: Any, *, batch_size: int = 64) -> torch.Tensor:
    """Mean over positions/tokens of ``site``'s activations, float32 ``(n_images, n_units)`` on the CPU.

    ``images`` is anything :meth:`ClipModel.encode_image` takes (a preprocessed
    tensor, PIL images, paths, a folder...).
    """
    s = model.site(site)
    with torch.no_grad(), model.capture(site) as acts:
        model.encode_image(images, batch_size=batch_size, progress=False)
    view = feature_last(acts[site], s.layout)
    return view.reshape(view.shape[0], -1, s.n_units).mean(dim=1).float().cpu()


@dataclass
class Facet:
    """A probe direction at ``site``: ``weights`` ``(n_units,)`` (logit per unit of pooled activation).

    ``probe`` is the fitted :class:`~clipscope.probe.LinearProbe` (class 1 = facet
    images, 0 = generic images); ``train_accuracy`` its accuracy (in [0, 1]) on the
    images it was fit on.
    """

    site: str
    weights: torch.Tensor
    probe: LinearProbe
    train_accuracy: float


def train_facet(model, site: str, facet_images: Any, generic_images: Any, *, batch_size: int = 64,
                seed: int = 0) -> Facet:
    """Fit a logistic-regression probe separating ``facet_images`` from ``generic_images`` at ``site``.

    Features are :func:`pooled_activations`; the regularization strength is chosen
    on a held-out split by :func:`~clipscope.probe.fit_linear_probe`. Returns a :class:`Facet`.
    """
    pos = pooled_activations(model, site, facet_images, batch_size=batch_size)
    neg = pooled_activations(model, site, generic_images, batch_size=batch_size)
    features = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    probe = fit_linear_probe(features, labels, seed=seed)
    weights = torch.as_tensor(probe.weights[0], dtype=torch.float32)
    return Facet(site, weights, probe, probe.accuracy(features, labels))


def second_order_forward() -> contextlib.AbstractContextManager:
    """A context for forward passes that will be differentiated twice.

    PyTorch's fused attention kernels (flash, memory-efficient) have no double
    backward; inside this context ``scaled_dot_product_attention`` uses the math kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _source_edge(captured: torch.Tensor) -> torch.autograd.graph.GradientEdge:
    """The autograd edge of the tensor the model itself used, behind a captured copy.

    ``capture`` hands out a clone of each activation, which the rest of the
    forward pass does not use; the gradient of a later unit must be taken with
    respect to the original, which is the clone's input edge.
    """
    node = captured.grad_fn
    if node is None or not node.next_functions or node.next_functions[0][0] is None:
        raise ValueError("the lower site's activation carries no gradient: capture it with grad=True")
    return torch.autograd.graph.GradientEdge(*node.next_functions[0])


def faceted(u: Unit, facet: Facet, *, strength: float = 1.0) -> Objective:
    """Maximize ``u`` steered towards ``facet``: ``f + strength * w^T (g * grad_g f)`` per batch element.

    ``f`` is ``u``'s value (:meth:`~clipscope.hooks.Unit.read`), ``g`` the
    activation at ``facet.site``, which must lie below ``u``'s site. The gradient is
    taken by autograd with ``create_graph=True``, so the objective stays
    differentiable with respect to the image (the forward pass must then run
    attention with the math kernel: ``render`` does, see :func:`second_order_forward`).
    Values are in ``u``'s units.
    """
    def fn(ctx: Context) -> torch.Tensor:
        g = ctx.acts[facet.site]
        f = ctx.read(u)
        try:
            (grad,) = torch.autograd.grad(f.sum(), _source_edge(g), create_graph=True)
        except RuntimeError as exc:
            if "not have been used in the graph" not in str(exc):
                raise
            raise ValueError(f"{u.site!r} does not depend on the facet site {facet.site!r}: the facet must be "
                             "trained at a site below the unit") from None
        layout = ctx.layout(facet.site)
        w = facet.weights.to(g.device, g.dtype)
        attribution = feature_last(g, layout) * feature_last(grad, layout) * w
        return f + strength * attribution.reshape(len(g), -1).sum(dim=1)
    return Objective(fn, f"faceted({unit_label(u)}, {facet.site})", units=[u], sites=[facet.site],
                     elementwise=False, second_order=True)
