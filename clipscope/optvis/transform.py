"""Robustness transforms for feature visualization, and the model's own input preprocessing.

Every transform is a callable ``t(images, generator=None) -> images`` on a float
batch ``(B, 3, H, W)`` with values in [0, 1]. Random transforms draw a separate
value per image (so each image of a batch sees its own jitter, scale and angle)
from ``generator`` (a CPU :class:`torch.Generator`), or from torch's global RNG
when it is ``None``: the same generator state gives the same output. Geometric
transforms are a ``grid_sample`` over the whole batch (consecutive ones inside a
:class:`Compose` fused into one); all transforms are differentiable, keep the
dtype and device, and (except :class:`Pad` and :class:`RandomCrop`) keep the
shape. Areas uncovered by a shift, zoom-out or rotation reflect the image.

:class:`ClipInput` comes last in every pipeline: it resizes to the model's input
size and normalizes with the model's own mean and std (CLIP's statistics, never
ImageNet's).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[..., torch.Tensor]


def _draw_uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _warp(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample ``images`` through per-image affine maps ``theta`` ``(B, 2, 3)`` in normalized coordinates."""
    b, c, h, w = images.shape
    out_h, out_w = size or (h, w)
    grid = F.affine_grid(theta.to(images.device, images.dtype), [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class Affine:
    """A shape-keeping geometric transform: a random affine map per image, applied by one ``grid_sample``."""

    def theta(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-image maps ``(B, 2, 3)`` from output to input coordinates (normalized to [-1, 1])."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _warp(images, self.theta(images, generator))


def _chain(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The map of ``then`` applied after ``first`` (output coordinates -> ``first``'s input coordinates)."""
    row = torch.tensor([0.0, 0.0, 1.0]).expand(first.shape[0], 1, 3)
    return (torch.cat([first, row], dim=1) @ torch.cat([then, row], dim=1))[:, :2]


class Compose:
    """Apply transforms in order, passing the same generator to each.

    Runs of consecutive :class:`Affine` transforms are fused into one resampling
    (their maps multiplied), which is faster and blurs less than resampling after
    each; the random draws are the same as applying them one by one.
    """

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pending = None
        for t in self.transforms:
            if isinstance(t, Affine):
                theta = t.theta(images, generator)
                pending = theta if pending is None else _chain(pending, theta)
                continue
            if pending is not None:
                images, pending = _warp(images, pending), None
            images = t(images, generator=generator)
        return images if pending is None else _warp(images, pending)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Pad:
    """Pad every side by ``width`` pixels with a constant (default mid-grey 0.5) or ``mode="reflect"``."""

    def __init__(self, width: int, mode: str = "constant", value: float = 0.5):
        self.width, self.mode, self.value = int(width), mode, float(value)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pad = [self.width] * 4
        if self.mode == "constant":
            return F.pad(images, pad, mode="constant", value=self.value)
        return F.pad(images, pad, mode=self.mode)

    def __repr__(self) -> str:
        return f"Pad({self.width}, mode={self.mode!r})"


class Jitter(Affine):
    """Shift each image by a random whole number of pixels in [-d, d] along each axis (exact, no blur)."""

    def __init__(self, d: int):
        if d < 1:
            raise ValueError(f"jitter distance must be at least 1 pixel, got {d}")
        self.d = int(d)

    def theta(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        shift = torch.randint(-self.d, self.d + 1, (b, 2), generator=generator).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -2.0 * shift[:, 0] / w
        theta[:, 1, 2] = -2.0 * shift[:, 1] / h
        return theta

    def __repr__(self) -> str:
        return f"Jitter({self.d})"


class RandomScale(Affine):
    """Zoom each image about its centre by a random factor in [low, high] (>1 zooms in); shape is kept."""

    def __init__(self, low: float = 0.9, high: float = 1.1):
        self.low, self.high = float(low), float(high)

    def theta(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = images.shape[0]
        inv = 1.0 / _draw_uniform(b, self.low, self.high, generator)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = inv
        return theta

    def __repr__(self) -> str:
        return f"RandomScale({self.low}, {self.high})"


class RandomRotate(Affine):
    """Rotate each image about its centre by a random angle in [-degrees, degrees]; shape is kept."""

    def __init__(self, degrees: float = 10.0):
        self.degrees = float(degrees)

    def theta(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        angle = _draw_uniform(b, -self.degrees, self.degrees, generator) * (math.pi / 180.0)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(b, 2, 3)  # a pixel-space rotation, written in normalized coordinates
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        return theta

    def __repr__(self) -> str:
        return f"RandomRotate({self.degrees})"


class RandomCrop:
    """Cut a ``size`` = ``(h, w)`` window at a random pixel offset from each image."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"crop {self.size} is larger than the images ({h}, {w})")
        oy = torch.randint(0, h - ch + 1, (b,), generator=generator).float()
        ox = torch.randint(0, w - cw + 1, (b,), generator=generator).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw / w, (cw + 2 * ox) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch / h, (ch + 2 * oy) / h - 1
        return _warp(images, theta, size=(ch, cw))

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


def standard_transforms(size: int | tuple[int, int]) -> Compose:
    """Lucid's standard robustness set, scaled to an image of ``size`` pixels.

    For a 224-pixel image: pad 12 (grey), jitter 8, scale 0.9-1.1, rotate +-10 degrees,
    jitter 4, as in lucid/lucent; distances shrink in proportion for smaller images
    (at least 1 pixel). Returns a :class:`Compose`.
    """
    side = min(size) if isinstance(size, tuple) else int(size)
    k = side / 224.0
    return Compose([Pad(max(1, round(12 * k))), Jitter(max(1, round(8 * k))), RandomScale(0.9, 1.1),
                    RandomRotate(10.0), Jitter(max(1, round(4 * k)))])


class ClipInput:
    """Resize to the model's input size and normalize with the model's mean and std.

    Takes ``(B, 3, h, w)`` images in [0, 1]; returns ``(B, 3, H, W)`` (``H, W`` =
    ``model.image_size``) in the model's dtype, normalized by :meth:`ClipModel.normalize`
    (``(x - model.image_mean) / model.image_std`` per channel): the input
    :meth:`ClipModel.encode_image` expects. Downscaling is antialiased.
    """

    def __init__(self, model):
        self.model = model
        self.size = tuple(model.image_size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.size:
            shrink = images.shape[-2] > self.size[0] or images.shape[-1] > self.size[1]
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        return self.model.normalize(images).to(self.model.dtype)

    def __repr__(self) -> str:
        return (f"ClipInput(size={self.size}, mean={list(self.model.image_mean)}, "
                f"std={list(self.model.image_std)})")
