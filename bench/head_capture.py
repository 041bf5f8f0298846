"""Head-level capture cost: images/s of encode_image on a ViT-B/16-sized model, plain vs capturing head sites.

Arms, run side by side in one process (repeats interleaved so that machine noise hits all alike; the
median is reported), each relative to plain ``encode_image`` (the fused attention, no hooks):

- ``one block``: the pattern, ``z`` and ``result`` of one middle block (explicit attention in that
  block only);
- ``every block``: ``result`` of every block of the image tower (what a per-head decomposition of the
  embedding reads: explicit attention everywhere, ``heads`` times the attention output kept per block).

The model is open_clip's ViT-B-16 with random weights (no download). Prints one row per arm, with
wall-clock and process CPU-time ratios (on a shared CPU the CPU-time ratio is the steadier one).

    python bench/head_capture.py [--batch 8] [--repeats 3] [--device auto] [--model ViT-B-16]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import clipscope


def seconds(model: clipscope.ClipModel, x: torch.Tensor, sites: list[str]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``encode_image`` of ``x`` while capturing ``sites``."""
    def sync():
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    with torch.no_grad():
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        if sites:
            with model.capture(sites):
                model.encode_image(x)
        else:
            model.encode_image(x)
        sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="ViT-B-16")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random architecture says it is random
        torch.manual_seed(0)
        model = clipscope.load(args.model, device=args.device)
    attention = model.attention_sites("visual")
    middle = attention[len(attention) // 2]
    arms = {"plain": [],
            "one block": [f"{middle}.{kind}" for kind in ("pattern", "z", "result")],
            "every block": [f"{a}.result" for a in attention]}
    x = torch.randn(args.batch, 3, *model.image_size, device=model.device, dtype=model.dtype)
    print(f"{args.model} (random), {len(attention)} blocks x {model.head_count('visual')} heads, device "
          f"{model.device}, {model.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {args.repeats} interleaved repeats")
    for sites in arms.values():  # warm-up
        seconds(model, x, sites)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, sites in arms.items():
            times[name].append(seconds(model, x, sites))
    wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
    print(f"{'arm':<14}{'img/s':>10}{'throughput ratio':>18}{'CPU-time ratio':>16}  sites")
    for name, sites in arms.items():
        shown = ", ".join(sites[:2]) + (f", ... ({len(sites)} sites)" if len(sites) > 2 else "")
        print(f"{name:<14}{args.batch / wall[name]:>10.2f}{wall['plain'] / wall[name]:>18.3f}"
              f"{cpu['plain'] / cpu[name]:>16.3f}  {shown or 'none (fused attention)'}")


if __name__ == "__main__":
    main()
