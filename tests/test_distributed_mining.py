"""Dataset examples mined by two gloo processes equal one process's, exactly; a killed rank resumes its
shard and the finished one is not mined again; ``torchrun -m clipscope mine`` writes the cache the
Atlas reads.

Known answers: the single-process result on the same data (same images in the same order, values
bit for bit: each rank's batches are the batches one process makes, see
:func:`clipscope.distributed.shard_range`); the data hold copies of one grey image on both sides of
the shard boundary, so units tie across ranks and the merge must order the ties by global position;
forward passes are counted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipscope
from clipscope.cli import main
from clipscope.neurons import Atlas, dataset_examples
from clipscope.organism.scenes import object_scene

from .test_distributed import free_port, spawn_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ["visual.layer3", "visual.layer4"]
K, BATCH = 4, 4
#: where the grey copies go: ranks 0 and 1 of 2 (blocks of 4) split 32 images at 16
GREY_AT = (2, 9, 15, 16, 27)


def scenes(n: int = 32) -> list[Image.Image]:
    images = [object_scene(seed=i).image for i in range(n)]
    grey = Image.new("RGB", images[0].size, (128, 128, 128))
    for p in GREY_AT:
        if p < n:
            images[p] = grey
    return images


def as_tuple(result) -> dict:
    return {name: (se.top_values, se.top_keys, se.top_positions, se.bottom_values, se.bottom_keys,
                   se.bottom_positions) for name, se in result.sites.items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name


def counting(model) -> list[int]:
    """Count ``model``'s forward passes (images per call) from now on."""
    calls: list[int] = []
    forward = model.activations

    def activations(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    model.activations = activations
    return calls


@pytest.fixture(scope="module")
def single(organism):
    """The single-process result, mined without a cache."""
    return dataset_examples(organism, scenes(), SITES, k=K, batch_size=BATCH, progress=False)


def mining_rank(rank: int, out: str) -> None:
    model = clipscope.load("organism", device="cpu")
    calls = counting(model)
    result = dataset_examples(model, scenes(), SITES, k=K, batch_size=BATCH, cache_dir=f"{out}/cache",
                              progress=False, checkpoint_every=2)
    torch.save({"result": as_tuple(result), "n_seen": result.n_seen, "calls": calls}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_mine_exactly_what_one_process_mines_ties_included(tmp_path, single, organism):
    # the data tie: the grey copies on both sides of the boundary share their top value at some unit
    layer4 = single.sites["visual.layer4"]
    tied = [u for u in range(len(layer4.units))
            if sum(key in GREY_AT for key in layer4.top_keys[u]) >= 2]
    assert tied, "no unit ranks two grey copies among its top examples: the data would not test ties"
    keys = layer4.top_keys[tied[0]]
    assert [k for k in keys if k in GREY_AT] == sorted(k for k in keys if k in GREY_AT)   # one process: by position

    spawn_ranks(mining_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert_identical(r["result"], as_tuple(single))
        assert r["n_seen"] == 32
    assert [sum(r["calls"]) for r in ranks] == [16, 16]        # each rank read its half, once
    # the merged state is the single-process cache entry; the per-rank files are gone
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and not any(".rank" in f for f in files)
    calls = counting(organism)
    try:
        again = dataset_examples(organism, scenes(), SITES, k=K, batch_size=BATCH, cache_dir=tmp_path / "cache",
                                 progress=False)
        atlas = Atlas(organism, scenes(), k=K, cache_dir=str(tmp_path / "cache"), progress=False)
        from_atlas = atlas.examples("visual.layer4")
    finally:
        del organism.activations
    assert calls == []                                          # read from the cache, no pass over the data
    assert_identical(as_tuple(again), as_tuple(single))
    assert_identical(as_tuple(from_atlas), {"visual.layer4": as_tuple(single)["visual.layer4"]})


def dying_rank(rank: int, out: str, die: bool) -> None:
    """Rank 1 (when ``die``) is killed (``os._exit``, no clean-up) at its 3rd batch, after rank 0 finished its shard
    and after its own checkpoint at batch 2."""
    model = clipscope.load("organism", device="cpu")
    calls = counting(model)
    if die and rank == 1:
        forward = model.activations

        def activations(x, *args, **kwargs):
            if len(calls) == 2:
                wait_for_finished_rank0(Path(out) / "cache")
                os._exit(17)
            return forward(x, *args, **kwargs)

        model.activations = activations
    result = dataset_examples(model, scenes(), SITES, k=K, batch_size=BATCH, cache_dir=f"{out}/cache",
                              progress=False, checkpoint_every=2)
    torch.save({"result": as_tuple(result), "calls": calls}, f"{out}/rank{rank}.pt")


def wait_for_finished_rank0(cache: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [torch.load(p, weights_only=True) for p in cache.glob("*.rank0-of-2.*.pt")]
        if len(states) == len(SITES) and all(s["done"] for s in states):
            return
        time.sleep(0.2)
    raise TimeoutError("rank 0 did not finish its shard")


@pytest.mark.slow
def test_a_killed_rank_resumes_its_shard_and_the_finished_rank_mines_nothing_again(tmp_path, single):
    with pytest.raises(Exception, match="exit code 17|exited with code 17"):
        spawn_ranks(dying_rank, 2, str(tmp_path), True)
    # what the dead rank left: its checkpoint after 2 of its 4 batches
    states = [torch.load(p, weights_only=True) for p in (tmp_path / "cache").glob("*.rank1-of-2.*.pt")]
    assert len(states) == 2 and all(s["consumed"] == 24 and not s["done"] for s in states)

    spawn_ranks(dying_rank, 2, str(tmp_path), False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["calls"] == []                    # the finished shard is not recomputed
    assert ranks[1]["calls"] == [BATCH, BATCH]       # the killed one mines its last 2 batches only
    for r in ranks:
        assert_identical(r["result"], as_tuple(single))


@pytest.mark.slow
def test_torchrun_mine_writes_the_atlas_cache_with_rank_0_reporting(tmp_path, organism):
    data = tmp_path / "images"
    data.mkdir()
    for i, im in enumerate(scenes(20)):
        im.save(data / f"{i:03d}.png")
    cache = tmp_path / "atlas-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "clipscope", "mine", "organism",
                          "--data", str(data), "--sites", ",".join(SITES), "--k", str(K), "--batch-size", str(BATCH),
                          "--cache-dir", str(cache), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("atlas cache:") == 1                 # one report: rank 0's
    summary = json.loads((cache / "mine-summary.json").read_text())
    assert (summary["n_seen"], summary["processes"], summary["sites"]) == (20, 2, SITES)

    expected = dataset_examples(organism, str(data), SITES, k=K, batch_size=BATCH, progress=False)
    calls = counting(organism)
    try:
        atlas = Atlas(organism, str(data), k=K, cache_dir=str(cache), progress=False)
        found = {site: as_tuple(atlas.examples(site))[site] for site in SITES}
    finally:
        del organism.activations
    assert calls == []
    assert_identical(found, as_tuple(expected))


def test_mine_in_one_process_writes_the_cache_the_atlas_reads(tmp_path, organism, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "images"
    data.mkdir()
    for i, im in enumerate(scenes(10)):
        im.save(data / f"{i:03d}.png")
    (data / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    assert main(["mine", "organism", "--data", str(data), "--sites", "visual.layer4", "--k", "3",
                 "--batch-size", "4", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "over 10 image(s) (1 unreadable skipped), 1 process(es)" in out
    summary = json.loads((cache / "mine-summary.json").read_text())
    assert summary["n_seen"] == 10 and summary["skipped"][0][0].endswith("broken.png")
    calls = counting(organism)
    try:
        found = Atlas(organism, str(data), k=3, cache_dir=str(cache), progress=False).examples("visual.layer4")
    finally:
        del organism.activations
    assert calls == []
    expected = dataset_examples(organism, str(data), "visual.layer4", k=3, batch_size=4, progress=False)
    assert_identical(as_tuple(found), as_tuple(expected))


def test_mine_refuses_a_data_path_that_is_neither_kind_of_folder(tmp_path, capsys):
    code = main(["mine", "organism", "--data", str(tmp_path / "missing"), "--sites", "visual.layer4",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "--data=" in capsys.readouterr().err
    assert main(["mine", "organism", "--data", str(tmp_path), "--sites", "visual.layer4", "--k", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "--k=0 is not valid" in capsys.readouterr().err
