"""The sparse autoencoder: a dictionary of feature directions over one site's vectors.

:class:`SparseAutoencoder` reads a site's feature vector (a conv site's channel vector at each spatial
position, a tokens site's vector at each token, a vector site's vector), scales it by ``input_scale``,
and writes it as a sparse non-negative combination of decoder rows:

    pre  = (x * s - b_dec) @ W_enc + b_enc                 (F latents)
    f    = TopK(pre) then ReLU   ("topk", Gao et al. 2024)   or   ReLU(pre)   ("relu", Bricken et al. 2023)
    x^   = (f @ W_dec + b_dec) / s                          (the site's own units)

Decoder rows are unit norm in a finished SAE. TopK keeps them unit norm during training; the ReLU + L1
baseline trains them free with an L1 penalty weighted by the decoder norms (Anthropic's recipe), and
:meth:`SparseAutoencoder.fold_decoder_norms` then moves the norms into the encoder, which leaves the
reconstruction unchanged (ReLU is positively homogeneous) and turns the weighted penalty into a plain one.

The clipscope format is a folder holding ``sae.json`` (the configuration) and ``sae.safetensors``
(the four tensors); :meth:`SparseAutoencoder.save` writes it atomically and
:meth:`SparseAutoencoder.load` reads it without unpickling anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipscope.io import write_bytes_atomic, write_text_atomic
from clipscope.validate import InvalidArgumentError, check_choice, check_int, check_number

__all__ = ["ACTIVATIONS", "CONFIG_NAME", "FORMAT", "TOKENS", "WEIGHTS_NAME", "SparseAutoencoder"]

ACTIVATIONS = ("topk", "relu")
TOKENS = ("all", "patches", "class")
FORMAT = "clipscope-sae"
FORMAT_VERSION = 1
CONFIG_NAME = "sae.json"
WEIGHTS_NAME = "sae.safetensors"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over one clipscope site's feature vectors.

    ``site`` names the site it reads, ``d_in`` its number of units, ``n_features`` the latents F.
    ``activation`` is ``"topk"`` (keep the ``k`` largest pre-activations, then ReLU) or ``"relu"``.
    ``input_scale`` multiplies x before encoding and divides the reconstruction; ``tokens`` records which
    tokens of a tokens site it was trained on (metadata). Weights start as random unit decoder rows
    (drawn from ``seed``) with the encoder their transpose and zero biases (Gao et al. 2024).
    Every method works on any leading shape; the feature dimension is last.
    """

    def __init__(self, site: str, d_in: int, n_features: int, *, activation: str = "topk",
                 k: int | None = None, input_scale: float = 1.0, tokens: str = "all", seed: int = 0):
        super().__init__()
        if not isinstance(site, str) or not site:
            raise InvalidArgumentError("site", site, "a non-empty site name")
        self.site = site
        self.d_in = check_int("d_in", d_in, low=1)
        self.n_features = check_int("n_features", n_features, low=1)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        if activation == "topk":
            self.k: int | None = check_int("k", k, low=1, high=self.n_features)
        elif k is not None:
            raise InvalidArgumentError("k", k, "None for activation='relu' (k is the TopK size)")
        else:
            self.k = None
        self.input_scale = check_number("input_scale", input_scale, low=0, low_open=True)
        self.tokens = check_choice("tokens", tokens, TOKENS)
        generator = torch.Generator().manual_seed(check_int("seed", seed))
        directions = torch.randn(self.n_features, self.d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(directions)
        self.W_enc = nn.Parameter(directions.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.n_features))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def extra_repr(self) -> str:
        sparsity = f"k={self.k}" if self.activation == "topk" else "relu"
        return f"site={self.site!r}, d_in={self.d_in}, n_features={self.n_features}, {sparsity}"

    def config(self) -> dict[str, Any]:
        """The configuration saved beside the weights: everything but the tensors, JSON-ready."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "site": self.site, "d_in": self.d_in,
                "n_features": self.n_features, "activation": self.activation, "k": self.k,
                "input_scale": self.input_scale, "tokens": self.tokens}

    # -- the map ----------------------------------------------------------------------------------

    def pre_activation(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., F): the encoder's pre-activation ``(x * s - b_dec) @ W_enc + b_enc``."""
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """(..., F) pre-activations -> (..., F) feature activations (>= 0): TopK then ReLU, or ReLU."""
        if self.activation == "relu":
            return torch.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) site vectors -> (..., F) feature activations, >= 0 (at most k non-zero for TopK)."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: Tensor) -> Tensor:
        """(..., F) feature activations -> (..., d_in) reconstruction, in the site's own units."""
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_in): the reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def decoder_direction(self, feature: int) -> Tensor:
        """(d_in,) what one unit of feature ``feature`` adds to x: ``W_dec[feature] / input_scale``."""
        feature = check_int("feature", feature, low=0, high=self.n_features - 1)
        return self.W_dec[feature] / self.input_scale

    # -- keeping the decoder unit norm ------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (TopK training does this after each step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        """Remove from ``W_dec.grad`` its component along each row (the step then keeps rows on the sphere)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make decoder rows unit norm by moving their norms into the encoder.

        Feature i's activation is multiplied by ``|W_dec[i]|`` (its encoder column and bias scaled) and its
        row divided by it, so reconstructions are unchanged for ReLU. Not for TopK (a rescaled latent could
        change which k are kept): TopK raises :class:`InvalidArgumentError`.
        """
        if self.activation != "relu":
            raise InvalidArgumentError("activation", self.activation, "'relu' (TopK keeps unit rows itself)")
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_enc *= norms
        self.b_enc *= norms
        self.W_dec /= norms[:, None]

    # -- the clipscope folder format --------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``sae.json`` and ``sae.safetensors`` into ``folder`` (created if missing), each atomically.

        Returns the folder. Tensors are saved as float32 on the CPU, whatever the SAE's device and dtype. The
        weights file also carries the configuration, so that :meth:`load` tells a pair left by an interrupted
        save (new weights beside an old ``sae.json``) from a whole one.
        """
        from safetensors.torch import save as safetensors_bytes

        folder = Path(folder)
        tensors = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in TENSOR_NAMES}
        config = json.dumps(self.config(), sort_keys=True)
        write_bytes_atomic(folder / WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": FORMAT,
                                                                                      "config": config}))
        write_text_atomic(folder / CONFIG_NAME, json.dumps(self.config(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SparseAutoencoder":
        """Read a folder written by :meth:`save` (safetensors and JSON only, nothing unpickled); on the CPU.

        A missing file, another format or tensors of the wrong shape raise :class:`InvalidArgumentError`
        naming ``folder``.
        """
        folder = Path(folder)
        config = read_config(folder)
        saved_with = _weights_config(folder / WEIGHTS_NAME)
        if saved_with is not None and saved_with != json.loads(json.dumps(config, sort_keys=True)):
            raise InvalidArgumentError("folder", str(folder), f"{CONFIG_NAME} and {WEIGHTS_NAME} from the same save "
                                                              "(they differ: a save was interrupted between them; "
                                                              "save the SAE again)")
        sae = cls.from_config(config, where=folder)
        sae.load_tensors(read_tensors(folder / WEIGHTS_NAME, TENSOR_NAMES, parameter="folder"), where=folder)
        return sae

    @classmethod
    def from_config(cls, config: dict[str, Any], *, where: Any = None) -> "SparseAutoencoder":
        """An SAE with the configuration ``config`` (as :meth:`config` returns) and fresh weights."""
        keys = ("site", "d_in", "n_features", "activation", "k", "input_scale", "tokens")
        missing = [key for key in keys if key not in config]
        if missing:
            raise InvalidArgumentError("folder", where, f"a clipscope SAE config with {', '.join(missing)}")
        return cls(**{key: config[key] for key in keys})

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], *, where: Any = None) -> None:
        """Copy ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` into this SAE, checking every shape."""
        for name in TENSOR_NAMES:
            parameter = getattr(self, name)
            value = tensors[name]
            if tuple(value.shape) != tuple(parameter.shape):
                raise InvalidArgumentError("folder", where, f"{name} of shape {tuple(parameter.shape)} "
                                                             f"(found {tuple(value.shape)})")
            parameter.copy_(value.to(parameter.dtype))


def _weights_config(path: Path) -> dict[str, Any] | None:
    """The configuration :meth:`SparseAutoencoder.save` put in the weights file's metadata (None if absent or
    unreadable: :func:`read_tensors` reports a bad file)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get("config")
    except Exception:  # a missing or malformed file: read_tensors raises the error that names it
        return None
    return None if text is None else json.loads(text)


def read_config(folder: Path) -> dict[str, Any]:
    """The configuration in ``folder/sae.json``; raises :class:`InvalidArgumentError` if it is not one."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("folder", str(folder), f"a folder with a readable {CONFIG_NAME} ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InvalidArgumentError("folder", str(folder), f"a clipscope SAE folder ({CONFIG_NAME} with "
                                                          f"format {FORMAT!r})")
    if config.get("version", 0) > FORMAT_VERSION:
        raise InvalidArgumentError("folder", str(folder), f"format version <= {FORMAT_VERSION} (upgrade clipscope)")
    return config


def read_tensors(path: Path, names: tuple[str, ...], *, parameter: str) -> dict[str, Tensor]:
    """The tensors ``names`` from the safetensors file ``path``; errors name ``parameter``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            missing = [name for name in names if name not in handle.keys()]
            if missing:
                raise InvalidArgumentError(parameter, str(path), f"a file with tensors {', '.join(missing)}")
            return {name: handle.get_tensor(name) for name in names}
    except InvalidArgumentError:
        raise
    except Exception as exc:  # safetensors' errors derive from Exception only
        raise InvalidArgumentError(parameter, str(path), f"a readable safetensors file ({exc})") from exc

