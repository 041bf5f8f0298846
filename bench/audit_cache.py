"""Benchmark the audit's embedding cache: first taxonomy vs a second one on the same data, and the
audit's encoding throughput vs plain ``ClipModel.encode_image``. Prints the figures in one run.

    python bench/audit_cache.py [--model organism] [--n 2000] [--threads 1]

1. Wall time of ``run_audit`` with taxonomy T1 on a cold cache (images generated, encoded, cached,
   classified, metrics with 1000 bootstrap resamples), then with taxonomy T2 on the same data
   (cache hit: only the class prompts are encoded). Goal: the second is >= 20x faster. Both runs
   write no report, so the time is the audit itself; the model is loaded once, outside the timing.
2. Images/s of the audit's encoding stage (fetching the images, decoding, preprocessing, encoding,
   writing the chunks) vs ``encode_image`` on the same, already generated PIL images.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: organism if its weights exist, else clipscope-tiny-vit")
    ap.add_argument("--n", type=int, default=2000, help="number of organism figures (default 2000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import fairlearn.metrics  # noqa: F401  (imported up front: library import time is not audit time)
    import scipy.stats  # noqa: F401

    import clipscope
    from clipscope.audit import load_data, run_audit
    from clipscope.audit.spec import DataSpec

    name = args.model
    if name is None:
        weights = Path(clipscope.__file__).parent / "organism" / "organism.safetensors"
        name = "organism" if weights.is_file() else "clipscope-tiny-vit"
    model = clipscope.load(name, device="cpu")
    data = {"kind": "organism_figures", "n": args.n, "seed": 0, "group_columns": ["group", "age"]}
    roles = ["doctor", "teacher", "farmer", "person", "thief"]
    t1 = {"name": "roles+thief", "classes": roles, "harm": {"crime": ["thief"]}}
    t2 = {"name": "roles+thief+child", "classes": roles + ["child"], "harm": {"crime": ["thief"]}}

    with tempfile.TemporaryDirectory() as tmp:
        def spec(tax):
            return {"name": "bench", "models": [{"name": name}], "data": data, "taxonomies": [tax],
                    "bootstrap": {"n": args.boot, "seed": 0}, "output": tmp}
        t0 = time.perf_counter()
        first = run_audit(spec(t1), models=[model], cache_dir=Path(tmp) / "cache", write=False, progress=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = run_audit(spec(t2), models=[model], cache_dir=Path(tmp) / "cache", write=False, progress=False)
        t_second = time.perf_counter() - t0
        m1, m2 = first.provenance["models"][0], second.provenance["models"][0]
        assert m2["cache"]["images_encoded"] == 0

        # plain encode_image on pre-generated images (same images, generation excluded)
        audit_data = load_data(DataSpec(**data))
        images = audit_data.fetch(list(range(len(audit_data))))
        t0 = time.perf_counter()
        model.encode_image(images, batch_size=64, progress=False)
        t_plain = time.perf_counter() - t0
        # the audit's encoding stage on a fresh cache, for throughput
        from clipscope.audit.cache import embed_cached
        t0 = time.perf_counter()
        embed_cached(model, audit_data, Path(tmp) / "cache2", progress=False)
        t_audit_encode = time.perf_counter() - t0
        # ... and with the images already in memory (same work as plain encode_image, plus chunk writes)
        import dataclasses
        in_memory = dataclasses.replace(audit_data, fetch=lambda rows: [images[r] for r in rows])
        t0 = time.perf_counter()
        embed_cached(model, in_memory, Path(tmp) / "cache3", progress=False)
        t_audit_mem = time.perf_counter() - t0

    n = args.n
    print(f"model {name}, {n} organism figures, {args.threads} thread(s), bootstrap n={args.boot}")
    print(f"first taxonomy (cold cache): {t_first:.2f} s  [encode {m1['embed_seconds']:.2f} s, "
          f"classify {sum(m1['taxonomy_seconds'].values()):.3f} s, metrics {m1['metrics_seconds']:.2f} s]")
    print(f"second taxonomy (cache hit): {t_second:.2f} s  [load cache {m2['embed_seconds']:.3f} s, "
          f"classify {sum(m2['taxonomy_seconds'].values()):.3f} s, metrics {m2['metrics_seconds']:.2f} s]")
    print(f"speed-up of the second taxonomy: {t_first / t_second:.1f}x (goal >= 20x)")
    zs1 = m1["embed_seconds"] + sum(m1["taxonomy_seconds"].values())
    zs2 = m2["embed_seconds"] + sum(m2["taxonomy_seconds"].values())
    print(f"zero-shot stage only (embed + classify, no metrics): {zs1:.2f} s vs {zs2:.3f} s = {zs1 / zs2:.0f}x")
    print(f"audit encoding (generate/decode + preprocess + encode + write chunks): {n / t_audit_encode:.0f} images/s")
    print(f"audit encoding of the same pre-generated PIL images:               {n / t_audit_mem:.0f} images/s")
    print(f"plain encode_image on pre-generated PIL images:                    {n / t_plain:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
