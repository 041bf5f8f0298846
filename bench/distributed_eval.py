"""Benchmark the audit embedding cache and the typographic attack evaluation on 1 and 2 processes (gloo on
the CPU, 1 thread each): throughput as a ratio measured in one run, and the merge (the ranks exchanging
their results) as a fraction of the job.

    python bench/distributed_eval.py [--model organism] [--n 512] [--chunk 32] [--attack-n 96] [--repeats 3]

Audit arm: each repeat embeds the same ``--n`` organism figures with ``clipscope.audit.cache.embed_cached``
on an empty cache. Attack arm: each repeat runs ``clipscope.typographic.evaluate`` (an untargeted attack,
no cache) on ``--attack-n`` organism object scenes. Each arm runs once in this process (world of 1) and
once on two ranks forked from it (each with ``torch.set_num_threads(1)``, joined with gloo on 127.0.0.1,
as ``torchrun --nproc-per-node 2`` would), in alternating order. Times are wall clock of the call (rank
0's for two ranks; the ranks start together after a barrier); the merge is the time spent in
``clipscope.distributed.gather_objects`` and ``all_reduce_sum`` (rank 0, which also waits there for the
slower rank: an upper bound on the merge itself). The results of 1 and 2 processes are checked equal
(embeddings bitwise, attack tables exactly). Figures are medians of ``--repeats`` (min and max beside them). On a machine shared with other
jobs the ratio is bounded by the free cores: it says what two processes gained here, not what they gain
alone on two cores.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--n", type=int, default=512, help="organism figures to embed (default 512)")
    ap.add_argument("--chunk", type=int, default=32, help="cache chunk size (default 32)")
    ap.add_argument("--batch", type=int, default=16, help="encoding batch size (default 16)")
    ap.add_argument("--attack-n", type=int, default=96, help="object scenes attacked (default 96)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if min(args.n, args.chunk, args.batch, args.repeats, args.attack_n) < 1:
        ap.error("--n, --chunk, --batch, --attack-n and --repeats must be at least 1")
    return args


#: Seconds spent in the merge collectives of the current ``embed_cached`` call (see :func:`clock_merges`).
MERGE = [0.0]


def clock_merges() -> None:
    """Time ``gather_objects`` and ``all_reduce_sum`` as ``embed_cached`` calls them, into :data:`MERGE`."""
    import clipscope.audit.cache as cache_module
    evaluate_module = importlib.import_module("clipscope.typographic.evaluate")  # the package's `evaluate` is the function

    def clocked(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                MERGE[0] += time.perf_counter() - t0
        return wrapper
    for name in ("gather_objects", "all_reduce_sum"):
        setattr(cache_module, name, clocked(getattr(cache_module, name)))
    evaluate_module.gather_objects = clocked(evaluate_module.gather_objects)


def timed_embed(model, data, cache: Path, args) -> tuple[float, float, torch.Tensor]:
    """``(seconds for embed_cached, seconds of it spent merging, embeddings)`` in this process."""
    from clipscope.audit.cache import embed_cached
    MERGE[0] = 0.0
    t0 = time.perf_counter()
    got = embed_cached(model, data, cache, chunk_size=args.chunk, batch_size=args.batch, progress=False)
    return time.perf_counter() - t0, MERGE[0], None if got is None else got.embeddings  # None: a rank other than 0


def timed_attack(model, data, cache: Path, args) -> tuple[float, float, object]:
    """``(seconds for evaluate, seconds of it spent merging, per-image frame)`` in this process; ``data`` is
    ``(images, labels)``; ``cache`` is unused (the evaluation runs without one)."""
    from clipscope.organism import SHAPES
    from clipscope.typographic import Attack, TextStyle, evaluate
    images, labels = data
    MERGE[0] = 0.0
    t0 = time.perf_counter()
    got = evaluate(model, images, labels, list(SHAPES), Attack.untargeted(TextStyle(size=0.25)),
                   batch_size=args.batch, progress=False)
    return time.perf_counter() - t0, MERGE[0], got.frame


ARMS = {"audit": timed_embed, "attack": timed_attack}


def rank_main(rank: int, port: int, arm: str, model, data, cache: Path, args, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from clipscope.distributed import barrier, context, shutdown
    ctx = context()
    barrier(ctx)
    result = ARMS[arm](model, data, cache, args)
    shutdown(ctx)
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def two_ranks(arm: str, model, data, cache: Path, args, out: Path) -> tuple[float, float, object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(port, arm, model, data, cache, args, out), nprocs=2, start_method="fork")
    return pickle.loads((out / "rank0.pkl").read_bytes())


def same(arm: str, a, b) -> bool:
    """Whether the results of one and two processes are equal (bitwise / exactly)."""
    if arm == "audit":
        return torch.equal(a, b)
    return a.equals(b)


def run_arm(arm: str, model, data, args, tmp: str) -> tuple[list[float], list[float], list[float]]:
    """``(seconds on 1 process, seconds on 2, merge fraction on 2)`` per repeat, the arms alternating."""
    one, two, merge = [], [], []
    for r in range(args.repeats):
        for world in (("one", "two") if r % 2 == 0 else ("two", "one")):
            folder = Path(tmp) / f"{arm}-{world}{r}"
            folder.mkdir()
            if world == "one":
                seconds, _, ref = ARMS[arm](model, data, folder / "cache", args)
                one.append(seconds)
            else:
                seconds, merged, got = two_ranks(arm, model, data, folder / "cache", args, folder)
                two.append(seconds)
                merge.append(merged / seconds)
        assert same(arm, ref, got), f"{arm}: two ranks gave another result than one process"
    return one, two, merge


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import clipscope
    from clipscope.audit.adapters import load_data
    from clipscope.audit.spec import DataSpec
    from clipscope.organism import SHAPES
    from clipscope.organism.scenes import object_scene
    model = clipscope.load(args.model)
    clock_merges()
    scenes = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=8_000_000 + i) for i in range(args.attack_n)]
    data = {"audit": load_data(DataSpec(kind="organism_figures", n=args.n, seed=0, group_columns=["group"])),
            "attack": ([s.image for s in scenes], [s.meta["shape"] for s in scenes])}

    def show(xs, unit=""):
        return f"{statistics.median(xs):.3f}{unit} (min {min(xs):.3f}, max {max(xs):.3f})"
    print(f"model {args.model}, batches of {args.batch}, 1 thread per process")
    with tempfile.TemporaryDirectory() as tmp:
        for arm, n, what in (("audit", args.n, f"figures embedded, chunks of {args.chunk}"),
                             ("attack", args.attack_n, "scenes attacked (evaluate, untargeted)")):
            one, two, merge = run_arm(arm, model, data[arm], args, tmp)
            print(f"{arm}: {n} {what}")
            print(f"  1 process  : {show([n / t for t in one], ' img/s')}")
            print(f"  2 processes: {show([n / t for t in two], ' img/s')}")
            print(f"  ratio 2/1  : {show([a / b for a, b in zip(one, two)], 'x')}  (median of per-repeat ratios)")
            print(f"  merge      : {show([100 * m for m in merge], '%')} of the 2-process job (rank 0, waiting "
                  "included)")
            print("  results    : equal on 1 and 2 processes")


if __name__ == "__main__":
    main()
