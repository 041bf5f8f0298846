"""clipscope.distributed: who a process is, which items it reads, and the collectives that bring the
results back. Known answers: the union of the ranks' shards is the source, item for item, with the
keys one process gives; tables are cut where ``datasets``' ``split_dataset_by_node`` cuts them; two
gloo processes gather and sum what each holds.

``spawn_ranks`` (used by the mining tests too) starts ranks with torch.multiprocessing, as torchrun
would: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in the environment, one thread each.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from datasets.distributed import split_dataset_by_node

from clipscope.data import iter_images
from clipscope.distributed import (Context, all_reduce_sum, barrier, context, gather_objects, launched, main_bar,
                                   shard_range, split_source)
from clipscope.progress import HiddenBar
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
                      "SLURM_PROCID", "SLURM_LOCALID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    """What a launcher gives each rank: its environment and one thread; then ``fn(rank, *args)``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")      # CPU processes, gloo
    torch.set_num_threads(1)
    fn(rank, *args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def spawn_ranks(fn, world: int, *args, timeout: float = 900) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes (a gloo job on CPU); raise what a rank raised
    (``ProcessRaisedException``) or how it died (``ProcessExitedException``); kill them all after ``timeout`` s."""
    procs = mp.start_processes(rank_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            raise TimeoutError(f"ranks still running after {timeout} s")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# -- splitting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_ranges_tile_the_items_in_rank_order_as_datasets_cuts_tables(world):
    for n in range(0, 14):
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
        if n >= world:            # datasets refuses to cut empty shards
            table = datasets.Dataset.from_dict({"i": list(range(n))})
            assert [split_dataset_by_node(table, rank=r, world_size=world)["i"] for r in range(world)] == \
                [list(r) for r in ranges]


def test_shard_ranges_in_blocks_start_on_block_boundaries():
    # 23 items in blocks of 4: 6 blocks (the last of 3 items), 2 ranks of 3 blocks
    assert [shard_range(23, r, 2, block=4) for r in range(2)] == [range(0, 12), range(12, 23)]
    # 5 blocks over 3 ranks: 2, 2, 1
    assert [shard_range(20, r, 3, block=4) for r in range(3)] == [range(0, 8), range(8, 16), range(16, 20)]
    assert shard_range(3, 1, 2, block=4) == range(3, 3)   # fewer blocks than ranks: an empty shard
    with pytest.raises(InvalidArgumentError, match="rank=2"):
        shard_range(10, 2, 2)
    with pytest.raises(InvalidArgumentError, match="block=0"):
        shard_range(10, 0, 2, block=0)


def _sources(tmp_path: Path) -> dict:
    images = make_images(7, size=16)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}.png")
    table = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    return {"folder": str(folder), "list": images, "tensor": torch.rand(7, 3, 16, 16), "table": table,
            "stream": table.to_iterable_dataset(num_shards=2), "generator": lambda: iter(images)}


def _pixels(item) -> bytes:
    return item.numpy().tobytes() if isinstance(item, torch.Tensor) else item.tobytes()


@pytest.mark.parametrize("kind", ["folder", "list", "tensor", "table", "stream", "generator"])
@pytest.mark.parametrize("world", [2, 3])
def test_the_shards_of_all_ranks_are_the_source_with_global_positions_and_its_keys(tmp_path, kind, world):
    source = _sources(tmp_path)[kind]
    fresh = source if kind == "generator" else lambda: source     # a generator is read once: a new one each time
    expected = [(pos, key, _pixels(item)) for pos, (key, item) in enumerate(iter_images(fresh()))]
    got = []
    for rank in range(world):
        shard = split_source(fresh(), Context(rank, world))
        items = [(pos, key, _pixels(item)) for pos, key, item in shard.items()]
        if shard.positions is not None:
            assert [pos for pos, _, _ in items] == list(shard.positions)
        got += items
        # resuming from a global position yields the rest of the shard
        later = [pos for pos, _, _ in split_source(fresh(), Context(rank, world)).items(items[1][0])]
        assert later == [pos for pos, _, _ in items[1:]]
    assert sorted(got, key=lambda t: t[0]) == expected
    assert len(expected) == 7


def test_streams_go_one_item_in_world_size_and_sized_sources_by_ranges(tmp_path):
    sources = _sources(tmp_path)
    assert split_source(sources["stream"], Context(1, 3)).positions is None
    assert [p for p, _, _ in split_source(sources["stream"], Context(1, 3)).items()] == [1, 4]
    assert split_source(sources["table"], Context(1, 3)).positions == range(3, 5)
    assert split_source(sources["list"], Context(0, 1)).positions == range(0, 7)   # one process: everything


# -- the context --------------------------------------------------------------------------------------


def test_without_a_launcher_the_context_is_one_process_without_a_group(no_launcher):
    assert not launched()
    ctx = context()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)
    assert context(False, device="cpu").device == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="distributed=True"):
        context(True)
    with pytest.raises(InvalidArgumentError, match="distributed='yes'"):
        context("yes")
    assert gather_objects({"a": 1}, ctx) == [{"a": 1}] and all_reduce_sum(3, ctx) == 3
    barrier(ctx)                                       # nothing to wait for


def test_a_launcher_is_detected_from_torchrun_or_slurm_variables(no_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not launched()                              # srun alone without MASTER_ADDR: not a torch job
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launched()
    monkeypatch.setenv("WORLD_SIZE", "1")              # torchrun's variables win: one process
    assert not launched()
    assert context().world_size == 1



def test_the_defence_benchmark_refuses_to_run_under_a_launcher(no_launcher, monkeypatch, tmp_path, capsys):
    from clipscope.cli import main
    config = tmp_path / "bench.yaml"
    config.write_text("model: organism\n")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert main(["attack", "--benchmark", str(config)]) == 2    # every rank would fit and write the same report
    assert "--benchmark" in capsys.readouterr().err and not (tmp_path / "out").exists()

def test_progress_shows_on_rank_0_only_counting_every_rank():
    assert isinstance(main_bar(Context(1, 2), True, True, "x", total=10), HiddenBar)
    with main_bar(Context(0, 2), True, True, "mining", total=10) as bar:
        bar.update(3)                                  # rank 0's 3 items stand for 6 over both ranks
        assert bar.bar.n == 6 and bar.bar.total == 10
        bar.update(3)                                  # never past the total
        assert bar.bar.n == 10
    with main_bar(Context(0, 1), True, True, "mining", total=10) as bar:
        bar.update(3)
        assert bar.n == 3


def collectives_rank(rank: int, out: str) -> None:
    ctx = context()
    shard = split_source(list(range(5)), ctx)
    result = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, str(ctx.device), ctx.is_main),
              "all": gather_objects({"rank": rank, "items": [p for p, _, _ in shard.items()]}, ctx),
              "to0": gather_objects(rank * 10, ctx, dst=0), "sum": all_reduce_sum(rank + 1, ctx),
              "fsum": all_reduce_sum(0.5, ctx)}
    barrier(ctx)
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_find_their_rank_and_gather_and_sum_across_ranks(tmp_path):
    spawn_ranks(collectives_rank, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["ctx"] == (0, 2, 0, "gloo", "cpu", True) and r1["ctx"] == (1, 2, 1, "gloo", "cpu", False)
    everything = [{"rank": 0, "items": [0, 1, 2]}, {"rank": 1, "items": [3, 4]}]
    assert r0["all"] == r1["all"] == everything
    assert r0["to0"] == [0, 10] and r1["to0"] is None
    assert r0["sum"] == r1["sum"] == 3 and r0["fsum"] == r1["fsum"] == 1.0
