"""Public SAE formats (clipscope.sae.formats): files written here with random weights in each library's layout
load with the same encode/decode outputs as that library's own formulas, and hook names map onto clipscope sites."""
from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save_file

import clipscope
from clipscope.sae import SparseAutoencoder
from clipscope.sae.formats import HOOK_SITES, load_sae, site_for_hook
from clipscope.validate import InvalidArgumentError

D_IN, D_SAE = 16, 48


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4, "b_enc": torch.randn(D_SAE, generator=g) / 4,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 4, "b_dec": torch.randn(D_IN, generator=g)}


def library_encode(t: dict[str, torch.Tensor], x: torch.Tensor, *, subtract_b_dec: bool, k: int | None) -> torch.Tensor:
    """The libraries' own encoders, written out: ReLU, or TopK then ReLU (SAELens; saev's TopK without ReLU agrees
    wherever the k-th largest pre-activation is positive)."""
    pre = ((x - t["b_dec"]) if subtract_b_dec else x) @ t["W_enc"] + t["b_enc"]
    if k is None:
        return torch.relu(pre)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def check_same_maps(sae: SparseAutoencoder, t: dict[str, torch.Tensor], *, subtract_b_dec: bool, k: int | None):
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(9)) * 2
    f = library_encode(t, x, subtract_b_dec=subtract_b_dec, k=k)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f, atol=1e-6)
        assert torch.allclose(sae.decode(f), f @ t["W_dec"] + t["b_dec"], atol=1e-6)
    assert int((f > 0).sum()) > 0


def write_saelens(folder, cfg: dict, tensors: dict, weights: str = "sae_weights.safetensors", config: str = "cfg.json"):
    folder.mkdir()
    (folder / config).write_text(json.dumps(cfg))
    save_file(tensors, str(folder / weights))
    return folder


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard_round_trip(tmp_path, apply_b_dec):
    t = random_tensors(1)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.2.hook_resid_post", "architecture": "standard",
           "activation_fn_str": "relu", "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "model_name": "open-clip:ViT-B-32", "dtype": "float32"}
    sae = load_sae(write_saelens(tmp_path / "sl", cfg, t))
    assert sae.site == "visual.transformer.resblocks.2.resid_post" and sae.activation == "relu"
    check_same_maps(sae, t, subtract_b_dec=apply_b_dec, k=None)


def test_saelens_topk_round_trip_and_clipscope_resave(tmp_path):
    t = random_tensors(2)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_mlp_out", "architecture": "topk", "k": 5,
           "apply_b_dec_to_input": True}
    sae = load_sae(write_saelens(tmp_path / "sl", cfg, t))
    assert sae.site == "visual.transformer.resblocks.0.mlp" and sae.k == 5
    check_same_maps(sae, t, subtract_b_dec=True, k=5)
    sae.save(tmp_path / "ours")
    check_same_maps(load_sae(tmp_path / "ours"), t, subtract_b_dec=True, k=5)


def test_vit_prisma_layout_round_trip(tmp_path):
    t = random_tensors(3)
    cfg = {"d_in": D_IN, "expansion_factor": 3, "hook_point": "blocks.3.mlp.hook_post", "hook_point_layer": 3,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}, "cls_token_only": False,
           "use_patches_only": True}
    sae = load_sae(write_saelens(tmp_path / "prisma", cfg, t, weights="weights.safetensors", config="config.json"))
    assert sae.site == "visual.transformer.resblocks.3.mlp.gelu" and sae.tokens == "patches"
    check_same_maps(sae, t, subtract_b_dec=True, k=7)


@pytest.mark.parametrize("activation", [{"cls": "Relu", "params": {}}, {"cls": "TopK", "params": {"top_k": 6}}])
def test_saev_converted_round_trip(tmp_path, activation):
    t = random_tensors(4)
    header = {"schema": 2, "cfg": {"d_vit": D_IN, "exp_factor": 3, "activation": activation}, "lib": "x"}
    (tmp_path / "sae.json").write_text(json.dumps(header))
    save_file(t, str(tmp_path / "sae.safetensors"))
    site = "visual.transformer.resblocks.1.resid_post"
    sae = load_sae(tmp_path / "sae.json", site=site)          # saev's forward: relu((x - b_dec) W_enc + b_enc)
    assert sae.site == site
    check_same_maps(sae, t, subtract_b_dec=True, k=activation["params"].get("top_k"))
    latest = load_sae(tmp_path / "sae.json", site=site, saev_subtract_b_dec=False)   # its latest encode reads x
    check_same_maps(latest, t, subtract_b_dec=False, k=activation["params"].get("top_k"))
    with pytest.raises(InvalidArgumentError, match="pass site="):
        load_sae(tmp_path / "sae.json")


def test_saev_pickle_is_refused_with_how_to_convert(tmp_path):
    path = tmp_path / "sae.pt"
    buffer = io.BytesIO()
    torch.save(random_tensors(5), buffer)
    path.write_bytes(json.dumps({"schema": 2, "cfg": {"d_vit": D_IN}}).encode() + b"\n" + buffer.getvalue())
    with pytest.raises(InvalidArgumentError) as caught:
        load_sae(path, site="visual.transformer.resblocks.1.resid_post")
    assert "pickle" in str(caught.value) and "safetensors.torch.save_file" in str(caught.value)


def test_pickled_weights_in_a_folder_are_refused(tmp_path):
    folder = tmp_path / "sl"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_pre"}))
    torch.save(random_tensors(), str(folder / "sae_weights.pt"))
    with pytest.raises(InvalidArgumentError, match="pickle"):
        load_sae(folder)


def test_unsupported_architectures_and_unknown_hooks(tmp_path):
    t = random_tensors()
    jump = write_saelens(tmp_path / "j", {"hook_name": "blocks.0.hook_resid_pre", "architecture": "jumprelu"}, t)
    with pytest.raises(InvalidArgumentError, match="jumprelu"):
        load_sae(jump)
    odd = write_saelens(tmp_path / "o", {"hook_name": "blocks.0.attn.hook_z", "architecture": "standard"}, t)
    with pytest.raises(InvalidArgumentError, match="pass site=") as caught:
        load_sae(odd)
    assert caught.value.parameter == "site"
    assert load_sae(odd, site="visual.transformer.resblocks.0.attn.z").site == "visual.transformer.resblocks.0.attn.z"
    with pytest.raises(InvalidArgumentError, match="path"):
        load_sae(tmp_path / "missing")


@pytest.fixture(scope="module")
def vit() -> clipscope.ClipModel:
    return clipscope.load("organism-vit")


def test_hook_names_map_onto_the_vit_organism_sites(vit):
    model = vit
    names = set(model.layers().names())
    for layer in range(len(model.blocks("visual"))):
        for hook in HOOK_SITES:
            site = site_for_hook(f"blocks.{layer}.{hook}", model)
            assert site in names, (hook, site)
            assert site == site_for_hook(f"blocks.{layer}.{hook}")      # open_clip names without the model
    assert site_for_hook("blocks.3.hook_resid_post", model) == "visual.transformer.resblocks.3.resid_post"
    assert model.site(site_for_hook("blocks.1.mlp.hook_post", model)).module_type == "GELU"
    with pytest.raises(InvalidArgumentError, match="block 9"):
        site_for_hook("blocks.9.hook_resid_post", model)


def test_load_with_a_model_checks_the_width(tmp_path, vit):
    t = random_tensors()
    folder = write_saelens(tmp_path / "sl", {"hook_name": "blocks.0.hook_resid_post"}, t)
    with pytest.raises(InvalidArgumentError, match="16 units"):
        load_sae(folder, model=vit)
