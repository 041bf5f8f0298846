"""Image loading policy cost: ``clipscope.data.iter_images`` over a folder vs a bare Pillow loop, side by side.

The bare arm is what a user would write without a policy: list the folder, ``Image.open``, ``convert("RGB")``.
The clipscope arm adds what the policy promises (paths checked to stay inside the folder, symlinks
resolved, EXIF orientation applied, bit depth scaled, decompression-bomb limit, any decoder failure
turned into a counted skip). Both decode the same generated JPEG and PNG photos-like images at a
typical data-set size (default 256 images of 500x375 px, a quarter of them with an EXIF orientation
tag). Repeats are interleaved; medians are reported. Goal: the policy costs under 10% (ratio >= 0.90).

    python bench/image_loading.py [--n 256] [--size 500x375] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipscope.data import IMAGE_SUFFIXES, iter_images


def make_folder(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Write ``n`` smooth random images (JPEG and PNG; every fourth JPEG carries EXIF orientation 6)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        if i % 2:
            im.save(root / f"img_{i:04d}.png")
        else:
            exif = Image.Exif()
            if i % 4 == 0:
                exif[0x0112] = 6
            im.save(root / f"img_{i:04d}.jpg", quality=90, exif=exif)


def bare(root: Path) -> int:
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        with Image.open(path) as im:
            im.convert("RGB")
        count += 1
    return count


def policy(root: Path) -> int:
    return sum(1 for _key, image in iter_images(root) if isinstance(image, Image.Image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images in the folder (default 256)")
    parser.add_argument("--size", default="500x375", help="image size WxH in pixels (default 500x375)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per arm (default 5)")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.n, (w, h))
        assert bare(root) == policy(root) == args.n  # warm-up, and both arms see every image
        times: dict[str, list[float]] = {"bare": [], "clipscope": []}
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("clipscope", policy)):
                start = time.perf_counter()
                fn(root)
                times[name].append(time.perf_counter() - start)
    rate = {name: args.n / statistics.median(t) for name, t in times.items()}
    print(f"image loading, {args.n} images of {w}x{h} px, median of {args.repeats} interleaved repeats")
    print(f"  bare Pillow loop : {rate['bare']:8.1f} images/s")
    print(f"  clipscope policy : {rate['clipscope']:8.1f} images/s")
    print(f"  ratio            : {rate['clipscope'] / rate['bare']:.3f}  (goal >= 0.90)")


if __name__ == "__main__":
    main()
