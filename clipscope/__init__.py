"""clipscope: look inside CLIP models and test them before deployment.

Start with :func:`clipscope.load`, which returns a :class:`clipscope.ClipModel`. The capability
subpackages and modules (``clipscope.neurons``, ``clipscope.optvis``, ``clipscope.typographic``,
``clipscope.audit``, ``clipscope.widgets``, ``clipscope.organism``, ``clipscope.attribution``, ...)
are imported on first attribute access: ``import clipscope`` imports none of them.
"""
import importlib
from types import ModuleType

from .data import EmbeddedImages, ImageLoadError
from .hooks import Site, Unit
from .hub import CheckpointError, UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
from .model import ClipModel, Layers, ZeroShotClassifier, ZeroShotResult, load, load_from_env, parse_model_spec

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (setuptools dynamic)

#: Submodules imported on first access as ``clipscope.NAME`` (module ``__getattr__``, PEP 562).
SUBMODULES = ("attribution", "audit", "decompose", "io", "neurons", "optvis", "organism", "probe", "prompts", "scoring",
              "serve", "textspan", "typographic", "validate", "widgets")


def __getattr__(name: str) -> ModuleType:
    """Return the submodule ``clipscope.<name>`` (importing it once) for a name in :data:`SUBMODULES`."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, the not yet imported :data:`SUBMODULES` included (for completion)."""
    return sorted(set(globals()) | set(SUBMODULES))


__all__ = [
    "CheckpointError", "ClipModel", "EmbeddedImages", "ImageLoadError", "Layers", "Site", "Unit", "UnknownModelError",
    "UnsafeCheckpointError", "WeightsNotAvailableError", "ZeroShotClassifier", "ZeroShotResult", "load", "load_from_env",
    "parse_model_spec",
]
