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

DEVICE = os.environ.get("CLIPSCOPE_TEST_DEVICE", "cpu")
PRECISION = os.environ.get("CLIPSCOPE_TEST_PRECISION", "fp32")


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
