"""The backend layer: each model family declares its architecture, and everything above asks the model.

Specification: blocks, pre-activation sites, prefix tokens and patch grid, attention sites and the
activations feature visualization may redirect come from the backend that loaded the model; site
names mean the same on every backend; a transformers ``preprocessor_config.json`` is read as
transformers reads it; ``optvis.render`` optimizes a unit at its site's pre-activation for every
caller, so a ResNet unit that is dead after its ReLU still moves.
"""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipscope
from clipscope import CheckpointError, Unit, backends, optvis
from clipscope.optvis.render import redirected_relus
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

PACKAGE = Path(clipscope.__file__).parent


class TestRegistry:
    @pytest.mark.parametrize("name, backend", [("hf:openai/clip-vit-base-patch32", "transformers"),
                                               ("hf:/some/folder", "transformers"), ("organism", "open_clip"),
                                               ("RN50", "open_clip"), ("hf-hub:timm/x", "open_clip")])
    def test_the_name_prefix_picks_the_backend(self, name, backend):
        assert backends.backend_for(name) == backend

    def test_models_say_which_backend_loaded_them(self, tiny_rn, organism):
        assert tiny_rn.backend == organism.backend == "open_clip"

    def test_the_backends_do_not_import_the_model_layer(self):
        """The model layer imports the backends, never the other way round (no import cycle)."""
        for path in (PACKAGE / "backends").glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    target = "." * node.level + (node.module or "")
                    assert target not in ("..model", "clipscope.model"), f"{path.name} imports {target}"

    def test_load_registers_the_configs_once(self, monkeypatch):
        import open_clip

        from clipscope.backends.open_clip import register_configs
        register_configs()
        calls = []
        monkeypatch.setattr(open_clip, "add_model_config", lambda folder: calls.append(folder))
        clipscope.load("clipscope-tiny-rn", device="cpu")
        clipscope.load("clipscope-tiny-vit", device="cpu")
        assert calls == []


