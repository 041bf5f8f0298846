"""Site discovery on fake tensors vs a real dummy forward pass: time per model, side by side.

``model.layers()`` (and the first capture) finds every site by running each tower once on a dummy
batch. clipscope runs it on fake tensors (shapes and dtypes, no arithmetic); the *real* arm runs the
same towers on real zeros, which is what discovery cost before. Both arms must find the same sites
(checked and printed). Times are the median of interleaved repeats; models load with random weights.

    python bench/site_discovery.py [--repeats 3] [--models organism RN50 ViT-B-16]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from clipscope import backends, hooks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["organism", "RN50", "ViT-B-16"])
    args = ap.parse_args()
    print(f"{'model':<12} {'sites':>6} {'real s':>8} {'fake s':>8} {'speed-up':>9}  same sites")
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = backends.load(name, None, torch.device("cpu"), torch.float32)
        times: dict[bool, list[float]] = {True: [], False: []}
        found: dict[bool, dict] = {}
        for _ in range(args.repeats):
            for fake in (False, True):
                start = time.perf_counter()
                found[fake] = hooks.discover_sites(loaded.model.eval(), loaded.towers, fake_tensors=fake)
                times[fake].append(time.perf_counter() - start)
        real, fake = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<12} {len(found[True]):>6} {real:>8.3f} {fake:>8.3f} {real / fake:>8.2f}x  "
              f"{found[True] == found[False]}")


if __name__ == "__main__":
    main()
