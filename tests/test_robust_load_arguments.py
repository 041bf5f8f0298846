"""``clipscope.load`` arguments: device, precision and pretrained are checked once, with one clear error;
the missing-weights message suggests Python calls that are valid and load what was asked for."""
from __future__ import annotations

import ast
import re

import pytest
import torch

import clipscope
import clipscope.cli
from clipscope import WeightsNotAvailableError
from clipscope.model import resolve_device, resolve_precision
from clipscope.validate import InvalidArgumentError

DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'mps'"


class TestDevice:
    @pytest.mark.parametrize("device", ["gpu", "GPU", "cuda0", "cuda:", "cuda:-1", "cpu:0x", "", "tpu", 0, None])
    def test_an_unknown_device_names_the_parameter_the_value_and_the_choices(self, device):
        with pytest.raises(InvalidArgumentError) as info:
            resolve_device(device)
        assert info.value.parameter == "device"
        assert str(info.value) == f"device={device!r} is not valid: one of {DEVICE_CHOICES}"

    def test_load_refuses_an_unknown_device_before_building_anything(self, monkeypatch):
        import open_clip
        monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: pytest.fail("model built"))
        with pytest.raises(InvalidArgumentError, match="device='gpu' is not valid"):
            clipscope.load("clipscope-tiny-rn", device="gpu")

    def test_cuda_on_a_machine_without_cuda_says_so(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(InvalidArgumentError) as info:
            clipscope.load("clipscope-tiny-rn", device="cuda")
        assert str(info.value) == ("device='cuda' is not valid: CUDA is not available on this machine "
                                   "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")

    def test_a_gpu_index_past_the_last_gpu_names_the_valid_range(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        with pytest.raises(InvalidArgumentError, match=r"device='cuda:2' is not valid: this machine has 2 CUDA "
                                                       r"device\(s\), cuda:0 to cuda:1"):
            resolve_device("cuda:2")
        assert resolve_device("cuda:1") == torch.device("cuda:1")

    def test_mps_on_a_machine_without_it_says_so(self, monkeypatch):
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        with pytest.raises(InvalidArgumentError, match="device='mps' is not valid: MPS is not available"):
            resolve_device("mps")

    @pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
    def test_valid_names_and_torch_devices_pass(self, device):
        assert resolve_device(device) == torch.device("cpu")

    def test_the_command_line_reports_a_bad_device_in_one_line(self, capsys):
        code = clipscope.cli.main(["layers", "--model", "clipscope-tiny-rn", "--device", "gpu"])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err == f"clipscope: error: device='gpu' is not valid: one of {DEVICE_CHOICES}\n"


class TestPrecisionAndPretrained:
    @pytest.mark.parametrize("precision", ["fp8", "float32", "FP16", None, 16])
    def test_an_unknown_precision_names_the_parameter_the_value_and_the_choices(self, precision):
        with pytest.raises(InvalidArgumentError) as info:
            clipscope.load("clipscope-tiny-rn", device="cpu", precision=precision)
        assert info.value.parameter == "precision"
        assert str(info.value) == f"precision={precision!r} is not valid: one of 'auto', 'fp32', 'fp16', 'bf16'"

    def test_auto_precision_still_depends_on_the_device(self):
        assert resolve_precision("auto", torch.device("cuda")) == torch.float16
        assert resolve_precision("auto", torch.device("cpu")) == torch.float32

    @pytest.mark.parametrize("pretrained", [3, ["openai"], b"openai"])
    def test_a_pretrained_that_is_neither_a_tag_nor_a_path_is_refused(self, pretrained):
        with pytest.raises(InvalidArgumentError, match=r"pretrained=.* is not valid: None, a pretrained tag or a "
                                                       r"checkpoint path"):
            clipscope.load("clipscope-tiny-rn", pretrained=pretrained, device="cpu")

    def test_the_organism_refuses_other_weights_naming_pretrained(self):
        with pytest.raises(InvalidArgumentError, match="pretrained='openai' is not valid: None: the organism"):
            clipscope.load("organism", pretrained="openai", device="cpu")


def _python_calls(message: str) -> list[ast.Call]:
    """Every ``clipscope.load(...)`` in ``message``, parsed as Python (the shortest span that parses)."""
    calls = []
    for match in re.finditer(r"clipscope\.load\(", message):
        ends = [i + 1 for i in range(match.end(), len(message)) if message[i] == ")"]
        for end in ends:
            try:
                calls.append(ast.parse(message[match.start():end], mode="eval").body)
                break
            except SyntaxError:
                continue
        else:
            pytest.fail(f"not valid Python: {message[match.start():match.start() + 100]!r}")
    return calls


def _call_arguments(call: ast.Call) -> tuple[list, dict]:
    """The literal arguments of a suggested call; a placeholder name (e.g. ARCH) is not a literal and fails."""
    return [ast.literal_eval(a) for a in call.args], {k.arg: ast.literal_eval(k.value) for k in call.keywords}


class TestMissingWeightsHint:
    @pytest.mark.parametrize("name,pretrained", [
        ("RN50", "openai"),
        ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
        ("hf:openai/clip-vit-large-patch14", None),
    ])
    def test_every_suggested_call_is_valid_python_and_the_first_loads_what_was_asked(
            self, name, pretrained, hf_cache, unreachable_hub):
        with pytest.raises(WeightsNotAvailableError) as info:
            clipscope.load(name, pretrained=pretrained, device="cpu")
        calls = _python_calls(str(info.value))
        assert len(calls) >= 3
        arguments = [_call_arguments(call) for call in calls]
        expected_kwargs = {} if pretrained is None else {"pretrained": pretrained}
        assert arguments[0] == ([name], expected_kwargs)
        assert (["organism"], {}) in arguments
        if pretrained is not None:  # the local-file alternative names the same architecture
            assert ([name], {"pretrained": "/path/to/weights.safetensors"}) in arguments
