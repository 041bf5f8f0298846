"""Feature visualization throughput: clipscope's ``optvis.render`` against lucent's ``render_vis``,
in GFLOP/s against this machine's ``torch.mm`` rate, one arm per speed option, all in one run.

The same channel objectives (channels 0..N-1 of the last ResNet block, ``layer4.0`` in clipscope's
names, ``layer4_0`` in lucent's), the same image size, the same parameterization (lucent's
decorrelated Fourier image, which clipscope wraps), the same optimizer (Adam, lr 0.05) and the same
number of steps, on the same model's image tower, for 1 and for N units. Arms:

- ``clipscope``: one ``render`` call, the N units as one batch; its forward pass stops at
  ``layer4.0``, the deepest site the objective reads (the default, less work per step);
- ``full``: the same, but the tower runs to the end at every step, as in lucent (equal work per
  step: this arm isolates batching and per-step overhead from the early stop); ``full cl``,
  ``full bf16`` and ``full bf16 cl`` add ``render``'s speed options ``channels_last=True`` and
  ``autocast="bf16"``;
- ``lucent seq``: one ``render_vis`` call per unit (its documented use: one objective per call);
- ``lucent batch``: one ``render_vis`` call on a batch of N images with the sum of
  ``channel(layer, c, batch=i)`` objectives (lucent's own way to batch).

Both libraries get their standard robustness transforms and CLIP normalization (lucent with
``preprocess=False`` and a CLIP-normalize transform appended, since its built-in preprocessing is
ImageNet's; ``fixed_image_size`` set to the model's input size). Lucent runs in fp32, as do the
clipscope arms without ``bf16``. clipscope runs with ``redirect_steps=0`` (lucent has no ReLU
gradient redirection).

Work: the FLOPs of each call are counted with ``torch.utils.flop_counter.FlopCounterMode`` (a 1-step
and a 2-step call give the per-call and per-step counts; forward and backward). Time: each call is
timed by the wall clock and by this process's CPU time; the machine is shared, so the CPU-time
figures (with ``--threads 1``, the default) are the ones that compare libraries, and the wall
figures carry the load average printed with them. ``torch.mm`` on 1024x1024 fp32 (and bf16, for
reference) is timed in the same interleaved rounds. Reported: per arm the median over
``--repeats`` interleaved repeats after a warm-up: GFLOP per call, wall s/call and GFLOP/s, CPU s/call
and GFLOP/s, the CPU GFLOP/s as a fraction of fp32 ``torch.mm``'s (``/ mm``) and of ``lucent seq``'s
(``x luc``: for the ``full`` arms, at equal work per step), and unit-steps per CPU-second. With
``--quality``, each clipscope arm's final images are scored in fp32 (the unit's mean at its
optimization site, no transforms): the gain over the starting image as a fraction of ``full``'s
gain, the measure of what ``bf16`` costs in result.

    python bench/optvis_vs_lucent.py [--steps 32] [--units 1 8] [--repeats 3] [--threads 1]
        [--models clipscope-tiny-rn RN50 organism] [--arms full "full bf16 cl" "lucent seq" ...] [--quality]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import clipscope
from clipscope import Unit, optvis
from clipscope.optvis.render import optimization_site

SITE = "visual.layer4.0"
LUCENT_SITE = SITE.removeprefix("visual.").replace(".", "_")  # lucent names modules with "_"
OPTIONS = {"full": {}, "full cl": {"channels_last": True}, "full bf16": {"autocast": "bf16"},
           "full bf16 cl": {"channels_last": True, "autocast": "bf16"}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clipscope_arm(model, channels: list[int], size: int, full_pass: bool = False, **options):
    """A function ``steps -> RenderResult`` rendering ``channels`` of ``SITE`` in one batch; ``options`` go to
    ``render`` (lucent's lr 0.05 and no ReLU redirection unless given)."""
    objective = optvis.batched([Unit.channel(SITE, c) for c in channels])
    if full_pass:  # declaring that the objective reads the embedding keeps the whole tower running
        objective = optvis.Objective(objective.fn, objective.name, units=objective.units, elementwise=False,
                                     reads_embedding=True)
    kw = {"param": "fourier", "lr": 0.05, "redirect_steps": 0, "progress": False, **options}
    return lambda steps: optvis.render(model, objective, batch=len(channels), size=size, steps=steps, **kw)


def lucent_arms(model, channels: list[int], size: int):
    """``(sequential, batched)``: functions ``steps -> None`` running lucent's ``render_vis``."""
    from lucent.optvis import objectives, param, render, transform
    visual = model.model.visual
    mean = torch.tensor(model.image_mean, device=model.device).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std, device=model.device).view(1, 3, 1, 1)
    transforms = transform.standard_transforms + [lambda x: (x - mean) / std]
    common = {"optimizer": lambda p: torch.optim.Adam(p, lr=0.05), "transforms": transforms, "preprocess": False,
              "progress": False, "show_image": False, "fixed_image_size": model.image_size[0]}

    def render_vis(objective, batch: int, steps: int) -> None:
        # render_vis hooks every module and never removes its hooks; drop them after each call so
        # they do not pile up (which would slow later calls of both libraries on this model)
        before = {m: set(m._forward_hooks) for m in visual.modules()}
        try:
            render.render_vis(visual, objective, param_f=lambda: param.image(size, batch=batch),
                              thresholds=(steps,), **common)
        finally:
            for m, keys in before.items():
                for k in set(m._forward_hooks) - keys:
                    del m._forward_hooks[k]

    def sequential(steps: int) -> None:
        for c in channels:
            render_vis(f"{LUCENT_SITE}:{c}", 1, steps)

    def batched(steps: int) -> None:
        render_vis(objectives.Objective.sum([objectives.channel(LUCENT_SITE, c, batch=i)
                                             for i, c in enumerate(channels)]), len(channels), steps)

    return sequential, batched


