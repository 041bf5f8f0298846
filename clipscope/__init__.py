"""clipscope: look inside CLIP models and test them before deployment.

Start with :func:`clipscope.load`, which returns a :class:`clipscope.ClipModel`.
"""
from .data import EmbeddedImages, ImageLoadError
from .hooks import Site, Unit
from .hub import UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
from .model import ClipModel, Layers, ZeroShotResult, load, load_from_env, parse_model_spec

__version__ = "0.1.0"

__all__ = [
    "ClipModel", "EmbeddedImages", "ImageLoadError", "Layers", "Site", "Unit", "UnknownModelError",
    "UnsafeCheckpointError", "WeightsNotAvailableError", "ZeroShotResult", "load", "load_from_env",
    "parse_model_spec",
]
