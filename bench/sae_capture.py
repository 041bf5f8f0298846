"""SAE feature capture cost: encode_image while capturing an SAE's feature site vs a plain neuron capture of its
base site, side by side in one run.

Arms, per model, run in one process (repeats interleaved so that machine noise hits all alike; the median is
reported):

- ``plain``: ``encode_image``, no hooks;
- ``neurons``: capturing the base site (every neuron of it);
- ``features``: capturing the feature site of a TopK SAE attached to that base site (``model.attach``: the
  SAE encodes the base activation at every position/token inside the forward pass).

Models: the ResNet organism (SAE on ``visual.layer4``, 512 channels at 2x2 positions) and open_clip's ViT-B-16
with random weights (no download; SAE on the residual stream after the middle block, 768 features at 197
tokens). The SAE has ``--expansion`` x d_in features, ``--k`` active, random weights (encoding costs the same
trained or not). Prints images/s and the ``features`` / ``neurons`` time ratio, wall clock and process CPU time
(on a shared CPU the CPU-time ratio is the steadier one).

    python bench/sae_capture.py [--batch 8] [--repeats 5] [--expansion 16] [--k 32] [--device auto]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import clipscope
from clipscope.sae import SparseAutoencoder


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


def compare(model: clipscope.ClipModel, base: str, args: argparse.Namespace) -> None:
    """Attach a random TopK SAE to ``base``, time the three arms and print one row per arm."""
    d_in = model.site(base).n_units
    sae = SparseAutoencoder(base, d_in, args.expansion * d_in, k=args.k)
    feature_site = model.attach(sae)
    arms = {"plain": [], "neurons": [base], "features": [feature_site]}
    x = torch.randn(args.batch, 3, *model.image_size, device=model.device, dtype=model.dtype)
    for sites in arms.values():  # warm-up
        seconds(model, x, sites)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, sites in arms.items():
            times[name].append(seconds(model, x, sites))
    model.detach(feature_site)
    wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
    print(f"\n{model.name}: base {base} {model.site(base).shape}, SAE {sae.n_features} features (k={args.k})")
    print(f"{'arm':<10}{'img/s':>10}{'time / neurons (wall)':>24}{'(CPU)':>8}")
    for name in arms:
        print(f"{name:<10}{args.batch / wall[name]:>10.2f}{wall[name] / wall['neurons']:>24.3f}"
              f"{cpu[name] / cpu['neurons']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"median of {args.repeats} interleaved repeats")
    organism = clipscope.load("organism", device=args.device)
    compare(organism, "visual.layer4", args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random architecture says it is random
        torch.manual_seed(0)
        vit = clipscope.load("ViT-B-16", device=args.device)
    blocks = vit.blocks("visual")
    compare(vit, blocks[len(blocks) // 2], args)


if __name__ == "__main__":
    main()
