"""Direct-effect decomposition cost per image vs one plain ``encode_image``, on a ViT-B/16-sized model.

One run, side by side on the same images, the arms interleaved over ``--rounds`` rounds (median
seconds; the machine may be shared): the plain embedding (fused attention, no hooks), the
decomposition in embedding units (every layer x head x token part kept: 12 x 12 x 197 x 512 floats,
58 MB per image) and the decomposition projected at once on ``--classes`` text directions (the memory
sane way for many images). Each arm runs once on one image first (warm-up, not timed). The model is
open_clip's ViT-B-16 with random weights (the cost does not depend on the weights).

    python bench/decompose_cost.py [--device cpu] [--images 2] [--batch-size 2] [--classes 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import clipscope
from clipscope.decompose import decompose


def seconds(model: clipscope.ClipModel, run) -> float:
    """Wall seconds of ``run()`` (synchronized on CUDA)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised"
        model = clipscope.load("ViT-B-16", device=args.device, precision="fp32")
    classes = [f"class {i}" for i in range(args.classes)]
    model.class_embeddings(classes)  # the text side is cached: not part of the image cost
    images = torch.randn(args.images, 3, *model.image_size)
    arms = {"encode_image": lambda x: torch.no_grad()(model.encode_image)(x, normalize=False),
            "decompose (embedding units)": lambda x: decompose(model, x, batch_size=args.batch_size, progress=False),
            f"decompose ({args.classes} classes)": lambda x: decompose(model, x, classes=classes,
                                                                       batch_size=args.batch_size, progress=False)}
    results, samples = {}, {name: [] for name in arms}
    for arm in arms.values():
        arm(images[:1])
    for _ in range(args.rounds):
        for name, arm in arms.items():
            samples[name].append(seconds(model, lambda: results.__setitem__(name, arm(images))) / args.images)
    times = {name: statistics.median(values) for name, values in samples.items()}
    parts, plain = results["decompose (embedding units)"], results["encode_image"]
    error = float(((parts.total() - plain.cpu()).norm(dim=1) / plain.cpu().norm(dim=1)).max())
    base = times["encode_image"]
    print(f"ViT-B-16 (random weights), {args.images} image(s) at {model.image_size[0]} px, device {model.device}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    for name, per_image in times.items():
        print(f"  {name:32s} {per_image * 1000:9.1f} ms per image   {per_image / base:6.2f}x encode_image")
    print(f"  parts sum to the plain embedding within {error:.1e} of its norm (max over images)")


if __name__ == "__main__":
    main()
