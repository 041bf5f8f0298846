"""Image parameterizations: the tensors the optimizer changes, and how they become images.

Each parameterization is called with no arguments and returns float32 RGB images
``(B, 3, H, W)`` with values in [0, 1] on its device; :meth:`ImageParam.parameters`
lists the tensors to optimize, and ``lr`` is the Adam learning rate it works well with.

- :class:`FourierImage`: lucid's decorrelated Fourier image, built by torch-lucent
  (``lucent.optvis.param.image``), which works unchanged on this torch.
- :class:`PixelImage`: one free value per pixel and channel, squashed by a sigmoid.
- :class:`MacoImage`: MACO (Fel et al. 2023): only the Fourier phase is optimized;
  the magnitude stays fixed to a natural-image spectrum (:func:`natural_spectrum`).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math

import numpy as np
import torch

from ..validate import InvalidArgumentError, check_int, check_number

#: The largest image side, in pixels, a parameterization may have.
MAX_SIZE = 4096


def check_size(parameter: str, size: object) -> tuple[int, int]:
    """Return ``size`` (an int, or an ``(H, W)`` pair of ints, each in 1..:data:`MAX_SIZE` pixels) as ``(H, W)``."""
    valid = f"an image size in pixels: an integer or an (H, W) pair of integers in [1, {MAX_SIZE}]"
    sides = [size, size] if not isinstance(size, (tuple, list)) else list(size)
    try:
        if len(sides) != 2:
            raise InvalidArgumentError(parameter, size, valid)
        h, w = (check_int(parameter, side, low=1, high=MAX_SIZE) for side in sides)
    except InvalidArgumentError:
        raise InvalidArgumentError(parameter, size, valid) from None
    return h, w


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return check_size("size", size)


def _batch(batch: int) -> int:
    return check_int("batch", batch, low=1)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def _color_matrix() -> torch.Tensor:
    """Lucid's colour-correlation square root, columns scaled to max norm 1: ``rgb = M @ decorrelated``."""
    from lucent.optvis.param.color import color_correlation_normalized
    return torch.from_numpy(np.asarray(color_correlation_normalized, dtype=np.float32))


