"""Typographic attack throughput: generation + evaluation vs evaluation of the same images pre-rendered.

For each model, one run measures, side by side on the same images:

- ``eval``: evaluating images whose attacks were rendered beforehand (clean + attacked encodes);
- ``attack+eval``: :func:`clipscope.typographic.evaluate`, which renders while it evaluates;
- ``render``: rendering alone.

Each arm is warmed up, then the arms run interleaved ``--repeats`` times and
the medians are reported, so that machine noise hits them alike.
Rendering cost = (attack+eval - eval) / eval. Goal: under 25%.

    python bench/typographic_throughput.py [--n 128] [--repeats 5] [--device auto]
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
from clipscope.typographic import Attack, TextStyle, apply, evaluate


def photos(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def measure(model, images: list[Image.Image], classes: list[str], attack: Attack, repeats: int
            ) -> tuple[float, float, float]:
    """Median seconds of (rendering alone, evaluating pre-rendered images, rendering + evaluating)."""
    n = len(images)
    labels = [classes[i % len(classes)] for i in range(n)]
    head = model.classifier(classes)

    def render() -> list:
        return [apply(attack, im, lab, classes, i) for i, (im, lab) in enumerate(zip(images, labels))]

    rendered = render()

    def eval_prerendered() -> None:
        for i in range(0, n, 32):
            chunk = rendered[i:i + 32]
            for batch in ([r.clean for r in chunk], [r.attacked for r in chunk]):  # what evaluate scores
                with torch.no_grad():
                    head.probs(model.encode_image(torch.stack([model.preprocess(im) for im in batch]))).cpu()

    def attack_and_eval() -> None:
        evaluate(model, images, labels, classes, attack, batch_size=32, progress=False)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in (eval_prerendered, attack_and_eval):  # warm-up: kernels for every batch shape
        fn()
    times = {"render": [], "eval": [], "full": []}
    for _ in range(repeats):
        times["eval"].append(seconds(eval_prerendered))
        times["full"].append(seconds(attack_and_eval))
        times["render"].append(seconds(render))
    return tuple(statistics.median(times[k]) for k in ("render", "eval", "full"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cases = [("organism", None, 64), ("clipscope-tiny-rn", None, 64), ("RN50", None, 224)]
    classes = ["apple", "ipod", "dog", "pizza"]
    attack = Attack.untargeted(TextStyle(size=0.2))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.n} images per model")
    print(f"{'model':<20}{'img px':>7}{'eval s':>9}{'attack+eval s':>15}{'render s':>10}{'render cost':>13}")
    for name, pretrained, size in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = clipscope.load(name, pretrained=pretrained, device=args.device)
        except clipscope.WeightsNotAvailableError:
            continue
        render_s, eval_s, full_s = measure(model, photos(args.n, size), classes, attack, args.repeats)
        print(f"{name:<20}{size:>7}{eval_s:>9.2f}{full_s:>15.2f}{render_s:>10.2f}{(full_s - eval_s) / eval_s:>12.1%}")


if __name__ == "__main__":
    main()
