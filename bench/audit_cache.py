"""Benchmark the audit's embedding cache: first taxonomy vs a second one on the same data, and the
audit's encoding throughput vs plain ``ClipModel.encode_image``. Prints the figures in one run.

    python bench/audit_cache.py [--model organism] [--n 2000] [--threads 1] [--repeats 3]

1. Wall time of ``run_audit`` with taxonomy T1 on a cold cache (images generated, encoded, cached,
   classified, metrics with 1000 bootstrap resamples), then with taxonomy T2 on the same data
   (cache hit: only the class prompts are encoded). Goal: the second is >= 20x faster. Both runs
   write no report, so the time is the audit itself; the model is loaded outside the timing.
2. Images/s of the audit's encoding stage (fetching the images, decoding, preprocessing, encoding,
   writing the chunks) vs ``encode_image`` on the same, already generated PIL images.

Every figure is the median of ``--repeats`` interleaved repeats (min and max beside it): each repeat
runs every arm once, in a rotated order for the encoding arms, so slow drift of a shared machine
falls on every arm alike. Each repeat gets a freshly loaded model (no class embeddings cached from an
earlier repeat) and fresh cache folders (the cold run is cold every time).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROLES = ["doctor", "teacher", "farmer", "person", "thief"]
T1 = {"name": "roles+thief", "classes": ROLES, "harm": {"crime": ["thief"]}}
T2 = {"name": "roles+thief+child", "classes": ROLES + ["child"], "harm": {"crime": ["thief"]}}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: organism if its weights exist, else clipscope-tiny-vit")
    ap.add_argument("--n", type=int, default=2000, help="number of organism figures (default 2000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per figure (default 3)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.n < 1:
        ap.error(f"--repeats and --n must be at least 1; got {args.repeats} and {args.n}")
    return args


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``fn()`` took (wall clock) and what it returned."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cold_then_warm(model, name: str, data: dict, boot: int, folder: Path) -> dict[str, float]:
    """One repeat of figure 1: T1 on an empty cache in ``folder``, then T2 on the cache T1 filled."""
    from clipscope.audit import run_audit

    def spec(tax):
        return {"name": "bench", "models": [{"name": name}], "data": data, "taxonomies": [tax],
                "bootstrap": {"n": boot, "seed": 0}, "output": str(folder)}
    run = {}
    for arm, tax in (("cold", T1), ("warm", T2)):
        seconds, result = timed(lambda: run_audit(spec(tax), models=[model], cache_dir=folder / "cache", write=False,
                                                  progress=False))
        m = result.provenance["models"][0]
        run[arm] = seconds
        run[f"{arm} encode"] = m["embed_seconds"]
        run[f"{arm} classify"] = sum(m["taxonomy_seconds"].values())
        run[f"{arm} metrics"] = m["metrics_seconds"]
        if arm == "warm":
            assert m["cache"]["images_encoded"] == 0, "the second taxonomy encoded images: the cache missed"
    return run


def encoding_arms(model, audit_data, images: list, folder: Path, rotation: int) -> dict[str, float]:
    """One repeat of figure 2, arms in an order rotated by ``rotation``: seconds per arm."""
    from clipscope.audit.cache import embed_cached
    in_memory = dataclasses.replace(audit_data, fetch=lambda rows: [images[r] for r in rows])
    arms = {
        "audit encode": lambda: embed_cached(model, audit_data, folder / "cache-files", progress=False),
        "audit encode (in memory)": lambda: embed_cached(model, in_memory, folder / "cache-memory", progress=False),
        "plain encode_image": lambda: model.encode_image(images, batch_size=64, progress=False),
    }
    names = list(arms)
    order = names[rotation % len(names):] + names[:rotation % len(names)]
    return {arm: timed(arms[arm])[0] for arm in order}


def spread(values: list[float]) -> str:
    """``median [min, max]`` of seconds."""
    return f"{statistics.median(values):.3f} s [{min(values):.3f}, {max(values):.3f}]"


def report(runs: list[dict[str, float]], args, name: str) -> None:
    """Print every figure as the median over the repeats with its range."""
    col = {k: [r[k] for r in runs] for k in runs[0]}
    med = {k: statistics.median(v) for k, v in col.items()}
    n = args.n
    print(f"model {name}, {n} organism figures, {args.threads} thread(s), bootstrap n={args.boot}, "
          f"median [min, max] of {len(runs)} interleaved repeat(s)")
    print(f"first taxonomy (cold cache): {spread(col['cold'])}  [encode {med['cold encode']:.2f} s, "
          f"classify {med['cold classify']:.3f} s, metrics {med['cold metrics']:.2f} s]")
    print(f"second taxonomy (cache hit): {spread(col['warm'])}  [load cache {med['warm encode']:.3f} s, "
          f"classify {med['warm classify']:.3f} s, metrics {med['warm metrics']:.2f} s]")
    ratios = [c / w for c, w in zip(col["cold"], col["warm"])]
    print(f"speed-up of the second taxonomy: {statistics.median(ratios):.1f}x median of paired repeats "
          f"[{min(ratios):.1f}, {max(ratios):.1f}] (goal >= 20x)")
    zs = [(r["cold encode"] + r["cold classify"]) / (r["warm encode"] + r["warm classify"]) for r in runs]
    print(f"zero-shot stage only (embed + classify, no metrics): {statistics.median(zs):.0f}x median "
          f"[{min(zs):.0f}, {max(zs):.0f}]")
    for arm, label in (("audit encode", "audit encoding (generate/decode + preprocess + encode + write chunks)"),
                       ("audit encode (in memory)", "audit encoding of the same pre-generated PIL images"),
                       ("plain encode_image", "plain encode_image on pre-generated PIL images")):
        rates = [n / s for s in col[arm]]
        print(f"{label:<70} {statistics.median(rates):.0f} images/s [{min(rates):.0f}, {max(rates):.0f}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    import fairlearn.metrics  # noqa: F401  (imported up front: library import time is not audit time)
    import scipy.stats  # noqa: F401

    import clipscope
    from clipscope.audit import load_data
    from clipscope.audit.spec import DataSpec

    name = args.model
    if name is None:
        weights = Path(clipscope.__file__).parent / "organism" / "organism.safetensors"
        name = "organism" if weights.is_file() else "clipscope-tiny-vit"
    data = {"kind": "organism_figures", "n": args.n, "seed": 0, "group_columns": ["group", "age"]}
    audit_data = load_data(DataSpec(**data))
    images = audit_data.fetch(list(range(len(audit_data))))  # generated once, outside every timing
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            model = clipscope.load(name, device="cpu")  # fresh per repeat: no class embeddings cached yet
            folder = Path(tmp) / f"repeat-{r}"
            run = cold_then_warm(model, name, data, args.boot, folder)
            run.update(encoding_arms(model, audit_data, images, folder, rotation=r))
            runs.append(run)
    report(runs, args, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
