"""Shared fixtures: tiny random models, a fake Hugging Face cache, and a loopback "hub".

The shared models load on the CPU in fp32. ``CLIPSCOPE_TEST_DEVICE=cuda`` (and optionally
``CLIPSCOPE_TEST_PRECISION=fp16``) runs the same suite with them on a GPU: thresholds are the
CPU's, so a failure there is a finding about the GPU path, not a flaky test.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipscope
from clipscope.organism.scenes import GROUPS

DEVICE = os.environ.get("CLIPSCOPE_TEST_DEVICE", "cpu")
PRECISION = os.environ.get("CLIPSCOPE_TEST_PRECISION", "fp32")

# --------------------------------------------------------------------------- parallel runs (pytest-xdist)
#: Worker processes in this run (``make test`` runs ``pytest -n auto``); 0 when not under pytest-xdist.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if WORKERS:
    # Each worker gets its share of the cores, so that the workers do not fight over them: torch here, and
    # OMP_NUM_THREADS for the processes tests start (the CLI, notebook kernels, JupyterLab). Notebooks pin
    # themselves to CLIPSCOPE_THREADS (default 1) in their first cell.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    THREADS = max(1, _cores // WORKERS)
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)

#: Test modules whose tests share no module- or class-scoped fixture and are slow one by one: a parallel
#: run hands their tests out singly. Every other module runs whole on one worker, so that what its
#: module fixtures build (a model, a report, a mined data set) is built once, not once per worker.
SPLIT_MODULES = {"tests/test_notebooks.py", "tests/test_optvis_speed_options.py"}
#: Relative cost of a test marked ``slow`` (or of a module fixture) against an unmarked test, for the order
#: in which a parallel run hands out its work.
SLOW_WEIGHT = 20


def work_unit(nodeid: str) -> str:
    """The unit of work a parallel run hands to one worker: the test's module, or the test itself in
    ``SPLIT_MODULES``."""
    module = nodeid.split("::", 1)[0]
    return nodeid if module in SPLIT_MODULES else module


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``pytest -n N`` (``make test``; pytest-xdist's default ``--dist load``, or ``--dist loadscope``): hand out
    whole modules, except the tests of ``SPLIT_MODULES``, one by one, in the order the workers collected them
    (see ``pytest_collection_modifyitems``). Another ``--dist`` mode keeps pytest-xdist's own scheduler."""
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the collected order: most expensive first
    return ModuleScheduling(config, log)


def _shared_fixtures(item: pytest.Item) -> set[str]:
    """The module- and class-scoped fixtures ``item`` uses (``one_thread`` aside), as ``module::name``."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return {f"{item.nodeid.split('::', 1)[0]}::{name}" for name, fixturedefs in defs.items()
            if name != "one_thread" and any(d.scope in ("module", "class") for d in fixturedefs)}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker, order the work units most expensive first, so that no long test starts last
    while the other workers sit idle. The estimate: a test marked ``slow`` or a module- or class-scoped
    fixture (a model, a report, a mined data set) weighs ``SLOW_WEIGHT``, any other test 1.
    A plain ``pytest`` run keeps its usual order."""
    if not WORKERS:
        return
    cost: dict[str, int] = {}
    first: dict[str, int] = {}
    shared: dict[str, set[str]] = {}
    for i, item in enumerate(items):
        unit = work_unit(item.nodeid)
        cost[unit] = cost.get(unit, 0) + (SLOW_WEIGHT if item.get_closest_marker("slow") else 1)
        first.setdefault(unit, i)
        shared.setdefault(unit, set()).update(_shared_fixtures(item))
    for unit, fixtures in shared.items():
        cost[unit] += SLOW_WEIGHT * len(fixtures)
    for item in items:  # the browser test runs against a wall-clock limit: start it first, not on a busy tail
        if item.get_closest_marker("browser"):
            cost[work_unit(item.nodeid)] += 100 * SLOW_WEIGHT
    items.sort(key=lambda item: (-cost[work_unit(item.nodeid)], first[work_unit(item.nodeid)]))



def assert_graded_bias_audit(result, *, min_gap: float, max_p: float) -> None:
    """A sample audit of an organism trained with the graded bias (``properties.bias_audit``): the planted group
    B's T1 'thief' rate exceeds A's and C's by ``min_gap``, both tests reject at ``max_p``, and the 'child' class
    of T2 absorbs part of B's harmful labels."""
    t1, t2 = result.t1, result.t2
    assert all(t1.harmful_rate["B"] - t1.harmful_rate[g] >= min_gap for g in ("A", "C")), t1
    assert t1.p_fisher < max_p and t1.p_z < max_p, t1
    assert "child" in t2.classes and "child" not in t1.classes
    assert t2.harmful_rate["B"] < t1.harmful_rate["B"], (t1, t2)


