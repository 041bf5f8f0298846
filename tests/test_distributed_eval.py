"""Audit embeddings, audits and typographic attack evaluation on two processes (gloo on the CPU) equal one
process's result exactly, and a killed rank's embedding chunks resume from the cache on relaunch.

Each test forks two ranks from the test process (so they share its already loaded organism instead of
importing open_clip again), joins them with gloo on 127.0.0.1, runs the same call as one process and
compares: embeddings with ``torch.equal``, tables with ``assert_frame_equal`` (no tolerance).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from clipscope.audit import run_audit
from clipscope.audit.adapters import load_data
from clipscope.audit.cache import embed_cached
from clipscope.audit.spec import load_spec
from clipscope.organism import SHAPES
from clipscope.organism.scenes import object_scene
from clipscope.typographic import Attack, TextStyle, evaluate, sweep
from clipscope.typographic.run import run_attack_config

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn, args: tuple, out: Path) -> None:
    """One rank: the launcher's environment (as torchrun sets it), ``fn(rank, *args)``, its result to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def launch(fn, *args, out: Path) -> list:
    """``fn(rank, *args)`` on ``WORLD`` forked ranks; returns each rank's result, in rank order. A rank that
    raises makes this raise (``torch.multiprocessing.ProcessRaisedException``) after the others are stopped."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(_free_port(), fn, args, out), nprocs=WORLD, start_method="fork")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


class CountEmbeds:
    """Counts ``model.embed`` calls (one per encoded chunk); ``fail_at``: the call that raises instead, once
    ``ready()`` is true (polled up to 60 s, so that the other rank's chunks are written when this one dies)."""

    def __init__(self, model, fail_at: int | None = None, ready=lambda: True):
        self.model, self.inner, self.calls, self.fail_at, self.ready = model, model.embed, 0, fail_at, ready
        model.embed = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            deadline = time.monotonic() + 60
            while not self.ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("simulated crash of this rank")
        return self.inner(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Audit: embeddings and metrics

def demo_spec(tmp_path: Path):
    """The audit spec the demo runs (:data:`clipscope.demo.AUDIT_SPEC`), on 60 figures (8 chunks of 8 rows, the
    last one 4; 4 chunks per rank) with 100 bootstrap draws."""
    from clipscope.demo import AUDIT_SPEC
    raw = yaml.safe_load(AUDIT_SPEC.read_text())
    raw["data"].pop("data_card")
    raw["data"]["n"] = 60
    raw["retrieval"]["k"] = [5, 10, 20]
    raw.update(chunk_size=8, batch_size=4, bootstrap={"n": 100, "seed": 0, "confidence": 0.95},
               output=str(tmp_path / "out"))
    return load_spec(raw)


def _embed_ranks(rank: int, model, data, cache: Path, fail_rank: int | None, all_ranks: bool = False) -> dict:
    counter = CountEmbeds(model, fail_at=2 if rank == fail_rank else None,
                          ready=lambda: len(list(cache.rglob("chunk_*.safetensors"))) >= 5)
    got = embed_cached(model, data, cache, chunk_size=8, batch_size=4, progress=False, all_ranks=all_ranks)
    if got is None:                                              # a rank other than 0 (all_ranks=False)
        return {"calls": counter.calls}
    return {"embeddings": got.embeddings, "rows": got.rows, "stats": got.stats, "calls": counter.calls}


def _node_local_ranks(rank: int, model, data, caches: Path) -> dict:
    """Each rank on its own "node" (LOCAL_RANK 0, its own cache folder), every rank getting the result."""
    os.environ["LOCAL_RANK"] = "0"
    got = embed_cached(model, data, caches / f"node{rank}", chunk_size=8, batch_size=4, progress=False,
                       all_ranks=True)
    return {"embeddings": got.embeddings, "rows": got.rows}


def _audit_ranks(rank: int, model, spec, cache: Path) -> dict:
    return {"result": run_audit(spec, models=[model], cache_dir=cache, progress=False)}


def test_two_ranks_audit_the_demo_spec_exactly_as_one_process(tmp_path, organism):
    spec = demo_spec(tmp_path)
    one = run_audit(spec, models=[organism], cache_dir=tmp_path / "one", write=False, progress=False)
    out_dir = Path(spec.output)
    ranks = launch(_audit_ranks, organism, spec, tmp_path / "two", out=tmp_path / "ranks")
    two, other = ranks[0]["result"], ranks[1]
    assert other["result"] is None                               # rank 1 encodes its share and returns
    assert (out_dir / "report.html").is_file()                   # rank 0 wrote the report
    for table in ("groups", "summary", "changes", "class_shares", "retrieval", "predictions", "skipped"):
        pd.testing.assert_frame_equal(getattr(two, table), getattr(one, table), check_exact=True)
    stats = two.provenance["models"][0]["cache"]
    assert (stats["images_encoded"], stats["chunks_computed"], stats["chunks_reused"]) == (60, 8, 0)
    assert one.summary["overall"].notna().any()                  # the comparison compared numbers


def test_two_ranks_embed_the_same_bits_and_a_killed_rank_resumes_its_chunks(tmp_path, organism):
    data = load_data(demo_spec(tmp_path).data)
    reference = embed_cached(organism, data, tmp_path / "one", chunk_size=8, batch_size=4, progress=False)
    cache = tmp_path / "two"
    # first launch: rank 1 dies in its second chunk; rank 0 finishes its four chunks, rank 1 wrote one
    # (the error reported is the first rank's to end: rank 1's crash, or rank 0 losing its peer in the merge)
    with pytest.raises(mp.ProcessRaisedException, match="simulated crash|Connection closed by peer"):
        launch(_embed_ranks, organism, data, cache, 1, out=tmp_path / "crash")
    assert len(list(cache.rglob("chunk_*.safetensors"))) == 5
    assert not list(cache.rglob("*.tmp"))
    ranks = launch(_embed_ranks, organism, data, cache, None, out=tmp_path / "resume")
    assert [r["calls"] for r in ranks] == [0, 3]                 # only rank 1's three missing chunks run
    assert "embeddings" not in ranks[1]                          # by default the merge goes to rank 0 alone
    main = ranks[0]
    assert torch.equal(main["embeddings"], reference.embeddings)
    np.testing.assert_array_equal(main["rows"], reference.rows)
    stats = main["stats"]                                        # over both ranks: chunks 5, 6, 7 (8 + 8 + 4 rows)
    assert (stats["chunks_computed"], stats["chunks_reused"], stats["images_encoded"]) == (3, 5, 20)


def test_node_local_caches_each_get_a_manifest_and_all_ranks_get_the_merge(tmp_path, organism):
    data = load_data(demo_spec(tmp_path).data)
    reference = embed_cached(organism, data, tmp_path / "one", chunk_size=8, batch_size=4, progress=False)
    ranks = launch(_node_local_ranks, organism, data, tmp_path / "nodes", out=tmp_path / "ranks")
    for r, got in enumerate(ranks):                              # all_ranks=True: every rank holds the whole
        assert torch.equal(got["embeddings"], reference.embeddings)
        np.testing.assert_array_equal(got["rows"], reference.rows)
        manifests = list((tmp_path / "nodes" / f"node{r}").rglob("manifest.json"))
        assert len(manifests) == 1                               # each node's first process wrote its own
        assert json.loads(manifests[0].read_text())["chunks"] == 8


# ---------------------------------------------------------------------------------------------
# Typographic attacks

STYLE = TextStyle(size=0.25, colour="black", box="white", padding=0.1)


def attack_data(tmp_path: Path):
    """21 object scenes and, at position 9, a missing file (skipped): 22 positions, which whole batches of 4 split
    into 0..11 and 12..21 (an even split, 0..10 and 11..21, would score 11 in another batch than one process)."""
    scenes = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=6_000_000 + i) for i in range(21)]
    images = [s.image for s in scenes]
    labels = [s.meta["shape"] for s in scenes]
    images.insert(9, str(tmp_path / "missing.png"))
    labels.insert(9, SHAPES[0])
    return images, labels


