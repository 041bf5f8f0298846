"""Loading a checkpoint builds the model without a throwaway random initialization.

clipscope builds an open_clip model's parameters on the meta device and assigns the checkpoint's
tensors to them; open_clip's own path initializes every parameter randomly and then copies the
checkpoint over it. The two must give the same model: every parameter and buffer (the causal mask
that no checkpoint holds included) bit for bit, and the same embeddings. The reference is open_clip's
``create_model_and_transforms(arch, pretrained=FILE)``; for a transformers folder it is the file itself
and ``CLIPModel.from_pretrained``. Memory and time are measured in ``bench/load_memory.py``.
A transformers folder's JSON configs are read once each, and one that is no JSON object is named.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import clipscope
from clipscope import CheckpointError
from clipscope.backends.open_clip import ORGANISM_ARCH, register_configs

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs the hf extra (transformers)")
if importlib.util.find_spec("transformers") is not None:
    from .test_hf import hf_folder  # noqa: F401 - the tiny transformers folder fixture

ARCHS = ("clipscope-tiny-rn", "clipscope-tiny-vit")


def every_tensor(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every parameter and buffer, non-persistent buffers included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_same_tensors(loaded: nn.Module, reference: nn.Module) -> None:
    """Same names, kinds (parameter or buffer), dtypes and values; nothing left on the meta device."""
    ours, theirs = every_tensor(loaded), every_tensor(reference)
    assert ours.keys() == theirs.keys()
    assert [n for n, t in ours.items() if t.is_meta] == []
    assert {n for n, _ in loaded.named_parameters()} == {n for n, _ in reference.named_parameters()}
    differ = [n for n in ours if ours[n].dtype != theirs[n].dtype or ours[n].device != theirs[n].device
              or not torch.equal(ours[n], theirs[n])]
    assert differ == []


def assert_same_embeddings(loaded: clipscope.ClipModel, reference: nn.Module, tokens: torch.Tensor) -> None:
    """Equal image and text embeddings (to the bit: the same operations on the same tensors). The reference
    is put in the ClipModel's state: without gradients torch takes another attention kernel (~1e-6 apart)."""
    reference.eval().requires_grad_(False)
    pixels = torch.randn(2, 3, *loaded.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), reference.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(tokens), reference.encode_text(tokens))


def open_clip_reference(arch: str, pretrained: str | None) -> nn.Module:
    """The model as open_clip itself loads it: random initialization, then the checkpoint copied in."""
    return open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu", precision="fp32")[0]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint_state(request) -> tuple[str, dict[str, torch.Tensor]]:
    register_configs()
    torch.manual_seed(1)
    state = open_clip.create_model(request.param).state_dict()
    return request.param, {k: v.contiguous() for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_loads_into_the_same_model_as_open_clips_path(checkpoint_state, suffix, tmp_path):
    arch, state = checkpoint_state
    path = str(tmp_path / f"weights{suffix}")
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = clipscope.load(arch, pretrained=path, device="cpu", precision="fp32")
    reference = open_clip_reference(arch, path)
    assert_same_tensors(loaded.model, reference)
    assert_same_embeddings(loaded, reference, open_clip.get_tokenizer(arch)(["a photo of a cat", "a dog"]))


def test_open_clips_checkpoint_conversions_still_apply(checkpoint_state, tmp_path):
    """A ``state_dict`` wrapped in a dict with ``module.`` prefixes (as a DDP training run saves it)."""
    arch, state = checkpoint_state
    path = str(tmp_path / "wrapped.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = clipscope.load(arch, pretrained=path, device="cpu", precision="fp32")
    assert_same_tensors(loaded.model, open_clip_reference(arch, path))
    assert torch.equal(loaded.model.state_dict()["logit_scale"], state["logit_scale"])


def test_a_position_embedding_of_another_grid_is_resized_as_open_clip_resizes_it(tmp_path):
    """A ViT checkpoint trained at 48 px (a 6x6 patch grid) loaded into the 32 px tiny ViT (4x4)."""
    register_configs()
    torch.manual_seed(2)
    bigger = open_clip.create_model("clipscope-tiny-vit", force_image_size=48)
    path = str(tmp_path / "at48.safetensors")
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, path)
    assert bigger.visual.positional_embedding.shape[0] == 6 * 6 + 1
    loaded = clipscope.load("clipscope-tiny-vit", pretrained=path, device="cpu", precision="fp32")
    assert loaded.model.visual.positional_embedding.shape[0] == 4 * 4 + 1
    assert_same_tensors(loaded.model, open_clip_reference("clipscope-tiny-vit", path))


def test_an_open_clip_folder_loads_into_the_same_model(checkpoint_state, tmp_path):
    arch, state = checkpoint_state
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {}}))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    loaded = clipscope.load(str(folder), device="cpu", precision="fp32")
    assert_same_tensors(loaded.model, open_clip_reference(f"local-dir:{folder}", None))