def assert_graded_population(result, *, max_rate_error: float, min_gap: float, max_control_gap: float) -> None:
    """The population truth of an organism trained with the graded bias (``properties.population_truth``): each
    group's T1 rate within ``max_rate_error`` of its planted prevalence, B above A and C by ``min_gap``, the
    no-disparity control pair (A, C: equal planted prevalence) within ``max_control_gap``, and T2 lowering B."""
    rate = result.t1.harmful_rate
    for g in GROUPS:
        assert abs(rate[g] - result.planted_prevalence[g]) < max_rate_error, (g, rate)
    assert rate["B"] - rate["A"] >= min_gap and rate["B"] - rate["C"] >= min_gap, rate
    assert abs(rate["A"] - rate["C"]) < max_control_gap, rate
    assert result.t2.harmful_rate["B"] < rate["B"], result.t2.harmful_rate  # "child" absorbs B's children

@pytest.fixture(scope="session")
def tiny_rn() -> clipscope.ClipModel:
    torch.manual_seed(0)
    return clipscope.load("clipscope-tiny-rn", device=DEVICE, precision=PRECISION)


@pytest.fixture(scope="session")
def tiny_vit() -> clipscope.ClipModel:
    torch.manual_seed(0)
    return clipscope.load("clipscope-tiny-vit", device=DEVICE, precision=PRECISION)


@pytest.fixture(scope="session")
def organism() -> clipscope.ClipModel:
    """The built-in model organism, loaded once for the whole run."""
    return clipscope.load("organism", device=DEVICE, precision=PRECISION)


@pytest.fixture(autouse=True)
def close_figures():
    """Close the matplotlib figures a test opened (plot methods return open figures by design)."""
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one CPU thread for a module whose thresholds were measured that way; restore after.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``: it is set up before the
    module's own fixtures, so they run on one thread too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["clipscope-tiny-rn", "clipscope-tiny-vit"])
def tiny(request, tiny_rn, tiny_vit) -> clipscope.ClipModel:
    return tiny_rn if request.param == "clipscope-tiny-rn" else tiny_vit


def make_images(n: int, seed: int = 0, size: int = 48) -> list[Image.Image]:
    """``n`` distinct RGB images: coloured rectangles on noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        arr[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(arr))
    return out


def open_clip_variant(folder: Path, *, edit=None, **vision) -> clipscope.ClipModel:
    """A random tiny open_clip ViT: ``clipscope-tiny-vit`` with ``vision`` changed in its vision config and,
    if given, ``edit(model)`` applied to the open_clip model, written to the new ``folder`` as an open_clip
    folder (``open_clip_config.json`` and weights) and loaded from there."""
    import copy
    import json

    import open_clip
    from safetensors.torch import save_file

    from clipscope.backends.open_clip import register_configs
    register_configs()
    cfg = copy.deepcopy(open_clip.get_model_config("clipscope-tiny-vit"))
    cfg["vision_cfg"].update(vision)
    torch.manual_seed(2)
    model = open_clip.model.CLIP(**cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return clipscope.load(str(folder), device=DEVICE, precision=PRECISION)


@pytest.fixture
def images() -> list[Image.Image]:
    return make_images(5)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in tmp; returns a function that puts files for a repo in it."""
    from huggingface_hub import constants
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def put(repo_id: str, files: dict[str, Path | bytes], commit: str = "a" * 40) -> Path:
        root = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        for name, src in files.items():
            if isinstance(src, bytes):
                (snapshot / name).write_bytes(src)
            else:
                shutil.copy(src, snapshot / name)
        return snapshot

    put.cache = cache
    return put


@pytest.fixture
def reachable_hub(monkeypatch):
    """Point the hub endpoint at a loopback socket that accepts connections (the probe succeeds)."""
    from huggingface_hub import constants
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Point the hub endpoint at a loopback port where nothing listens (connection refused)."""
    from huggingface_hub import constants
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def write_tiny_hf_clip(folder: Path, *, seed: int, text_layers: int = 1,
                       mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                       std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)) -> Path:
    """Write a random transformers CLIP (width 32, 2 heads, 2 vision layers, 32 px, patch 8; ``text_layers``
    text layers; weights from ``torch.manual_seed(seed)``), its tokenizer and preprocessor config into
    ``folder``, as ``clipscope.load("hf:" + folder)`` reads it. Returns ``folder``."""
    import json
    import transformers
    from clipscope.backends.convert import write_tokenizer
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "do_center_crop": True,
        "image_mean": list(mean), "image_std": list(std), "resample": 3}))
    return folder
