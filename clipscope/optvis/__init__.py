"""Feature visualization for CLIP image towers, ResNet and ViT alike (lucid/lucent-style).

    from clipscope import optvis, Unit
    result = optvis.render(model, [Unit.channel("visual.layer4.0", c) for c in range(8)])
    result.plot()

- :mod:`~clipscope.optvis.param`: image parameterizations (Fourier, pixels, MACO);
- :mod:`~clipscope.optvis.transform`: robustness transforms and the model's input preprocessing;
- :mod:`~clipscope.optvis.objectives`: what to maximize (units, text directions, diversity, regularizers);
- :mod:`~clipscope.optvis.facets`: faceted feature visualization (Goh et al. 2021);
- :mod:`~clipscope.optvis.render`: the optimization loop and its :class:`RenderResult`.
"""
from . import facets, objectives, param, transform
from .facets import Facet, faceted, pooled_activations, train_facet
from .objectives import (
                         Context,
                         Objective,
                         batched,
                         blur,
                         channel,
                         direction,
                         diversity,
                         l2,
                         neuron,
                         text_direction,
                         total_variation,
                         unit,
)
from .param import (
                         FourierImage,
                         ImageParam,
                         MacoImage,
                         PixelImage,
                         make_param,
                         natural_spectrum,
)
from .render import RenderResult, optimization_site, render
from .transform import (
                         ClipInput,
                         Compose,
                         Jitter,
                         Pad,
                         RandomCrop,
                         RandomRotate,
                         RandomScale,
                         standard_transforms,
)

__all__ = [
    "ClipInput", "Compose", "Context", "Facet", "FourierImage", "ImageParam", "Jitter", "MacoImage", "Objective",
    "Pad", "PixelImage", "RandomCrop", "RandomRotate", "RandomScale", "RenderResult", "batched", "blur",
    "channel", "direction", "diversity", "faceted", "facets", "l2", "make_param", "natural_spectrum", "neuron",
    "objectives", "optimization_site", "param", "pooled_activations", "render", "standard_transforms", "text_direction",
    "total_variation", "train_facet", "transform", "unit",
]
