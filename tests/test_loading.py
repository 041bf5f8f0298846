"""clipscope.load(): every name form, devices and precisions, clear errors, safe loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipscope
from clipscope import UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
from clipscope.backends.open_clip import register_configs
from clipscope.model import resolve_device, resolve_precision

from .conftest import DEVICE, make_images


def _random_open_clip(arch: str, seed: int = 1):
    register_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(arch)


def _same_weights(loaded: clipscope.ClipModel, reference) -> bool:
    ref = reference.state_dict()
    # the loaded model may sit on a GPU in fp16 (device and precision 'auto'): compare in its dtype
    return all(torch.equal(v.cpu(), ref[k].to(v.dtype)) for k, v in loaded.model.state_dict().items())


def _open_clip_folder(parent, folder_name: str, model, weights_name="open_clip_model.safetensors",
                      arch: str = "clipscope-tiny-vit"):
    """A folder in open_clip's hub layout: open_clip_config.json plus a weights file."""
    folder = parent / folder_name
    folder.mkdir()
    cfg = open_clip.get_model_config(arch)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(sd, folder / weights_name)
    else:
        torch.save(sd, folder / weights_name)
    return folder


class TestNameForms:
    def test_tiny_configs_load_as_clip_models(self, tiny):
        assert isinstance(tiny, clipscope.ClipModel)
        assert tiny.device.type == torch.device(DEVICE).type
        assert tiny.encode_text(["a cat"]).shape == (1, 32)

    def test_local_checkpoint_safetensors_and_state_dict(self, tmp_path):
        ref = _random_open_clip("clipscope-tiny-vit")
        sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
        save_file(sd, tmp_path / "w.safetensors")
        torch.save(sd, tmp_path / "w.pt")
        for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
            model = clipscope.load("clipscope-tiny-vit", pretrained=str(path))
            assert _same_weights(model, ref)

    def test_local_folder_with_open_clip_config(self, tmp_path):
        ref = _random_open_clip("clipscope-tiny-rn")
        folder = _open_clip_folder(tmp_path, "tiny-rn", ref, arch="clipscope-tiny-rn")
        assert _same_weights(clipscope.load(str(folder)), ref)

    def test_hf_hub_ids_load_from_the_cache_offline(self, hf_cache, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        for seed, (repo, weights) in enumerate([("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors"),
                                                ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin")]):
            ref = _random_open_clip("clipscope-tiny-vit", seed=seed + 1)
            folder = _open_clip_folder(hf_cache.cache.parent, repo.replace("/", "_"), ref, weights)
            hf_cache(repo, {f.name: f for f in folder.iterdir()})
            model = clipscope.load(f"hf-hub:{repo}")
            assert _same_weights(model, ref)
            assert model.name == f"hf-hub:{repo}"

    def test_hf_hub_id_downloads_through_the_hub_client_when_not_cached(self, hf_cache, reachable_hub,
                                                                       monkeypatch, tmp_path):
        import huggingface_hub
        ref = _random_open_clip("clipscope-tiny-vit")
        folder = _open_clip_folder(tmp_path, "remote", ref)
        calls = []

        def fake_download(repo_id, filename, revision=None, **_):
            calls.append((repo_id, filename))
            snapshot = hf_cache(repo_id, {filename: folder / filename})
            return str(snapshot / filename)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
        model = clipscope.load("hf-hub:timm/vit_base_patch16_clip_224.openai")
        assert calls == [("timm/vit_base_patch16_clip_224.openai", "open_clip_config.json"),
                         ("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors")]
        assert _same_weights(model, ref)

    @pytest.mark.slow
    def test_openai_tag_resolves_to_its_hub_repo_and_quick_gelu(self, hf_cache, reachable_hub, monkeypatch,
                                                               tmp_path):
        import huggingface_hub
        ref = _random_open_clip("RN50")
        weights = tmp_path / "rn50.safetensors"
        save_file({k: v.half().contiguous() for k, v in ref.state_dict().items()}, weights)
        calls = []

        def fake_download(repo_id, filename, revision=None, **_):
            calls.append((repo_id, filename))
            snapshot = hf_cache(repo_id, {filename: weights})
            return str(snapshot / filename)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
        model = clipscope.load("RN50", pretrained="openai")
        assert calls == [("timm/resnet50_clip.openai", "open_clip_model.safetensors")]
        assert type(model.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
        assert model.pretrained == "openai"
        assert model.encode_image(make_images(1)).shape == (1, 1024)

    def test_random_init_of_a_real_architecture_warns(self):
        with pytest.warns(UserWarning, match="randomly initialised"):
            clipscope.load("RN50", device="cpu")


class TestDeviceAndPrecision:
    def test_auto_prefers_cuda_then_mps_then_cpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("auto").type == "cuda"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        assert resolve_device("auto").type == "mps"
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        assert resolve_device("auto").type == "cpu"

    def test_precision_names(self):
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        assert resolve_precision("auto", cpu) == torch.float32
        assert resolve_precision("auto", cuda) == torch.float16
        assert resolve_precision("bf16", cpu) == torch.bfloat16
        with pytest.raises(ValueError, match="'fp32', 'fp16', 'bf16'"):
            resolve_precision("fp8", cpu)

    @pytest.mark.parametrize("precision", ["bf16", "fp16"])
    def test_low_precision_models_run_and_return_float32(self, precision):
        model = clipscope.load("clipscope-tiny-vit", precision=precision)
        assert next(model.model.parameters()).dtype == resolve_precision(precision, torch.device("cpu"))
        emb = model.encode_image(make_images(2))
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
        assert model.zero_shot(make_images(2), ["a", "b"]).probs.sum(1).allclose(torch.ones(2), atol=1e-3)


class TestErrors:
    def test_unknown_name_suggests_close_matches(self):
        with pytest.raises(UnknownModelError, match="ViT-B-32") as info:
            clipscope.load("ViT-B-33")
        assert "organism" in str(info.value) and "hf-hub:" in str(info.value)

    def test_unknown_tag_lists_the_valid_tags(self):
        with pytest.raises(UnknownModelError, match="'openai'"):
            clipscope.load("ViT-B-32", pretrained="opnai")

    def test_missing_checkpoint_file_is_named(self):
        with pytest.raises(UnknownModelError, match="no such checkpoint file"):
            clipscope.load("ViT-B-32", pretrained="/nope/weights.safetensors")

    def test_bare_checkpoint_file_asks_for_the_architecture(self, tmp_path):
        path = tmp_path / "w.safetensors"
        save_file({"x": torch.zeros(1)}, path)
        with pytest.raises(UnknownModelError, match=r"clipscope.load\(ARCH, pretrained="):
            clipscope.load(str(path))

    def test_not_cached_and_hub_unreachable_fails_with_one_readable_message(self, hf_cache, unreachable_hub):
        for name, pretrained in [("ViT-B-32", "openai"), ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
                                 ("hf:openai/clip-vit-large-patch14", None)]:
            with pytest.raises(WeightsNotAvailableError) as info:
                clipscope.load(name, pretrained=pretrained)
            text = str(info.value)
            assert "cannot connect" in text and str(hf_cache.cache) in text
            assert "HF_HUB_OFFLINE" in text and "clipscope.load('organism')" in text
            assert info.value.__cause__ is None and info.value.__context__ is None  # no chained hub errors

    def test_offline_mode_fails_without_touching_the_network(self, hf_cache, monkeypatch):
        import socket
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
        with pytest.raises(WeightsNotAvailableError, match="offline mode is on"):
            clipscope.load("RN50", pretrained="openai")

    def test_offline_error_in_a_fresh_process_is_one_message(self, tmp_path):
        """With the network unreachable, a fresh interpreter gets one error: no retries, no hub stack."""
        code = textwrap.dedent("""
            import clipscope
            clipscope.load("ViT-L-14", pretrained="openai")
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "WeightsNotAvailableError" in proc.stderr and "timm/vit_large_patch14_clip_224.openai" in proc.stderr
        assert proc.stderr.count("Traceback") == 1 and "Retrying" not in proc.stderr


class TestSafeLoading:
    def test_malicious_pickle_checkpoint_is_refused_and_never_runs(self, tmp_path):
        sentinel = tmp_path / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {sentinel}",))

        ref = _random_open_clip("clipscope-tiny-vit")
        sd = dict(ref.state_dict())
        sd["payload"] = Payload()
        torch.save(sd, tmp_path / "evil.pt")
        with pytest.raises(UnsafeCheckpointError, match="safetensors"):
            clipscope.load("clipscope-tiny-vit", pretrained=str(tmp_path / "evil.pt"))
        assert not sentinel.exists()

    def test_malicious_pickle_in_a_hub_repo_is_refused(self, hf_cache, monkeypatch, tmp_path):
        sentinel = tmp_path / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {sentinel}",))

        ref = _random_open_clip("clipscope-tiny-vit")
        folder = _open_clip_folder(tmp_path, "evil", ref, "open_clip_pytorch_model.bin")
        torch.save({**ref.state_dict(), "payload": Payload()}, folder / "open_clip_pytorch_model.bin")
        hf_cache("evil/repo", {f.name: f for f in folder.iterdir()})
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(UnsafeCheckpointError):
            clipscope.load("hf-hub:evil/repo")
        assert not sentinel.exists()


class TestModelFromEnvironment:
    @pytest.mark.parametrize("spec,expected", [
        ("organism", ("organism", None)), ("RN50x4/openai", ("RN50x4", "openai")),
        ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None)),
        ("hf:openai/clip-vit-large-patch14", ("hf:openai/clip-vit-large-patch14", None)),
    ])
    def test_model_specs_split_name_and_tag(self, spec, expected):
        assert clipscope.parse_model_spec(spec) == expected

    def test_the_variable_picks_the_model(self, monkeypatch):
        monkeypatch.setenv("CLIPSCOPE_MODEL", "clipscope-tiny-vit")
        assert clipscope.load_from_env().name == "clipscope-tiny-vit"
