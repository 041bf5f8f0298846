"""Hook overhead: images/s of encode_image with and without capturing 4 sites, side by side.

Prints one row per model (tiny ResNet, tiny ViT; the organism when its weights
exist): throughput without hooks, with ``capture`` of 4 sites, and their ratio.
Repeats are interleaved so that machine noise hits both arms alike; the median
of the repeats is reported. Goal: overhead under 10% (ratio >= 0.90).
A third arm, on models with attention heads, captures one head-level site (the middle block's
``attn.result``), which runs that block's attention explicitly (``bench/head_capture.py`` measures
head capture on a ViT-B/16-sized model); the 4-site arm never asks for one, so it runs the fused
attention.

    python bench/hook_overhead.py [--batch 64] [--repeats 7] [--device auto] [--models RN50 ViT-B-32]
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
import warnings

import torch

import clipscope


def four_sites(model: clipscope.ClipModel) -> list[str]:
    """Four sites spread through the image tower (residual blocks / stages)."""
    block = re.compile(r"^visual\.(layer\d+\.\d+|transformer\.resblocks\.\d+|encoder\.layers\.\d+)$")
    names = model.layers().names()
    blocks = [n for n in names if block.match(n)]
    picks = list(dict.fromkeys(blocks[int(i * (len(blocks) - 1) / 3)] for i in range(4)))
    hidden = [n for n in names if n.startswith("visual.") and n.endswith((".mlp.c_fc", ".mlp.fc1"))]
    return (picks + [n for n in hidden if n not in picks])[:4]  # small towers: fill with MLP hidden layers


def images_per_second(model: clipscope.ClipModel, x: torch.Tensor, sites: list[str] | None) -> float:
    def sync():
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        if sites:
            with model.capture(sites):
                model.encode_image(x)
        else:
            model.encode_image(x)
        sync()
    return x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=None,
                        help="default: the tiny configs and the organism; real architectures (RN50, ViT-B-32) "
                             "load random-init")
    args = parser.parse_args()
    names = args.models or ["clipscope-tiny-rn", "clipscope-tiny-vit", "organism"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'model':<22}{'plain img/s':>13}{'4 sites img/s':>15}{'ratio':>8}{'head ratio':>12}  sites")
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a real architecture without pretrained= warns that it is random
            model = clipscope.load(name, device=args.device)
        sites = four_sites(model)
        attention = [a for a in model.attention_sites("visual") if model.head_count("visual")]
        head = [f"{attention[len(attention) // 2]}.result"] if attention else None
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, *model.image_size, device=model.device, dtype=model.dtype)
        for _ in range(2):  # warm-up
            images_per_second(model, x, None)
            images_per_second(model, x, sites)
        plain, hooked, heads = [], [], []
        for _ in range(args.repeats):
            plain.append(images_per_second(model, x, None))
            hooked.append(images_per_second(model, x, sites))
            if head:
                heads.append(images_per_second(model, x, head))
        p, h = statistics.median(plain), statistics.median(hooked)
        head_ratio = f"{statistics.median(heads) / p:>12.3f}" if head else f"{'-':>12}"
        print(f"{name:<22}{p:>13.1f}{h:>15.1f}{h / p:>8.3f}{head_ratio}  {', '.join(sites + (head or []))}")


if __name__ == "__main__":
    main()
