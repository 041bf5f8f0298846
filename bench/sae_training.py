"""SAE training throughput on an organism site (the cost of capturing SAE features: bench/sae_capture.py).

Training throughput, rows (activation vectors) per second, TopK and ReLU + L1 side by side on the same
rows: ``buffered`` trains from the on-disk activation buffer (filled once beforehand, so it measures the
optimizer alone), ``streamed`` runs the model for every epoch (what ``buffer_dir=None`` costs).

    python bench/sae_training.py [--model organism-vit] [--site visual.transformer.resblocks.3.resid_post]
        [--images 400] [--features 512] [--k 16] [--epochs 3] [--device auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import clipscope
from clipscope.organism.scenes import generate
from clipscope.sae import train_sae


def training_rows_per_second(model, images, site: str, args, buffer_dir: str | None) -> dict[str, float]:
    """Rows per second of TopK and ReLU training on ``site`` (from the buffer when ``buffer_dir`` is given)."""
    out = {}
    for name, kwargs in (("topk", dict(k=args.k)), ("relu", dict(activation="relu", l1=5.0))):
        _, log = train_sae(model, images, site, n_features=args.features, epochs=args.epochs, batch_size=1024,
                           buffer_dir=buffer_dir, progress=False, **kwargs)
        out[name] = log.rows_per_second
        out["rows"] = log.rows_per_epoch * args.epochs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-vit")
    parser.add_argument("--site", default="visual.transformer.resblocks.3.resid_post")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    model = clipscope.load(args.model, device=args.device)
    images = [s.image for s in generate(args.images, seed=3)]
    print(f"{args.model} {args.site} on {model.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{args.images} scenes, {args.features} features, {args.epochs} epochs, batch 1024 rows")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        train_sae(model, images, args.site, n_features=8, k=1, buffer_dir=folder, progress=False)  # fills the buffer
        print(f"buffer filled in {time.perf_counter() - started:.1f} s")
        buffered = training_rows_per_second(model, images, args.site, args, folder)
    streamed = training_rows_per_second(model, images, args.site, args, None)
    print(f"{'training':<10}{'rows':>10}{'topk rows/s':>14}{'relu rows/s':>14}")
    for name, figures in (("buffered", buffered), ("streamed", streamed)):
        print(f"{name:<10}{figures['rows']:>10.0f}{figures['topk']:>14.0f}{figures['relu']:>14.0f}")


if __name__ == "__main__":
    main()