class TestArchitecture:
    def test_resnet_blocks_are_its_stages_and_every_block_is_a_site(self, tiny_rn, organism):
        for model in (tiny_rn, organism):
            assert model.blocks() == [f"visual.layer{i}" for i in range(1, 5)]
            assert model.layers().blocks().names() == model.blocks()
            assert model.blocks("text") == model.layers().blocks("text").names() != []

    def test_a_bottleneck_and_its_stage_pre_activate_before_the_last_relu(self, tiny_rn):
        for site in ("visual.layer4", "visual.layer4.0"):
            pre = tiny_rn.pre_activation_site(site)
            assert pre == "visual.layer4.0.act3.pre"
            assert tiny_rn.site(pre).shape == tiny_rn.site(site).shape and tiny_rn.site(pre).point == "input"
        x = torch.rand(2, 3, *tiny_rn.image_size)
        acts = tiny_rn.activations(x, ["visual.layer4", "visual.layer4.0.act3.pre"])
        assert torch.equal(acts["visual.layer4"], acts["visual.layer4.0.act3.pre"].clamp(min=0))

    def test_sites_without_a_final_activation_are_their_own_pre_activation(self, tiny_rn, tiny_vit):
        assert tiny_rn.pre_activation_site("visual.layer4.0.conv3") == "visual.layer4.0.conv3"
        assert tiny_vit.pre_activation_site(tiny_vit.blocks()[-1]) == tiny_vit.blocks()[-1]
        with pytest.raises(InvalidArgumentError, match="visual.layer9.*Did you mean"):
            tiny_rn.pre_activation_site("visual.layer9")

    def test_a_pass_through_bottleneck_pre_activates_where_its_stage_computes(self):
        """open_clip initialises each bottleneck's last batch norm to 0, so in a random RN50 every block
        after a stage's first returns its input: the stage's value before its ReLU is the first block's."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rn50 = clipscope.load("RN50", device="cpu")
        assert rn50.pre_activation_site("visual.layer4") == "visual.layer4.0.act3.pre"
        assert rn50.pre_activation_site("visual.layer4.2") == "visual.layer4.0.act3.pre"

    def test_a_vit_declares_its_prefix_tokens_and_patch_grid(self, tiny_vit, tiny_rn):
        assert tiny_vit.prefix_tokens == 1 and tiny_vit.patch_grid == (4, 4)   # 32 px, 8 px patches
        tokens = tiny_vit.site(tiny_vit.blocks()[0]).shape[0]
        assert tokens == tiny_vit.prefix_tokens + 4 * 4
        assert tiny_rn.prefix_tokens == 0 and tiny_rn.patch_grid is None

    def test_attention_sites_are_sites_of_their_tower(self, tiny_vit, tiny_rn):
        for model, tower in ((tiny_vit, "visual"), (tiny_vit, "text"), (tiny_rn, "visual")):
            names = model.attention_sites(tower)
            assert names and all(model.site(n).tower == tower for n in names)
        assert len(tiny_vit.attention_sites()) == len(tiny_vit.blocks())

    def test_a_bad_tower_is_named(self, tiny_rn):
        with pytest.raises(InvalidArgumentError, match="tower='image'"):
            tiny_rn.blocks("image")

    def test_only_the_image_towers_relus_are_redirected(self, tiny_rn):
        relus = tiny_rn.redirectable_activations()
        assert relus and all(isinstance(m, torch.nn.ReLU) for m in relus)
        assert set(relus) == {m for m in tiny_rn.model.visual.modules() if isinstance(m, torch.nn.ReLU)}
        x = torch.rand(2, 3, *tiny_rn.image_size)
        with torch.no_grad():
            before = tiny_rn.encode_image(x)
            with redirected_relus(tiny_rn):
                assert all("forward" in vars(m) for m in relus)
                during = tiny_rn.encode_image(x)
        assert torch.equal(before, during) and not any("forward" in vars(m) for m in relus)


class TestModelView:
    def test_resize_to_input_is_what_preprocess_feeds_the_model(self, tiny_vit):
        image = make_images(1, size=57)[0].resize((57, 41))
        seen = tiny_vit.resize_to_input(image)
        assert seen.size == tuple(tiny_vit.image_size)[::-1] and seen.mode == "RGB"
        pixels = torch.from_numpy(np.array(seen)).permute(2, 0, 1).float() / 255
        assert torch.allclose(tiny_vit.normalize(pixels), tiny_vit.preprocess(image), atol=1 / 255 / 0.26 + 1e-6)

    def test_dataset_examples_place_tokens_on_the_models_patch_grid(self, tiny_vit):
        from clipscope.neurons.examples import dataset_examples, peak_cell
        site = tiny_vit.blocks()[0]
        result = dataset_examples(tiny_vit, make_images(6), site, k=2, units=[0], progress=False)
        se = result.sites[site]
        assert (se.prefix_tokens, se.patch_grid) == (1, (4, 4))
        assert peak_cell(se, 0) is None                       # the class token is not on the image
        assert peak_cell(se, 1) == ((0, 0), (4, 4)) and peak_cell(se, 16) == ((3, 3), (4, 4))
        keys = [e.key for e in result.top(site, 0)]
        assert [im.size for im in result.load(keys)] == [tuple(tiny_vit.image_size)[::-1]] * 2


# ---------------------------------------------------------------------------------------------
# Text encoding stops at the longest prompt of the batch


TEXTS = ["a cat", "a photo of a large red circle on a blue square", "x"]


@pytest.mark.parametrize("name", ["clipscope-tiny-rn", "clipscope-tiny-vit", "organism"])
def test_truncated_text_encoding_gives_the_full_contexts_embeddings(name, tiny_rn, tiny_vit, organism):
    model = {"clipscope-tiny-rn": tiny_rn, "clipscope-tiny-vit": tiny_vit, "organism": organism}[name]
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        full = torch.nn.functional.normalize(model.model.encode_text(tokens).float(), dim=-1).cpu()
    assert model.architecture.text_tokens_needed is not None
    assert torch.allclose(model.encode_text(TEXTS), full, atol=1e-5)


def test_the_text_tower_runs_only_up_to_the_last_end_of_text_token(tiny_vit):
    lengths = []
    handle = tiny_vit.model.transformer.register_forward_hook(lambda _m, _i, out: lengths.append(out.shape[1]))
    try:
        tiny_vit.encode_text(TEXTS)
    finally:
        handle.remove()
    assert lengths == [int(tiny_vit.tokenize(TEXTS).argmax(dim=-1).max()) + 1] and lengths[0] < 16


def test_text_sites_see_the_whole_context_while_captured_or_ablated(tiny_vit):
    block = tiny_vit.blocks("text")[0]
    with tiny_vit.capture(block) as acts:
        tiny_vit.encode_text(TEXTS)
    assert acts[block].shape[1] == tiny_vit.site(block).shape[0] == 16
    with tiny_vit.ablate(Unit.neuron(block, 0, token=15)):
        ablated = tiny_vit.encode_text(TEXTS)   # position 15 is after every end-of-text: no effect, no error
    assert torch.allclose(ablated, tiny_vit.encode_text(TEXTS), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# optvis resolves the optimization site for every caller


def test_render_optimizes_a_resnet_unit_before_its_relu_and_names_it_as_asked(tiny_rn):
    unit = Unit.channel("visual.layer4", 3)
    result = optvis.render(tiny_rn, unit, steps=2, progress=False)
    assert result.units == [unit] and result.labels == ["visual.layer4[3]"]
    same = optvis.render(tiny_rn, Unit.channel("visual.layer4.0.act3.pre", 3), steps=2, progress=False)
    assert torch.equal(result.images, same.images)     # the same image as asking for the pre-activation
    exact = optvis.render(tiny_rn, unit, steps=2, progress=False, exact_site=True)
    assert bool((exact.trace >= 0).all())              # read after the ReLU
    with pytest.raises(InvalidArgumentError, match="exact_site='yes'"):
        optvis.render(tiny_rn, unit, steps=1, progress=False, exact_site="yes")


@pytest.mark.slow
def test_render_moves_a_dead_unit_of_a_random_rn50_off_zero():
    """A random-init RN50 (open_clip's init): some units of ``visual.layer4`` are 0 on the starting
    image, with no gradient. Asked for at ``visual.layer4``, such a unit is optimized before the ReLU,
    so its objective is not 0 and rises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rn50 = clipscope.load("RN50", device="cpu")
    torch.manual_seed(0)
    start = optvis.render(rn50, Unit.channel("visual.layer4", 0), steps=1, size=64, lr=0.0, progress=False).images
    pre = rn50.pre_activation_site("visual.layer4")
    acts = rn50.activations(optvis.transform.ClipInput(rn50)(start), ["visual.layer4", pre])
    dead = int((acts["visual.layer4"][0].mean(dim=(1, 2)) == 0).nonzero()[0])   # same seed: same start image
    unit = Unit.channel("visual.layer4", dead)
    assert float(unit.read(acts[pre], "conv")[0]) < 0
    moved = optvis.render(rn50, unit, steps=3, size=64, progress=False)
    assert float(moved.trace[-1, 0]) != 0.0 and float(moved.trace[-1, 0]) > float(moved.trace[0, 0])


# ---------------------------------------------------------------------------------------------
# transformers: one meaning per name, preprocessing as transformers does it


transformers = pytest.importorskip("transformers")
from .test_hf import hf_folder, hf_model  # noqa: E402,F401  (the tiny transformers CLIP fixtures)


def test_visual_and_text_are_the_projected_embeddings_on_every_backend(hf_model, tiny_vit):  # noqa: F811
    for model in (hf_model, tiny_vit):
        images = make_images(2)
        with model.capture(["visual"]) as acts:
            embedding = model.encode_image(images, normalize=False)
        assert model.site("visual").layout == "vector" and model.site("visual").shape == (model.embed_dim,)
        assert torch.allclose(acts["visual"].float().cpu(), embedding, atol=1e-5)
    with hf_model.capture("text") as acts:
        embedding = hf_model.encode_text(["a cat"], normalize=False)
    assert torch.allclose(acts["text"].float().cpu(), embedding, atol=1e-5)
    assert hf_model.blocks() == ["visual.encoder.layers.0", "visual.encoder.layers.1"]
    assert (hf_model.prefix_tokens, hf_model.patch_grid) == (1, (4, 4))
    assert hf_model.attention_sites("text") == ["text.encoder.layers.0.self_attn"]


MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _config(tmp_path, **cfg) -> Path:
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"image_mean": MEAN, "image_std": STD, **cfg}))
    return path


