"""Dataset-example mining throughput: images/s of ``dataset_examples`` over 64 units of one site
vs plain ``encode_image`` over the same images and batch size, side by side.

Two sources per model: a list of PIL images (end to end: decoding/preprocessing included in
both arms) and a preprocessed ``(N, 3, H, W)`` tensor (model compute only, so the pure cost of
capture + top/bottom-k merging shows). Repeats are interleaved; medians are reported.
Goal: mining >= 85% of plain throughput (ratio >= 0.85).

    python bench/mining_throughput.py [--n 256] [--batch 64] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from PIL import Image

import clipscope
from clipscope.neurons import dataset_examples


def pil_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["organism", "clipscope-tiny-rn"],
                        help="ResNet CLIPs (the last stage is mined); RN50 etc. load random-init")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(name, "visual.layer4" if name == "organism" else None) for name in args.models]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.n} images, batch {args.batch}, "
          f"64 units, median of {args.repeats} interleaved repeats")
    print(f"{'model':<20}{'source':<8}{'site':<22}{'plain img/s':>12}{'mining img/s':>14}{'ratio':>8}")
    for name, site in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a real architecture without pretrained= warns that it is random
            model = clipscope.load(name, device=args.device)
        if site is None:  # the last stage of the tiny ResNet
            site = [n for n in model.layers().names() if n.startswith("visual.layer") and n.count(".") == 1][-1]
        units = list(range(min(64, model.site(site).n_units)))
        pils = pil_images(args.n, max(model.image_size) + 16)
        tensor = torch.stack([model.preprocess(im) for im in pils])
        for label, source in (("pil", pils), ("tensor", tensor)):
            def plain(model=model, source=source):
                with torch.no_grad():
                    if isinstance(source, torch.Tensor):
                        for i in range(0, len(source), args.batch):
                            model.encode_image(source[i:i + args.batch].to(model.device, model.dtype))
                    else:
                        model.encode_image(source, batch_size=args.batch, progress=False)

            def mine(model=model, source=source, site=site, units=units):
                dataset_examples(model, source, site, k=16, units=units, batch_size=args.batch, progress=False)

            plain(), mine()  # warm-up
            p, m = [], []
            for _ in range(args.repeats):
                p.append(args.n / timed(plain))
                m.append(args.n / timed(mine))
            pm, mm = statistics.median(p), statistics.median(m)
            print(f"{name:<20}{label:<8}{site:<22}{pm:>12.1f}{mm:>14.1f}{mm / pm:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