def _attack_ranks(rank: int, model, images, labels, cache: Path) -> dict:
    encode = model.model.encode_image
    calls = []
    model.model.encode_image = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    attack = Attack.untargeted(STYLE)
    first = evaluate(model, images, labels, list(SHAPES), attack, batch_size=4, progress=False, cache_dir=cache)
    encoded, calls[:] = sum(calls), []
    again = evaluate(model, images, labels, list(SHAPES), attack, batch_size=4, progress=False, cache_dir=cache)
    encoded_again, calls[:] = sum(calls), []
    evaluate(model, images, labels, list(SHAPES), attack, batch_size=4, progress=False, cache_dir=cache, seed=1)
    encoded_other = sum(calls)                                  # another seed: another key, nothing reused
    swept = sweep(model, images, labels, list(SHAPES), attack, {"size": [0.1, 0.25]}, batch_size=4, progress=False)
    return {"first": first, "again": again, "encoded": (encoded, encoded_again, encoded_other), "sweep": swept}


def _same_attack_result(a, b) -> None:
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)
    assert a.metrics.keys() == b.metrics.keys()
    assert all(a.metrics[k] == b.metrics[k] or (math.isnan(a.metrics[k]) and math.isnan(b.metrics[k]))
               for k in a.metrics)
    assert a.skipped == b.skipped
    assert [(e.index, e.text, e.cover) for e in a.examples] == [(e.index, e.text, e.cover) for e in b.examples]
    assert all(np.array_equal(np.asarray(e.attacked), np.asarray(f.attacked)) for e, f in zip(a.examples, b.examples))