def mm_call(dtype: torch.dtype, device: torch.device, n: int = 1024, reps: int = 10):
    """``(function, flops)``: ``reps`` products of two ``n x n`` matrices of ``dtype``."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return (lambda: [torch.mm(a, b) for _ in range(reps)]), 2.0 * n ** 3 * reps


def call_flops(fn, steps: int) -> float:
    """FLOPs of ``fn(steps)`` (forward and backward), from counted 1- and 2-step calls after a warm-up call."""
    fn(1)  # a model's first call may do one-time work (site discovery) that later calls skip
    counts = []
    for s in (1, 2):
        with warnings.catch_warnings(), FlopCounterMode(display=False) as counter:
            warnings.simplefilter("ignore")
            fn(s)
        counts.append(counter.get_total_flops())
    return counts[0] + (steps - 1) * (counts[1] - counts[0])


def timed(fn, device: torch.device):
    """``(wall seconds, CPU seconds of this process, fn's result)`` of one call of ``fn``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def gain_fraction(model, results: dict, channels: list[int], size: int) -> dict[str, float]:
    """Per clipscope arm: the fp32 gain of its final images over the starting images (the unit's mean at its
    optimization site, no transforms), as a fraction of the ``full`` arm's gain, averaged over units."""
    site = optimization_site(model, SITE)
    initial = clipscope_arm(model, channels, size, lr=0.0)(1).images  # the seed's starting images

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            acts = model.activations(optvis.ClipInput(model)(images.to(model.device)), site)
        return torch.stack([model.read(Unit.channel(site, c), acts)[i] for i, c in enumerate(channels)]).float()

    base = score(initial)
    reference = score(results["full"].images) - base
    return {arm: float(((score(r.images) - base) / reference).mean()) for arm, r in results.items()}


def measure(model, channels: list[int], args, device: torch.device) -> None:
    """Time every arm for ``channels`` on ``model`` (interleaved repeats) and print one row per arm."""
    size, n = model.image_size[0], len(channels)
    arms = {"clipscope": clipscope_arm(model, channels, size)}
    arms.update({arm: clipscope_arm(model, channels, size, full_pass=True, **kw) for arm, kw in OPTIONS.items()})
    arms["lucent seq"], batched = lucent_arms(model, channels, size)
    if n > 1:
        arms["lucent batch"] = batched
    arms = {arm: fn for arm, fn in arms.items() if args.arms is None or arm in args.arms}
    flops = {arm: call_flops(fn, args.steps) for arm, fn in arms.items()}
    calls = {arm: (lambda fn=fn: fn(args.steps)) for arm, fn in arms.items()}
    for label, dtype in (("torch.mm fp32", torch.float32), ("torch.mm bf16", torch.bfloat16)):
        calls[label], flops[label] = mm_call(dtype, device)
    times = {arm: [] for arm in calls}
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.repeats):
            for arm, call in calls.items():
                wall, cpu, out = timed(call, device)
                times[arm].append((wall, cpu))
                if isinstance(out, optvis.RenderResult):
                    results[arm] = out
    report(model.name, n, args.steps, flops, times)
    if args.quality and "full" in results:
        gains = gain_fraction(model, results, channels, size)
        print("    final-image gain, fp32-scored, as a fraction of full's: "
              + ", ".join(f"{arm} {g:.3f}" for arm, g in gains.items()), flush=True)


def report(name: str, n: int, steps: int, flops: dict, times: dict) -> None:
    """Print one row per arm: medians of wall and CPU time, GFLOP/s, fraction of fp32 torch.mm, x lucent."""
    wall = {arm: statistics.median(t[0] for t in ts) for arm, ts in times.items()}
    cpu = {arm: statistics.median(t[1] for t in ts) for arm, ts in times.items()}
    rate = {arm: flops[arm] / cpu[arm] / 1e9 for arm in times}
    for arm in times:
        unit_steps = "" if arm.startswith("torch.mm") else f"{n * steps / cpu[arm]:>10.2f}"
        vs_lucent = f"{rate[arm] / rate['lucent seq']:>8.2f}" if "lucent seq" in rate else ""
        print(f"{name:<18}{n:>4}{arm:>15}{flops[arm] / 1e9:>9.1f}{wall[arm]:>9.2f}{flops[arm] / wall[arm] / 1e9:>9.1f}"
              f"{cpu[arm]:>9.2f}{rate[arm]:>9.1f}{rate[arm] / rate['torch.mm fp32']:>8.3f}{vs_lucent:>8}"
              f"{unit_steps:>10}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--units", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["clipscope-tiny-rn", "RN50", "organism"])
    parser.add_argument("--arms", nargs="+", default=None, help="arms to run (default all); torch.mm always runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quality", action="store_true", help="score each clipscope arm's final images in fp32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = clipscope.model.resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, steps {args.steps}, "
          f"median of {args.repeats} interleaved repeats; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (wall figures suffer from other load, CPU-time figures much less)")
    print(f"{'model':<18}{'units':>4}{'arm':>15}{'GFLOP':>9}{'wall s':>9}{'GF/s w':>9}{'cpu s':>9}{'GF/s c':>9}"
          f"{'/ mm':>8}{'x luc':>8}{'u-st/s c':>10}")
    for name in args.models:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RN50 without pretrained= warns that it is random
                model = clipscope.load(name, device=device, precision="fp32")
        except clipscope.WeightsNotAvailableError:
            print(f"{name:<18}  skipped: weights not available")
            continue
        for n in args.units:
            measure(model, list(range(n)), args, device)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
