"""Occlusion attribution cost: forward passes and seconds per image, old vs new default, batched vs unbatched.

Four arms side by side on each model: the old default window (1/8 of the input, stride 1/16: 225
occluded images at 64 and 224 px) and the new one (1/4, stride 1/8: 49), each with one occluded image
per forward pass (``batch_size=1``) and with 16 (the old code already ran 16 per pass, so
"old default, batch 16" is the shipped baseline the speed-up is relative to). Images are counted as
they reach the image tower (so the figure is measured, and checked against
``Occlusion.forward_passes()``); the arms run interleaved on each image and the seconds are the
median over the images. Models: the organism (64 px; two generated scenes) and a random-init RN50
(224 px; one scene). About 1.5 minutes on 2 idle CPU cores (most of it RN50's two old-default arms).

    python bench/attribution_cost.py [--device cpu] [--images 2] [--rn50-images 1] [--models organism RN50]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import clipscope
from clipscope.attribution import Occlusion
from clipscope.organism import SHAPES, ZERO_SHOT_TEMPLATES
from clipscope.organism.scenes import SceneConfig, object_scene


def arms(model: clipscope.ClipModel) -> dict[str, Occlusion]:
    """The four occlusion settings, by label."""
    side = min(model.image_size)
    window = max(2, side // 8)
    old = {"window": window, "stride": max(1, window // 2)}
    return {"old default, unbatched": Occlusion(model, batch_size=1, **old),
            "old default, batch 16": Occlusion(model, batch_size=16, **old),
            "new default, unbatched": Occlusion(model, batch_size=1),
            "new default, batch 16": Occlusion(model, batch_size=16)}


def timed(model: clipscope.ClipModel, occlusion: Occlusion, image, templates) -> tuple[float, int, int]:
    """Seconds, images through the image tower and tower calls for one attribution."""
    counts = {"images": 0, "calls": 0}
    original = model.encode_image

    def counted(images, **kwargs):
        counts["images"] += len(images)
        counts["calls"] += 1
        return original(images, **kwargs)
    model.encode_image = counted
    try:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        occlusion.attribute(image, list(SHAPES), templates=templates)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        del model.encode_image
    return seconds, counts["images"], counts["calls"]


def bench(name: str, n_images: int, device: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = clipscope.load(name, device=device, precision="fp32")
    templates = ZERO_SHOT_TEMPLATES if name == "organism" else ("a photo of a {}.",)
    config = SceneConfig(image_size=model.image_size[0])
    images = [object_scene(seed=900 + i, config=config).image for i in range(n_images)]
    settings = arms(model)
    Occlusion(model, window=min(model.image_size)).attribute(images[0], list(SHAPES), templates=templates)  # warm-up
    seconds = {label: [] for label in settings}
    counts = {}
    for image in images:
        for label, occ in settings.items():   # interleaved: machine noise hits every arm alike
            s, n, calls = timed(model, occ, image, templates)
            assert n == occ.forward_passes(), (label, n, occ.forward_passes())
            seconds[label].append(s)
            counts[label] = (occ.window, occ.stride, n, calls)
    base = statistics.median(seconds["old default, batch 16"])
    print(f"\n{name} ({model.image_size[0]} px, {model.device}, {n_images} image(s))")
    print(f"{'arm':<24} {'window':>6} {'stride':>6} {'images':>6} {'calls':>5} {'s/image':>8} {'speed-up':>8}")
    for label, (window, stride, n, calls) in counts.items():
        s = statistics.median(seconds[label])
        print(f"{label:<24} {window:>6} {stride:>6} {n:>6} {calls:>5} {s:>8.3f} {base / s:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2, help="scenes per model (organism)")
    parser.add_argument("--rn50-images", type=int, default=1, help="scenes for RN50 (random init, 224 px)")
    parser.add_argument("--models", nargs="+", default=["organism", "RN50"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; occlusion of P(true shape) among "
          f"{len(SHAPES)} shapes, grey fill; images = image-tower forward passes per attribution")
    for name in args.models:
        bench(name, args.rn50_images if name == "RN50" else args.images, args.device)


if __name__ == "__main__":
    main()