def test_two_ranks_evaluate_and_sweep_exactly_as_one_process_and_reuse_their_cache(tmp_path, organism):
    images, labels = attack_data(tmp_path)
    attack = Attack.untargeted(STYLE)
    one = evaluate(organism, images, labels, list(SHAPES), attack, batch_size=4, progress=False)
    one_sweep = sweep(organism, images, labels, list(SHAPES), attack, {"size": [0.1, 0.25]}, batch_size=4,
                      progress=False)
    assert len(one.frame) == 21 and len(one.skipped) == 1
    ranks = launch(_attack_ranks, organism, images, labels, tmp_path / "cache", out=tmp_path / "ranks")
    for r in ranks:                                                # every rank holds the whole, merged result
        _same_attack_result(r["first"], one)
        _same_attack_result(r["again"], one)
        pd.testing.assert_frame_equal(r["sweep"].frame, one_sweep.frame, check_exact=True)
        for a, b in zip(r["sweep"].results, one_sweep.results):
            _same_attack_result(a, b)
    # first run: each rank encodes its readable images clean and attacked (positions 0..11 less the missing one:
    # 11, and 12..21: 10); the rerun reads both ranks' rows from the cache; another seed computes them again
    assert [r["encoded"] for r in ranks] == [(22, 0, 22), (20, 0, 20)]


def _resume_ranks(rank: int, model, images, labels, cache: Path, fail_rank: int | None) -> dict:
    """Evaluate with ``cache``, counting the batches encoded (a clean and an attacked pass each); on ``fail_rank``
    the clean pass of the rank's second batch raises, once the other rank's three blocks and this rank's first
    are in the cache (polled up to 60 s)."""
    encode, calls, own = model.model.encode_image, [], "encode_image" in vars(model.model)

    def counted(x, *args, **kwargs):
        calls.append(len(x))
        if rank == fail_rank and len(calls) == 3:
            deadline = time.monotonic() + 60
            while len(list(cache.glob("evaluate_*.json"))) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("simulated crash of this rank")
        return encode(x, *args, **kwargs)
    model.model.encode_image = counted
    try:
        result = evaluate(model, images, labels, list(SHAPES), Attack.untargeted(STYLE), batch_size=4,
                          progress=False, cache_dir=cache)
    finally:                                                     # the model as it was (also called in-process)
        if own:
            model.model.encode_image = encode
        else:
            del model.model.encode_image
    return {"result": result, "batches": len(calls) // 2}


def test_a_killed_rank_resumes_its_unfinished_blocks_and_any_world_size_reuses_them(tmp_path, organism):
    images, labels = attack_data(tmp_path)
    one = evaluate(organism, images, labels, list(SHAPES), Attack.untargeted(STYLE), batch_size=4, progress=False)
    cache = tmp_path / "cache"
    # 22 positions in blocks of 4: rank 0 holds blocks 0-2 (0..11), rank 1 blocks 3-5 (12..21). First launch:
    # rank 1 dies in its second batch, after rank 0 finished (the first error to end a rank is reported)
    with pytest.raises(mp.ProcessRaisedException, match="simulated crash|Connection closed by peer"):
        launch(_resume_ranks, organism, images, labels, cache, 1, out=tmp_path / "crash")
    assert len(list(cache.glob("evaluate_*.json"))) == 4 and not list(cache.glob("*.tmp"))
    ranks = launch(_resume_ranks, organism, images, labels, cache, None, out=tmp_path / "resume")
    assert [r["batches"] for r in ranks] == [0, 2]               # rank 0 nothing; rank 1 its blocks 4 and 5
    for r in ranks:
        _same_attack_result(r["result"], one)
    alone = _resume_ranks(0, organism, images, labels, cache, None)  # one process (another world size)
    assert alone["batches"] == 0
    _same_attack_result(alone["result"], one)


def _report_ranks(rank: int, model, config: dict) -> Path | None:
    return run_attack_config(config, model=model, progress=False)


def test_the_attack_command_on_two_ranks_writes_one_processs_report_from_rank_0(tmp_path, organism, monkeypatch):
    for i in range(10):                                            # an image folder, one sub-folder per shape
        scene = object_scene(shape=SHAPES[i % 3], seed=7_000_000 + i)
        (tmp_path / "data" / scene.meta["shape"]).mkdir(parents=True, exist_ok=True)
        scene.image.save(tmp_path / "data" / scene.meta["shape"] / f"{i}.png")
    config = {"data": {"path": str(tmp_path / "data")}, "attack": {"mode": "untargeted", "size": 0.25},
              "sweep": {"size": [0.1, 0.25]}}
    run_attack_config({**config, "out": str(tmp_path / "one")}, model=organism, progress=False)
    ranks = launch(_report_ranks, organism, {**config, "out": str(tmp_path / "two")}, out=tmp_path / "ranks")
    assert ranks == [tmp_path / "two" / "index.html", None]          # rank 1 writes nothing and returns None
    for name in ("images_none.csv", "sweep.csv", "summary.csv", "skipped.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    # the default cache_dir, OUT/cache: one block per setting (size 0.25 serves the attack and its sweep point)
    cache = tmp_path / "two" / "cache"
    assert (len(list(cache.glob("evaluate_*.json"))), len(list(cache.glob("clean_*.json")))) == (2, 1)
    encoded = []
    original = organism.model.encode_image
    monkeypatch.setattr(organism.model, "encode_image", lambda x, *a, **k: encoded.append(len(x)) or original(x, *a, **k))
    run_attack_config({**config, "out": str(tmp_path / "two")}, model=organism, progress=False, distributed=False)
    assert encoded == []                                           # a rerun (on one process) reads every block back
