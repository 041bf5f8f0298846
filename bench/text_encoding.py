"""Text encoding that stops at the longest prompt: time and FLOPs, full context vs truncated, side by side.

Encodes the 80 OpenAI ImageNet templates x 10 classes (800 prompts) the way class embeddings are
built (batches of 256). The *full* arm runs open_clip's ``encode_text`` on the whole context;
the *truncated* arm is what ``ClipModel.encode_text`` does: each batch cut after its last
end-of-text token (the text tower is causal and pools there). FLOPs are counted by
``torch.utils.flop_counter``; times are the median of interleaved repeats. The largest
difference between the two arms' unit-norm embeddings is printed too (expected ~1e-6).

    python bench/text_encoding.py [--repeats 5] [--device auto] [--models organism ViT-B-32]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import clipscope
from clipscope.prompts import OPENAI_IMAGENET_TEMPLATES, fill

CLASSES = ("goldfish", "tabby cat", "golden retriever", "fire truck", "espresso", "mountain bike",
           "lighthouse", "teddy bear", "volcano", "electric guitar")
BATCH = 256


def run(encode, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encode(tokens[i:i + BATCH]).float() for i in range(0, len(tokens), BATCH)])


def flops(encode, tokens: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run(encode, tokens)
    return counter.get_total_flops()


def seconds(encode, tokens: torch.Tensor) -> float:
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(encode, tokens)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["organism", "ViT-B-32"])
    args = parser.parse_args()
    texts = [p for c in CLASSES for p in fill(OPENAI_IMAGENET_TEMPLATES, c)]
    print(f"{len(texts)} prompts ({len(OPENAI_IMAGENET_TEMPLATES)} templates x {len(CLASSES)} classes), "
          f"batches of {BATCH}")
    print(f"{'model':<14}{'context':>8}{'full s':>9}{'trunc s':>9}{'time x':>8}{'full GFLOP':>12}"
          f"{'trunc GFLOP':>13}{'FLOP x':>8}{'max |diff|':>12}")
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights for real architectures: the cost is the same
            model = clipscope.load(name, device=args.device, precision="fp32")
        needed = model.architecture.text_tokens_needed
        if needed is None:
            print(f"{name:<14} (its backend cannot cut the text context exactly)")
            continue
        full = model.model.encode_text

        def truncated(ids, needed=needed, encode=model.model.encode_text):
            return encode(ids[:, :needed(ids)])
        tokens = model.tokenize(texts)
        diff = (F.normalize(run(full, tokens), dim=-1) - F.normalize(run(truncated, tokens), dim=-1)).abs().max()
        times = {"full": [], "truncated": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both arms alike
            times["full"].append(seconds(full, tokens))
            times["truncated"].append(seconds(truncated, tokens))
        t_full, t_trunc = (statistics.median(times[k]) for k in ("full", "truncated"))
        f_full, f_trunc = flops(full, tokens), flops(truncated, tokens)
        print(f"{name:<14}{tokens.shape[1]:>8}{t_full:>9.3f}{t_trunc:>9.3f}{t_full / t_trunc:>8.2f}"
              f"{f_full / 1e9:>12.2f}{f_trunc / 1e9:>13.2f}{f_full / f_trunc:>8.2f}{float(diff):>12.2e}")


if __name__ == "__main__":
    main()
