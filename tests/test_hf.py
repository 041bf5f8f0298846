"""transformers CLIPModel ids ("hf:ORG/REPO") behind the same ClipModel interface."""
from __future__ import annotations

import os

import pytest
import torch

import clipscope
from clipscope import Unit, UnsafeCheckpointError

from .conftest import DEVICE, PRECISION, make_images, write_tiny_hf_clip

transformers = pytest.importorskip("transformers")

REPO = "openai/clip-vit-base-patch32"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("hf-clip"), seed=0)


@pytest.fixture
def hf_model(hf_folder, hf_cache, monkeypatch):
    hf_cache(REPO, {p.name: p for p in hf_folder.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return clipscope.load(f"hf:{REPO}", device=DEVICE, precision=PRECISION)


def test_transformers_ids_load_from_the_cache_through_the_same_interface(hf_model):
    assert hf_model.backend == "transformers"
    images = make_images(3)
    assert hf_model.encode_image(images).shape == (3, 16)
    assert hf_model.encode_text(["a cat", "a dog"]).shape == (2, 16)
    result = hf_model.zero_shot(images, ["cat", "dog"])
    assert torch.allclose(result.probs.sum(1), torch.ones(3), atol=1e-6)


def test_text_embeddings_match_transformers_own_forward(hf_model, hf_folder):
    clip = transformers.CLIPModel.from_pretrained(hf_folder)
    tok = transformers.AutoTokenizer.from_pretrained(hf_folder)
    inputs = tok(["a photo of a cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip.get_text_features(**inputs)
    ref = getattr(ref, "pooler_output", ref)
    assert torch.allclose(hf_model.encode_text(["a photo of a cat"], normalize=False), ref,
                          atol=1e-4 if PRECISION == "fp32" else 1e-2)


def test_the_tokenizer_agrees_with_open_clips(hf_model, tiny_vit):
    text = ["a photo of a red circle"]
    ours, theirs = hf_model.tokenize(text), tiny_vit.tokenize(text)  # both have 16-token contexts
    eot = 49407
    # open_clip pads with 0, transformers with the end-of-text id; the tokens up to end-of-text agree
    length = int((theirs[0] == eot).nonzero()[0]) + 1
    assert torch.equal(ours[0, :length], theirs[0, :length])


def test_sites_use_the_same_naming_scheme(hf_model):
    names = set(hf_model.layers().names())
    assert {"visual.encoder.layers.1.mlp.fc1", "visual.projection", "text.encoder.layers.0", "text.projection"} <= names
    assert hf_model.layers().blocks().names() == ["visual.encoder.layers.0", "visual.encoder.layers.1"]
    site = hf_model.site("visual.encoder.layers.1")
    assert site.layout == "tokens" and site.shape == (17, 32)
    with hf_model.ablate(Unit.neuron("visual.encoder.layers.1.mlp.fc1", 3)), \
            hf_model.capture("visual.encoder.layers.1.mlp.fc1") as acts:
        hf_model.encode_image(make_images(2))
    assert (acts["visual.encoder.layers.1.mlp.fc1"][..., 3] == 0).all()


def test_a_pickled_checkpoint_with_a_payload_is_refused(hf_folder, hf_cache, monkeypatch, tmp_path):
    from safetensors.torch import load_file
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    files = {p.name: p for p in hf_folder.iterdir() if p.name != "model.safetensors"}
    weights = tmp_path / "pytorch_model.bin"
    torch.save({**load_file(hf_folder / "model.safetensors"), "payload": Payload()}, weights)
    files["pytorch_model.bin"] = weights
    hf_cache("evil/clip", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsafeCheckpointError):
        clipscope.load("hf:evil/clip")
    assert not sentinel.exists()