def _image(width: int = 53, height: int = 37) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _normalized(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("resample", range(6))
def test_every_pil_resample_code_is_the_pil_filter(tmp_path, resample):
    from clipscope.backends.transformers import preprocess_from_config
    path = _config(tmp_path, size={"height": 20, "width": 30}, do_center_crop=False, resample=resample)
    transform, size, _, _ = preprocess_from_config(path, input_size=32)
    expected = _normalized(_image().resize((30, 20), resample=Image.Resampling(resample)))
    assert size == (20, 30)
    assert torch.allclose(transform(_image()), expected, atol=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(size={"height": 20, "width": 30}, do_center_crop=False, resample=3),
    dict(size={"height": 24, "width": 24}, crop_size={"height": 20, "width": 20}, do_center_crop=True, resample=2),
    dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_center_crop=True, resample=1),
])
def test_sizes_are_read_as_transformers_reads_them(tmp_path, cfg):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from clipscope.backends.transformers import preprocess_from_config
    transform, size, _, _ = preprocess_from_config(_config(tmp_path, **cfg), input_size=24)
    reference = CLIPImageProcessorPil(image_mean=MEAN, image_std=STD, **cfg)(_image(54, 38), return_tensors="pt")
    expected = reference["pixel_values"][0]
    assert tuple(expected.shape[-2:]) == size
    assert torch.allclose(transform(_image(54, 38)), expected, atol=1e-5)


def test_without_a_crop_every_image_has_the_size_the_model_reports(tmp_path):
    from clipscope.backends.transformers import preprocess_from_config
    transform, size, _, _ = preprocess_from_config(
        _config(tmp_path, size={"shortest_edge": 32}, do_center_crop=False), input_size=32)
    assert size == (32, 32)
    for w, h in ((53, 37), (20, 90), (32, 32)):
        assert tuple(transform(_image(w, h)).shape) == (3, 32, 32)


def test_an_unknown_resample_code_is_named_with_its_file(tmp_path):
    from clipscope.backends.transformers import preprocess_from_config
    path = _config(tmp_path, resample=7)
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json.*resample=7 .*5 hamming"):
        preprocess_from_config(path, input_size=32)
