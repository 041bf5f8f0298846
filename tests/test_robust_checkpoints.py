"""Malformed weights files and model folders: one CheckpointError naming the file and what is wrong.

Every file here is made by the test from a real tiny model's state dict: truncated, cut to a few bytes,
emptied, a pickle under a .safetensors name, tensors of the wrong shape, missing or extra tensors. The
same errors reach the command line as one line on stderr, without a traceback.
"""
from __future__ import annotations

import importlib.util
import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipscope
import clipscope.cli
from clipscope import CheckpointError, UnsafeCheckpointError
from clipscope.backends.open_clip import register_configs

ARCH = "clipscope-tiny-rn"
transformers_available = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                            reason="needs the hf extra (transformers)")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    """The tensors of a randomly initialised tiny ResNet CLIP, as a checkpoint holds them."""
    register_configs()
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in open_clip.create_model(ARCH).state_dict().items()}


def _truncated(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _safetensors(tmp_path, state, name="w.safetensors"):
    save_file(state, tmp_path / name)
    return tmp_path / name


def truncated_safetensors(tmp_path, sd):
    return _truncated(_safetensors(tmp_path, sd))


def tiny_safetensors(tmp_path, sd):
    path = _safetensors(tmp_path, sd)
    path.write_bytes(path.read_bytes()[:5])
    return path


def empty_safetensors(tmp_path, sd):
    (tmp_path / "w.safetensors").write_bytes(b"")
    return tmp_path / "w.safetensors"


def empty_pt(tmp_path, sd):
    (tmp_path / "w.pt").write_bytes(b"")
    return tmp_path / "w.pt"


def pickle_renamed(tmp_path, sd):
    torch.save(sd, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


def truncated_pt(tmp_path, sd):
    torch.save(sd, tmp_path / "w.pt")
    return _truncated(tmp_path / "w.pt")


def text_file_pt(tmp_path, sd):
    (tmp_path / "w.pt").write_text("these are not weights\n")
    return tmp_path / "w.pt"


def list_pt(tmp_path, sd):
    torch.save(list(sd.values()), tmp_path / "w.pt")
    return tmp_path / "w.pt"


def wrong_shape(tmp_path, sd):
    return _safetensors(tmp_path, {**sd, "visual.conv1.weight": torch.zeros(3, 3)})


def missing_tensor(tmp_path, sd):
    return _safetensors(tmp_path, {k: v for k, v in sd.items() if k != "text_projection"})


def extra_tensor(tmp_path, sd):
    return _safetensors(tmp_path, {**sd, "extra.weight": torch.zeros(2)})


def another_models_tensors(tmp_path, sd):
    return _safetensors(tmp_path, {"x": torch.zeros(2)})


MALFORMED = {
    truncated_safetensors: "not a valid safetensors file, perhaps truncated or in another format",
    tiny_safetensors: "not a valid safetensors file, perhaps truncated or in another format",
    empty_safetensors: "the file is empty (0 bytes)",
    empty_pt: "the file is empty (0 bytes)",
    pickle_renamed: "not a valid safetensors file (it is a PyTorch pickle renamed to .safetensors)",
    truncated_pt: "not a readable PyTorch checkpoint, perhaps truncated",
    text_file_pt: "not a readable PyTorch checkpoint",
    list_pt: "it holds a list, not a dict of tensors",
    wrong_shape: f"do not fit {ARCH!r} (1 of the wrong shape: visual.conv1.weight is (3, 3) in the file, "
                 "(4, 3, 3, 3) in the model)",
    missing_tensor: f"do not fit {ARCH!r} (1 missing: text_projection)",
    extra_tensor: f"do not fit {ARCH!r} (1 unexpected: extra.weight)",
    another_models_tensors: "missing: positional_embedding, text_projection, logit_scale, ...; 1 unexpected: x",
}


@pytest.mark.parametrize("make", list(MALFORMED), ids=[f.__name__ for f in MALFORMED])
def test_a_malformed_weights_file_gives_one_error_naming_it_and_the_fault(make, state_dict, tmp_path):
    path = make(tmp_path, state_dict)
    with pytest.raises(CheckpointError) as info:
        clipscope.load(ARCH, pretrained=str(path), device="cpu")
    message = str(info.value)
    assert type(info.value) is CheckpointError
    assert message.startswith(f"Cannot load {str(path)!r}: ") and MALFORMED[make] in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained torch errors


@pytest.mark.parametrize("make", [truncated_safetensors, pickle_renamed, empty_pt, wrong_shape],
                         ids=lambda f: f.__name__)
def test_the_command_line_reports_a_malformed_file_in_one_line(make, state_dict, tmp_path, capsys):
    path = make(tmp_path, state_dict)
    code = clipscope.cli.main(["layers", "--model", ARCH, "--pretrained", str(path), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"clipscope: error: Cannot load {str(path)!r}: ")
    assert MALFORMED[make] in err and "Traceback" not in err


def _save_with_payload(state_dict: dict, path, sentinel) -> None:
    """Pickle ``state_dict`` plus an object whose unpickling would create ``sentinel``."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    torch.save({**state_dict, "payload": Payload()}, path)


def test_a_pickle_with_a_payload_renamed_safetensors_is_never_unpickled(state_dict, tmp_path):
    sentinel = tmp_path / "pwned"
    _save_with_payload(state_dict, tmp_path / "w.safetensors", sentinel)
    with pytest.raises(CheckpointError, match="PyTorch pickle renamed to .safetensors"):
        clipscope.load(ARCH, pretrained=str(tmp_path / "w.safetensors"), device="cpu")
    assert not sentinel.exists()


def test_a_pickle_with_a_payload_is_still_refused_as_unsafe(state_dict, tmp_path):
    sentinel = tmp_path / "pwned"
    _save_with_payload(state_dict, tmp_path / "w.pt", sentinel)
    with pytest.raises(UnsafeCheckpointError, match=r"Refused to load .*w\.pt"):
        clipscope.load(ARCH, pretrained=str(tmp_path / "w.pt"), device="cpu")
    assert not sentinel.exists()


def test_a_path_object_loads_like_its_string(state_dict, tmp_path):
    model = clipscope.load(ARCH, pretrained=_safetensors(tmp_path, state_dict), device="cpu")
    assert torch.equal(model.model.state_dict()["visual.conv1.weight"], state_dict["visual.conv1.weight"])


class TestOpenClipFolders:
    """A folder with open_clip_config.json and weights, loaded as ``clipscope.load(folder)``."""

    @staticmethod
    def _folder(tmp_path, state, config: str | None = None):
        folder = tmp_path / "model"
        folder.mkdir()
        cfg = {"model_cfg": open_clip.get_model_config(ARCH), "preprocess_cfg": {}}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg) if config is None else config)
        save_file(state, folder / "open_clip_model.safetensors")
        return folder

    def test_a_truncated_weights_file_is_named(self, state_dict, tmp_path):
        folder = self._folder(tmp_path, state_dict)
        _truncated(folder / "open_clip_model.safetensors")
        with pytest.raises(CheckpointError) as info:
            clipscope.load(str(folder), device="cpu")
        assert str(info.value).startswith(f"Cannot load {str(folder / 'open_clip_model.safetensors')!r}: "
                                          "not a valid safetensors file")

    def test_a_truncated_file_in_the_hub_cache_is_named(self, state_dict, tmp_path, hf_cache, monkeypatch):
        folder = self._folder(tmp_path, state_dict)
        _truncated(folder / "open_clip_model.safetensors")
        snapshot = hf_cache("org/tiny", {p.name: p for p in folder.iterdir()})
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(CheckpointError) as info:
            clipscope.load("hf-hub:org/tiny", device="cpu")
        assert str(info.value).startswith(f"Cannot load {str(snapshot / 'open_clip_model.safetensors')!r}: "
                                          "not a valid safetensors file")

    def test_a_config_that_is_not_json_is_named(self, state_dict, tmp_path):
        folder = self._folder(tmp_path, state_dict, config="{not json")
        with pytest.raises(CheckpointError) as info:
            clipscope.load(str(folder), device="cpu")
        assert str(info.value).startswith(f"Cannot load {str(folder / 'open_clip_config.json')!r}: not valid JSON")

    def test_tensors_of_another_shape_are_named(self, state_dict, tmp_path):
        folder = self._folder(tmp_path, {**state_dict, "text_projection": torch.zeros(2, 2)})
        with pytest.raises(CheckpointError, match="text_projection") as info:
            clipscope.load(str(folder), device="cpu")
        assert str(folder) in str(info.value) and "do not fit its open_clip_config.json" in str(info.value)


@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory) -> dict:
    """The config.json text and tensors of a tiny transformers CLIPModel."""
    import transformers
    from safetensors.torch import load_file
    folder = tmp_path_factory.mktemp("hf-weights")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return {"config": (folder / "config.json").read_text(),
            "tensors": {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}}


@transformers_available
class TestTransformersFolders:
    """``clipscope.load("hf:/path/to/folder")`` with a missing folder, missing files or bad weights."""

    @staticmethod
    def _folder(tmp_path, weights, tensors=None, skip=()):
        """A transformers CLIP folder; the tokenizer files are placeholders (these loads fail before them)."""
        folder = tmp_path / "clip"
        folder.mkdir()
        files = {"config.json": weights["config"], "preprocessor_config.json": "{}", "vocab.json": "{}"}
        for name, text in files.items():
            if name not in skip:
                (folder / name).write_text(text)
        save_file(weights["tensors"] if tensors is None else tensors, folder / "model.safetensors",
                  metadata={"format": "pt"})
        return folder

    def test_a_folder_that_does_not_exist_is_named(self, tmp_path):
        missing = tmp_path / "no" / "such" / "folder"
        with pytest.raises(CheckpointError) as info:
            clipscope.load(f"hf:{missing}", device="cpu")
        assert str(info.value).startswith(f"Cannot load {str(missing)!r}: no such folder")

    def test_a_folder_without_its_config_is_named(self, hf_weights, tmp_path):
        folder = self._folder(tmp_path, hf_weights, skip=("config.json",))
        with pytest.raises(CheckpointError) as info:
            clipscope.load(f"hf:{folder}", device="cpu")
        assert str(info.value) == (f"Cannot load {str(folder)!r}: the folder has no config.json "
                                   "(a transformers CLIP folder needs all of them).")

    def test_a_truncated_weights_file_is_named(self, hf_weights, tmp_path):
        folder = self._folder(tmp_path, hf_weights)
        _truncated(folder / "model.safetensors")
        with pytest.raises(CheckpointError) as info:
            clipscope.load(f"hf:{folder}", device="cpu")
        assert str(info.value).startswith(f"Cannot load {str(folder / 'model.safetensors')!r}: "
                                          "not a valid safetensors file")

    def test_a_missing_tensor_is_refused_not_initialised_randomly(self, hf_weights, tmp_path):
        name = "text_model.encoder.layers.0.mlp.fc1.weight"
        folder = self._folder(tmp_path, hf_weights, {k: v for k, v in hf_weights["tensors"].items() if k != name})
        with pytest.raises(CheckpointError, match=f"1 missing: {name}") as info:
            clipscope.load(f"hf:{folder}", device="cpu")
        assert str(folder / "model.safetensors") in str(info.value)

    def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(self, hf_weights, tmp_path):
        name = "text_model.encoder.layers.0.mlp.fc1.weight"
        folder = self._folder(tmp_path, hf_weights, {**hf_weights["tensors"], name: torch.zeros(3, 3)})
        with pytest.raises(CheckpointError, match=rf"{name} is \(3, 3\) in the file, \(32, 16\) in the model"):
            clipscope.load(f"hf:{folder}", device="cpu")