@pytest.mark.parametrize("names", [
    ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    ("b.bin", "c.pth", "a.safetensors", "d.safetensors"),
])
def test_a_folder_with_several_weights_files_loads_the_one_open_clip_loads(checkpoint_state, tmp_path, names):
    """Each file holds other random weights; open_clip's own ``local-dir:`` path is the reference."""
    arch, _ = checkpoint_state
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {}}))
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        state = {k: v.contiguous() for k, v in open_clip.create_model(arch).state_dict().items()}
        save_file(state, str(folder / name)) if name.endswith(".safetensors") else torch.save(state, folder / name)
    loaded = clipscope.load(str(folder), device="cpu", precision="fp32")
    assert_same_tensors(loaded.model, open_clip_reference(f"local-dir:{folder}", None))


def test_building_for_a_checkpoint_loads_no_tower_weights_either(checkpoint_state, tmp_path, monkeypatch):
    """open_clip's default ``pretrained_text=True`` makes a model with a transformers text tower (e.g.
    ``roberta-ViT-B-32``) download its text weights at build time; built for a checkpoint, neither tower
    may load base weights (a spy on open_clip's factory records what clipscope asks for)."""
    arch, state = checkpoint_state
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    calls: list[dict] = []
    create = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return create(*args, **kwargs)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    clipscope.load(arch, pretrained=path, device="cpu", precision="fp32")
    assert len(calls) == 1
    assert (calls[0].get("load_weights"), calls[0].get("pretrained_text"), calls[0].get("pretrained_image")) == \
        (False, False, False)


@pytest.mark.slow  # ~6 s: open_clip's reference path initializes the organism randomly first
def test_the_organism_loads_into_the_same_model():
    loaded = clipscope.load("organism", device="cpu", precision="fp32")
    register_configs()
    reference = open_clip_reference(ORGANISM_ARCH, loaded.pretrained)
    assert_same_tensors(loaded.model, reference)
    assert_same_embeddings(loaded, reference, open_clip.get_tokenizer(ORGANISM_ARCH)(["a red circle", "a cat"]))


@needs_transformers
def test_a_transformers_folder_holds_exactly_the_files_tensors(hf_folder):  # noqa: F811 - the fixture
    """transformers builds on the meta device itself; its non-persistent position ids are rebuilt."""
    import transformers
    clip = clipscope.load(f"hf:{hf_folder}", device="cpu", precision="fp32").model.clip
    reference = transformers.CLIPModel.from_pretrained(hf_folder)
    assert_same_tensors(clip, reference)
    ours, in_file = every_tensor(clip), load_file(str(hf_folder / "model.safetensors"))
    assert [n for n in in_file if not torch.equal(ours[n], in_file[n])] == []
    ids = ours["text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(ids.shape[-1]).expand_as(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_without_a_checkpoint_the_random_initialization_is_open_clips(arch):
    """Same seed, same weights: random-weight models are still initialized as open_clip initializes them."""
    torch.manual_seed(5)
    loaded = clipscope.load(arch, device="cpu", precision="fp32")
    torch.manual_seed(5)
    assert_same_tensors(loaded.model, open_clip_reference(arch, None))


def test_loading_a_checkpoint_initializes_no_parameter_randomly(checkpoint_state, tmp_path, monkeypatch):
    """``nn.init`` fills only meta tensors (which hold no memory) on clipscope's path; on open_clip's it
    fills real ones, so the check can fail."""
    arch, state = checkpoint_state
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    filled: list[int] = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_"):
        original = getattr(nn.init, name)

        def counting(tensor, *args, _original=original, **kwargs):
            filled.append(0 if tensor.is_meta else tensor.numel())
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(nn.init, name, counting)
    clipscope.load(arch, pretrained=path, device="cpu", precision="fp32")
    assert filled and sum(filled) == 0
    open_clip_reference(arch, path)
    assert sum(filled) > 0


@needs_transformers
def test_a_transformers_folder_reads_its_preprocessor_config_once(hf_folder, monkeypatch):  # noqa: F811
    reads: list[str] = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        reads.append(self.name)
        return read_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counting)
    clipscope.load(f"hf:{hf_folder}", device="cpu", precision="fp32")
    assert reads.count("preprocessor_config.json") == 1


@needs_transformers
@pytest.mark.parametrize("text, fault", [("[1, 2]", "it does not hold a JSON object."),
                                         ("{not json", "not valid JSON (JSONDecodeError: ")])
@pytest.mark.parametrize("config", ["config.json", "preprocessor_config.json"])
def test_a_transformers_config_that_is_no_json_object_is_named(hf_folder, tmp_path, config, text, fault):  # noqa: F811
    folder = tmp_path / "clip"
    shutil.copytree(hf_folder, folder)
    (folder / config).write_text(text)
    with pytest.raises(CheckpointError) as info:
        clipscope.load(f"hf:{folder}", device="cpu", precision="fp32")
    assert str(info.value).startswith(f"Cannot load {str(folder / config)!r}: {fault}")
