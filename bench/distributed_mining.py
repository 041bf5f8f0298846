"""Distributed dataset-example mining: images/s with 1 and with 2 processes (1 thread each, gloo on
CPU) side by side in one run, their ratio (goal: >= 1.8 at 224 px on a ResNet-50-sized model), and
the merge's share of the 2-process job.

Both arms start their processes the same way (torch.multiprocessing, the environment torchrun
sets) and load the model before the clock starts; the clock covers ``dataset_examples`` from call to
return on every rank (the slowest rank's time is the job's). The 1-process arm mines everything with
``distributed=False``; the 2-process arm mines a shard per rank and merges. The merge is the part
after the shards are mined: the gather of the per-rank top/bottom-k (timed on the rank that arrives
last, which does not wait for the other) plus the merge and the cache write (timed on rank 0).
Also printed: each rank's CPU seconds and their ratio (1 process's over the busiest rank's: the
wall-clock ratio when every process has a core of its own), and the load average before and after
(the machine is shared: a 2-process arm needs 2 idle cores to reach 2x on the wall clock).

    python bench/distributed_mining.py [--model RN50] [--site visual.layer4] [--n 64] [--batch 8] [--k 16]

``RN50`` without cached weights is randomly initialized (a warning says so): the cost is the same.
On a GPU machine ``--device cuda`` runs one process on one GPU with all data there, as the reference.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image


def images(n: int, size: int = 256, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    """One rank: load the model, wait for the others, mine; write ``(wall s, CPU s, gather s, after-gather s)``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import warnings

    import clipscope
    from clipscope import distributed
    from clipscope.neurons import dataset_examples, examples
    warnings.simplefilter("ignore")
    ctx = distributed.context(world > 1, device=opts["device"])
    model = clipscope.load(opts["model"], device=opts["device"])
    data = images(opts["n"])
    marks: dict[str, float] = {}
    gather = examples.gather_objects

    def timed_gather(obj, ctx, dst=None):
        if isinstance(obj, dict):             # the gather of the per-rank states (not the start-up check)
            marks["gather"] = time.perf_counter()
            result = gather(obj, ctx, dst)
            marks["gathered"] = time.perf_counter()
            return result
        return gather(obj, ctx, dst)

    examples.gather_objects = timed_gather
    distributed.barrier(ctx)
    wall, cpu = time.perf_counter(), time.process_time()
    dataset_examples(model, data, opts["site"], k=opts["k"], batch_size=opts["batch"], progress=False,
                     cache_dir=os.path.join(out, "cache"), distributed=world > 1)
    end = time.perf_counter()
    row = (end - wall, time.process_time() - cpu, marks.get("gathered", end) - marks.get("gather", end),
           end - marks.get("gathered", end))
    torch.save(row, os.path.join(out, f"rank{rank}.pt"))
    distributed.shutdown(ctx)


def arm(world: int, opts: dict) -> list[tuple[float, float, float, float]]:
    """Run one arm in fresh processes; returns each rank's row."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(world, free_port(), opts, out), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--site", default="visual.layer4")
    parser.add_argument("--n", type=int, default=64, help="images (256 px, resized to the model's 224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    opts = {"model": args.model, "site": args.site, "n": args.n, "batch": args.batch, "k": args.k,
            "device": args.device}
    print(f"{args.model} {args.site}, {args.n} images, batches of {args.batch}, k={args.k}, 1 thread per process; "
          f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    ratios, cpu_ratios, fractions = [], [], []
    for repeat in range(args.repeats):
        one = arm(1, opts)
        two = arm(2, opts)
        t1 = one[0][0]
        t2 = max(row[0] for row in two)
        merge = min(row[2] for row in two) + two[0][3]
        ratios.append(t1 / t2)
        cpu_ratios.append(one[0][1] / max(row[1] for row in two))
        fractions.append(merge / t2)
        print(f"repeat {repeat}: 1 process {args.n / t1:.2f} img/s ({t1:.1f} s, CPU {one[0][1]:.1f} s); "
              f"2 processes {args.n / t2:.2f} img/s ({t2:.1f} s; ranks {[round(r[0], 1) for r in two]} s, "
              f"CPU {[round(r[1], 1) for r in two]} s); merge {merge * 1000:.0f} ms = {100 * merge / t2:.2f}% "
              f"of the job")
    print(f"ratio 2 processes / 1 process: {statistics.median(ratios):.2f}x wall clock (goal >= 1.8); "
          f"{statistics.median(cpu_ratios):.2f}x in CPU seconds of the busiest rank (the wall-clock ratio with a "
          f"free core per process); merge share {100 * statistics.median(fractions):.2f}%; "
          f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