class ImageParam:
    """A batch of ``batch`` images of ``size`` = ``(H, W)``; call it for the images."""

    batch: int
    size: tuple[int, int]
    device: torch.device
    lr: float

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        """The leaf tensors to optimize."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch={self.batch}, size={self.size})"


class FourierImage(ImageParam):
    """lucid's Fourier-space image with colour decorrelation, built by torch-lucent.

    The parameters are the real and imaginary parts of each image's spectrum in a
    decorrelated colour space, scaled by 1/frequency; the image is their inverse
    FFT, recorrelated and passed through a sigmoid (lucent's ``param.image`` with
    ``fft=True, decorrelate=True``). ``sd`` is the standard deviation of the
    initial spectrum (lucent's default 0.01 starts near uniform grey). lucent puts
    its tensors on ``cuda:0`` when CUDA exists, else the CPU; images are moved to
    ``device`` when that differs.
    """

    lr = 0.05

    def __init__(self, batch: int, size: int | tuple[int, int], *, sd: float = 0.01, decorrelate: bool = True,
                 seed: int | None = None, device: str | torch.device = "cpu"):
        from lucent.optvis.param import image
        self.batch, self.size, self.device = _batch(batch), _size(size), torch.device(device)
        sd = check_number("sd", sd, low=0)
        h, w = self.size
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(int(seed))  # lucent draws its initial spectrum from the global CPU RNG
            self._params, self._image = image(w, h, sd=sd, batch=self.batch, decorrelate=decorrelate, fft=True)

    def __call__(self) -> torch.Tensor:
        return self._image().to(self.device)

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params)


class PixelImage(ImageParam):
    """Free per-pixel logits: ``image = sigmoid(logits)``, logits initialised as ``sd * N(0, 1)``."""

    lr = 0.05

    def __init__(self, batch: int, size: int | tuple[int, int], *, sd: float = 0.01, seed: int | None = None,
                 device: str | torch.device = "cpu"):
        self.batch, self.size, self.device = _batch(batch), _size(size), torch.device(device)
        sd = check_number("sd", sd, low=0)
        logits = torch.randn(self.batch, 3, *self.size, generator=_generator(seed)) * sd
        self.logits = logits.to(self.device).requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits]


@functools.lru_cache(maxsize=1)
def _spectrum_fit() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per decorrelated channel ``(scale, alpha)`` of ``amplitude = scale * f ** -alpha``, fit on one photo.

    The photo is matplotlib's bundled ``grace_hopper.jpg`` (600x512). It is mapped
    to lucid's decorrelated colour space, mean-removed and Hann-windowed; the RMS
    amplitude of its 2-D spectrum is taken in 12 log-spaced radial bands from
    2/512 to 1/8 cycles per pixel (above 1/8 the JPEG's chroma subsampling and
    quantization remove energy that real scenes have), and a line is fit in
    log-log space. The exponents come out near 1.1 (luminance) and 1.2-1.4
    (the two colour-opponent channels), the usual 1/f law of natural images.
    """
    from matplotlib.cbook import get_sample_data
    from PIL import Image
    with Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    decorrelated = rgb @ np.linalg.inv(_color_matrix().double().numpy()).T
    h, w, _ = rgb.shape
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    edges = np.logspace(np.log10(2.0 / min(h, w)), np.log10(0.125), 13)
    centres = np.sqrt(edges[:-1] * edges[1:])
    window = np.outer(np.hanning(h), np.hanning(w))
    scales, alphas = [], []
    for c in range(3):
        x = decorrelated[..., c]
        amp = np.abs(np.fft.rfft2((x - x.mean()) * window))
        band = [np.sqrt(np.mean(amp[(f >= lo) & (f < hi)] ** 2)) for lo, hi in itertools.pairwise(edges)]
        slope, intercept = np.polyfit(np.log(centres), np.log(band), 1)
        scales.append(float(np.exp(intercept)))
        alphas.append(float(-slope))
    return tuple(scales), tuple(alphas)


def natural_spectrum(size: int | tuple[int, int]) -> torch.Tensor:
    """Natural-image Fourier magnitude for an ``(H, W)`` image, float32 ``(3, H, W // 2 + 1)``.

    One channel per decorrelated colour channel (lucid's colour space), following
    the power law fit by :func:`_spectrum_fit` on matplotlib's bundled sample photo,
    with frequencies in cycles per pixel clamped below at ``1 / max(H, W)`` (as
    lucid does for its 1/f scaling). Nothing is downloaded. Only the relative
    shape matters: :class:`MacoImage` standardizes the image it synthesizes.
    """
    h, w = _size(size)
    scales, alphas = _spectrum_fit()
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f = np.maximum(f, 1.0 / max(h, w))
    mag = np.stack([s * f ** -a for s, a in zip(scales, alphas)])
    return torch.from_numpy(mag.astype(np.float32))


class MacoImage(ImageParam):
    """Magnitude-constrained Fourier image (MACO, Fel et al. 2023): only the phase is optimized.

    ``image = sigmoid(contrast * recorrelate(standardize(irfft2(magnitude * exp(i * phase)))))``
    per image, where ``magnitude`` (a buffer, never optimized) is
    :func:`natural_spectrum` and ``phase`` ``(B, 3, H, W // 2 + 1)``, in radians,
    starts uniform in [-pi, pi). Standardization (zero mean, unit standard
    deviation over all pixels and channels of each image) fixes the contrast, so
    ``contrast`` is the standard deviation of the pre-sigmoid values before the
    colour recorrelation.
    """

    lr = 0.1

    def __init__(self, batch: int, size: int | tuple[int, int], *, contrast: float = 2.0, seed: int | None = None,
                 device: str | torch.device = "cpu"):
        self.batch, self.size, self.device = _batch(batch), _size(size), torch.device(device)
        self.contrast = check_number("contrast", contrast, low=0, low_open=True)
        h, w = self.size
        self.magnitude = natural_spectrum(self.size).to(self.device)
        phase = (torch.rand(self.batch, 3, h, w // 2 + 1, generator=_generator(seed)) * 2 - 1) * math.pi
        self.phase = phase.to(self.device).requires_grad_(True)
        self._colors = _color_matrix().to(self.device)

    def spectrum(self) -> torch.Tensor:
        """The complex spectrum ``magnitude * exp(i * phase)``, ``(B, 3, H, W // 2 + 1)``."""
        return torch.polar(self.magnitude.expand_as(self.phase), self.phase)

    def field(self) -> torch.Tensor:
        """The inverse FFT of :meth:`spectrum`: decorrelated-colour images ``(B, 3, H, W)`` before standardizing."""
        return torch.fft.irfft2(self.spectrum(), s=self.size, norm="ortho")

    def __call__(self) -> torch.Tensor:
        x = self.field()
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-8)
        x = torch.einsum("rc,bchw->brhw", self._colors, x)
        return torch.sigmoid(self.contrast * x)

    def parameters(self) -> list[torch.Tensor]:
        return [self.phase]


#: The parameterizations :func:`make_param` (and ``render(param=...)``) know by name.
PARAMS: dict[str, type[ImageParam]] = {"fourier": FourierImage, "pixels": PixelImage, "maco": MacoImage}


def make_param(kind: str, batch: int, size: int | tuple[int, int], *, seed: int | None = None,
               device: str | torch.device = "cpu") -> ImageParam:
    """Return a new parameterization by name: ``"fourier"``, ``"pixels"`` or ``"maco"``, with default settings."""
    if not isinstance(kind, str) or kind not in PARAMS:
        raise InvalidArgumentError("param", kind, f"unknown parameterization; valid: {', '.join(map(repr, PARAMS))} "
                                                  "or an ImageParam")
    cls = PARAMS[kind]
    return cls(batch, size, seed=seed, device=device)
