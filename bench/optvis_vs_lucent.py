"""Feature visualization throughput: clipscope's ``optvis.render`` against lucent's ``render_vis``.

The same channel objectives (channels 0..N-1 of the last ResNet block, ``layer4.0``
in clipscope's names, ``layer4_0`` in lucent's), the same image size, the same
parameterization (lucent's decorrelated Fourier image, which clipscope wraps),
the same optimizer (Adam, lr 0.05) and the same number of steps, on the same
model's image tower, for 1 and for N units. Four arms:

- ``clipscope``: one ``render`` call, the N units as one batch; its forward pass stops at
  ``layer4.0``, the deepest site the objective reads (the default);
- ``clipscope full``: the same, but the tower runs to the end at every step, as in lucent (equal
  work: this arm isolates batching and per-step overhead from the early stop);
- ``lucent seq``: one ``render_vis`` call per unit (its documented use: one objective per call);
- ``lucent batch``: one ``render_vis`` call on a batch of N images with the sum of
  ``channel(layer, c, batch=i)`` objectives (lucent's own way to batch).

Both libraries get their standard robustness transforms and CLIP normalization
(lucent with ``preprocess=False`` and a CLIP-normalize transform appended, since its
built-in preprocessing is ImageNet's; ``fixed_image_size`` set to the model's input
size so it does not upsample to 224). Both run in fp32 (lucent's images are fp32).
clipscope runs with ``redirect_steps=0`` (no ReLU gradient redirection), as lucent has none.
Reported: steps/s of each call and unit-steps/s (units x steps / s), the median of
``--repeats`` interleaved repeats after a warm-up; each ratio is ``clipscope``'s unit throughput
over that arm's.
Models: the tiny ResNet config, a random-init RN50, and the organism when its
weights exist.

    python bench/optvis_vs_lucent.py [--steps 32] [--units 1 8] [--repeats 3] [--device auto] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import clipscope
from clipscope import Unit, optvis


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clipscope_arm(model, channels: list[int], size: int, steps: int, full_pass: bool = False):
    objective = optvis.batched([Unit.channel("visual.layer4.0", c) for c in channels])
    if full_pass:  # declaring that the objective reads the embedding keeps the whole tower running
        objective = optvis.Objective(objective.fn, objective.name, units=objective.units, elementwise=False,
                                     reads_embedding=True)
    return lambda: optvis.render(model, objective, batch=len(channels), param="fourier", size=size, steps=steps,
                                 lr=0.05, redirect_steps=0, progress=False)  # lucent has no ReLU redirection


def lucent_arms(model, channels: list[int], size: int, steps: int):
    from lucent.optvis import objectives, param, render, transform
    visual = model.model.visual
    mean = torch.tensor(model.image_mean, device=model.device).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std, device=model.device).view(1, 3, 1, 1)
    transforms = transform.standard_transforms + [lambda x: (x - mean) / std]
    common = {"optimizer": lambda p: torch.optim.Adam(p, lr=0.05), "transforms": transforms, "thresholds": (steps,),
              "preprocess": False, "progress": False, "show_image": False, "fixed_image_size": model.image_size[0]}

    def render_vis(objective, batch: int) -> None:
        # render_vis hooks every module and never removes its hooks; drop them after each call so
        # they do not pile up (which would slow later calls of both libraries on this model)
        before = {m: set(m._forward_hooks) for m in visual.modules()}
        try:
            render.render_vis(visual, objective, param_f=lambda: param.image(size, batch=batch), **common)
        finally:
            for m, keys in before.items():
                for k in set(m._forward_hooks) - keys:
                    del m._forward_hooks[k]

    def sequential():
        for c in channels:
            render_vis(f"layer4_0:{c}", 1)

    def batched():
        render_vis(objectives.Objective.sum([objectives.channel("layer4_0", c, batch=i)
                                             for i, c in enumerate(channels)]), len(channels))

    return sequential, batched


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--units", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["clipscope-tiny-rn", "RN50", "organism"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = clipscope.model.resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, steps {args.steps}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'model':<20}{'units':>6}{'arm':>16}{'s/call':>9}{'steps/s':>9}{'unit-steps/s':>14}{'ratio':>8}")
    for name in args.models:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RN50 without pretrained= warns that it is random
                model = clipscope.load(name, device=device, precision="fp32")
        except clipscope.WeightsNotAvailableError:
            print(f"{name:<20}  skipped: weights not available")
            continue
        size = model.image_size[0]
        for n in args.units:
            channels = list(range(n))
            arms = {"clipscope": clipscope_arm(model, channels, size, args.steps),
                    "clipscope full": clipscope_arm(model, channels, size, args.steps, full_pass=True)}
            sequential, batched = lucent_arms(model, channels, size, args.steps)
            arms["lucent seq"] = sequential
            if n > 1:
                arms["lucent batch"] = batched
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for fn in arms.values():  # warm-up
                    fn()
                times = {arm: [] for arm in arms}
                for _ in range(args.repeats):
                    for arm, fn in arms.items():
                        times[arm].append(timed(fn, device))
            best = {arm: statistics.median(t) for arm, t in times.items()}
            for arm, seconds in best.items():
                unit_steps = n * args.steps / seconds
                # clipscope's unit throughput over this arm's
                ratio = "" if arm == "clipscope" else f"{seconds / best['clipscope']:>8.2f}"
                print(f"{name:<20}{n:>6}{arm:>16}{seconds:>9.2f}{args.steps / seconds:>9.2f}{unit_steps:>14.1f}{ratio}")


if __name__ == "__main__":
    main()
