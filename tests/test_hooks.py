"""Sites, units, capture and ablation: one code path for ResNet and ViT, both towers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipscope import Unit
from clipscope.hooks import HookedModel, Tower

from .conftest import make_images


def _batch(model, n=4):
    return torch.stack([model.preprocess(im) for im in make_images(n)])


class TestLayers:
    def test_resnet_sites_cover_both_towers_with_layouts(self, tiny_rn):
        layers = {s.name: s for s in tiny_rn.layers()}
        assert layers["visual.layer4.0"].layout == "conv" and layers["visual.layer4.0"].shape == (256, 2, 2)
        assert layers["visual.layer4.0.act3.pre"].point == "input"
        assert layers["visual.attnpool"].layout == "vector"
        assert layers["text.transformer.resblocks.0.mlp.c_fc"].shape == (16, 128)
        assert {s.tower for s in tiny_rn.layers()} == {"visual", "text"}

    def test_vit_sites_are_batch_first_tokens(self, tiny_vit):
        site = tiny_vit.site("visual.transformer.resblocks.1.mlp.c_fc")
        assert site.layout == "tokens" and site.shape == (17, 64) and site.n_units == 64

    def test_layers_render_as_a_table(self, tiny_vit):
        frame = tiny_vit.layers().filter(tower="visual", layout="tokens").to_frame()
        assert set(frame["layout"]) == {"tokens"} and "visual.ln_post" in set(frame["name"])

    def test_blocks_are_the_top_level_stages_in_forward_order(self, tiny_rn, tiny_vit):
        rn = tiny_rn.layers().blocks().names()
        assert rn == [f"visual.layer{i}" for i in range(1, len(rn) + 1)] and len(rn) == 4
        vit = tiny_vit.layers().blocks().names()
        assert vit == [f"visual.transformer.resblocks.{i}" for i in range(len(vit))] and len(vit) >= 2
        text = tiny_vit.layers().blocks("text").names()
        assert text and all(n.startswith("text.transformer.resblocks.") for n in text)

    def test_unknown_site_suggests_close_names(self, tiny_rn):
        with pytest.raises(ValueError, match="visual.layer4.0"):
            tiny_rn.site("visual.layer4.O")


class TestActivationsStopEarly:
    def test_same_values_as_a_full_pass_and_later_blocks_never_run(self, tiny):
        blocks = tiny.layers().blocks().names()
        lower, last = blocks[0], blocks[-1]
        x = _batch(tiny)
        with tiny.capture(lower) as full:
            tiny.encode_image(x)
        ran = []
        handle = tiny._hooked._module(tiny.site(last)).register_forward_hook(lambda *_: ran.append(1))
        try:
            acts = tiny.activations(x, lower)
        finally:
            handle.remove()
        assert torch.equal(acts[lower], full[lower]) and ran == []
        # the deepest of several sites decides where the pass stops
        both = tiny.activations(x, [last, lower])
        assert torch.equal(both[lower], full[lower]) and both[last].shape == (4, *tiny.site(last).shape)

    def test_gradients_flow_to_the_input_and_ablations_apply(self, tiny):
        site = tiny.layers().blocks().names()[0]
        x = _batch(tiny).requires_grad_(True)
        tiny.read(Unit.channel(site, 1), tiny.activations(x, site, grad=True)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        with tiny.ablate(Unit.channel(site, 1)):
            assert (tiny.read(Unit.channel(site, 1), tiny.activations(x.detach(), site)) == 0).all()

    def test_bad_calls_say_what_is_wrong(self, tiny_rn):
        with pytest.raises(ValueError, match="not image-tower sites"):
            tiny_rn.activations(_batch(tiny_rn), "text.transformer.resblocks.0")
        with pytest.raises(TypeError, match="preprocessed"):
            tiny_rn.activations(make_images(2), "visual.layer1")
        with pytest.raises(ValueError, match="never reached"):
            tiny_rn._hooked.run_until(lambda: None, "visual.layer1")

    def test_no_sites_means_no_forward_pass(self, tiny_rn):
        called = []
        assert len(tiny_rn._hooked.run_until(lambda: called.append(1), [])) == 0 and called == []


class TestCapture:
    def test_captured_shapes_match_layers(self, tiny):
        names = [s.name for s in tiny.layers()][:12]
        x = _batch(tiny)
        with tiny.capture(names) as acts:
            tiny.encode_image(x)
            tiny.encode_text(["a", "b", "c", "d"])
        for name in names:
            assert acts[name].shape == (4, *tiny.site(name).shape)

    def test_batched_encoding_accumulates_every_batch(self, tiny_rn):
        with tiny_rn.capture("visual.layer3") as acts:
            tiny_rn.encode_image(make_images(5), batch_size=2)
        assert acts["visual.layer3"].shape[0] == 5

    def test_pre_relu_values_survive_the_in_place_relu(self, tiny_rn):
        x = _batch(tiny_rn)
        block = "visual.layer4.0"
        with tiny_rn.capture([f"{block}.act3.pre", f"{block}.act3", f"{block}.bn3", f"{block}.downsample"]) as acts:
            tiny_rn.encode_image(x)
        pre, post = acts[f"{block}.act3.pre"], acts[f"{block}.act3"]
        assert (pre < 0).any() and (post >= 0).all()
        assert torch.allclose(pre.relu(), post)
        # bn3's output is modified in place by `out += identity`; the capture kept the value before that
        assert torch.allclose(acts[f"{block}.bn3"] + acts[f"{block}.downsample"], pre, atol=1e-5)

    def test_no_grad_captures_are_detached_and_grad_captures_backpropagate(self, tiny):
        site = "visual.layer3" if "layer3" in str(tiny.layers().names()) else "visual.transformer.resblocks.0"
        x = _batch(tiny).requires_grad_(True)
        with tiny.capture(site) as acts:
            tiny.encode_image(x)
        assert not acts[site].requires_grad
        with tiny.capture(site, grad=True) as acts:
            tiny.encode_image(x)
        tiny.read(Unit(site, index=1), acts).sum().backward()
        assert x.grad.abs().sum() > 0

    def test_hooks_are_removed_after_the_block(self, tiny_vit):
        with tiny_vit.capture("visual.ln_post"):
            pass
        assert all(not m._forward_hooks for m in tiny_vit.model.modules())


class TestUnits:
    def test_reading_a_channel_a_position_and_a_direction(self, tiny_rn):
        with tiny_rn.capture("visual.layer4.0") as acts:
            tiny_rn.encode_image(_batch(tiny_rn))
        a = acts["visual.layer4.0"]
        assert torch.allclose(tiny_rn.read(Unit.channel("visual.layer4.0", 7), acts), a[:, 7].mean(dim=(1, 2)))
        assert torch.equal(tiny_rn.read(Unit.channel("visual.layer4.0", 7, position=(1, 0)), acts), a[:, 7, 1, 0])
        d = torch.zeros(256)
        d[7] = 2.0
        assert torch.allclose(tiny_rn.read(Unit.along("visual.layer4.0", d), acts), 2 * a[:, 7].mean(dim=(1, 2)))

    def test_reading_a_vit_neuron_at_a_token(self, tiny_vit):
        site = "visual.transformer.resblocks.0.mlp.c_fc"
        with tiny_vit.capture(site) as acts:
            tiny_vit.encode_image(_batch(tiny_vit))
        assert torch.equal(tiny_vit.read(Unit.neuron(site, 5, token=0), acts), acts[site][:, 0, 5])
        patches = acts[site][:, tiny_vit.prefix_tokens:, 5].mean(1)  # the default token_pool (tests/test_token_pool.py)
        assert torch.allclose(tiny_vit.read(Unit.neuron(site, 5), acts), patches)

    @pytest.mark.parametrize("unit,message", [
        (Unit.channel("visual.layer4.0", 256), r"valid: 0..255"),
        (Unit.channel("visual.layer4.0", 3, position=(5, 5)), "outside"),
        (Unit.neuron("visual.layer4.0", 3, token=2), "needs a tokens site"),
        (Unit.along("visual.layer4.0", torch.ones(10)), "256 channels"),
        (Unit("visual.layer4.0"), "selects nothing"),
    ])
    def test_bad_units_are_refused_naming_the_valid_range(self, tiny_rn, unit, message):
        with pytest.raises(ValueError, match=message):
            with tiny_rn.ablate(unit):
                pass


class TestAblation:
    def test_zeroing_a_channel_changes_the_output_and_only_that_channel(self, tiny_rn):
        x = _batch(tiny_rn)
        site = "visual.layer3.0"
        with tiny_rn.capture(site) as clean:
            before = tiny_rn.encode_image(x)
        busiest = int(clean[site].mean(dim=(0, 2, 3)).argmax())  # a live channel (ReLU can leave some dead)
        with tiny_rn.ablate(Unit.channel(site, busiest)), tiny_rn.capture(site) as ablated:
            during = tiny_rn.encode_image(x)
        assert (ablated[site][:, busiest] == 0).all()
        others = [c for c in range(ablated[site].shape[1]) if c != busiest]
        assert torch.equal(ablated[site][:, others], clean[site][:, others])
        assert not torch.allclose(before, during)
        assert torch.allclose(tiny_rn.encode_image(x), before)  # restored after the block

    def test_ablating_a_pre_relu_site_zeroes_the_post_relu_channel(self, tiny_rn):
        with tiny_rn.ablate(Unit.channel("visual.layer4.0.act3.pre", 9)), \
                tiny_rn.capture("visual.layer4.0") as acts:
            tiny_rn.encode_image(_batch(tiny_rn))
        assert (acts["visual.layer4.0"][:, 9] == 0).all()

    def test_patching_a_spatial_position_and_a_vit_token(self, tiny_rn, tiny_vit):
        with tiny_rn.ablate(Unit.channel("visual.layer2.0", 1, position=(0, 0)), value=5.0), \
                tiny_rn.capture("visual.layer2.0") as acts:
            tiny_rn.encode_image(_batch(tiny_rn))
        a = acts["visual.layer2.0"]
        assert (a[:, 1, 0, 0] == 5.0).all() and (a[:, 1, 1, 1] != 5.0).all()
        site = "visual.transformer.resblocks.0"
        with tiny_vit.ablate(Unit.token_at(site, 0)), tiny_vit.capture(site) as acts:
            tiny_vit.encode_image(_batch(tiny_vit))
        assert (acts[site][:, 0] == 0).all() and (acts[site][:, 1] != 0).any()

    def test_ablating_a_direction_removes_only_that_component(self, tiny_vit):
        site = "visual.ln_post"
        d = torch.randn(32)
        x = _batch(tiny_vit)
        with tiny_vit.capture(site) as clean:
            tiny_vit.encode_image(x)
        with tiny_vit.ablate(Unit.along(site, d)), tiny_vit.capture(site) as acts:
            tiny_vit.encode_image(x)
        ablated, clean = acts[site].float().cpu(), clean[site].float().cpu()  # captures stay on the model's device
        unit_d = d / d.norm()
        atol = 1e-5 if tiny_vit.dtype == torch.float32 else 1e-2
        assert torch.allclose(ablated @ unit_d, torch.zeros(4, 17), atol=atol)
        residual = clean - (clean @ unit_d).unsqueeze(-1) * unit_d
        assert torch.allclose(ablated, residual, atol=atol)

    def test_ablation_works_in_batched_no_grad_encoding(self, tiny_vit):
        images = make_images(5)
        clean = tiny_vit.encode_image(images, batch_size=2)
        with tiny_vit.ablate(Unit.neuron("visual.transformer.resblocks.1.mlp.c_fc", 0)):
            ablated = tiny_vit.encode_image(images, batch_size=2)
        assert ablated.shape == clean.shape and not torch.allclose(ablated, clean)


class TestSequenceFirstModels:
    """Models that run their transformer as (L, B, D) are handed out batch-first, once, here."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):  # x: (B, L, D)
            return self.block(x.transpose(0, 1)).transpose(0, 1)

    def test_layout_is_canonicalised_for_capture_read_and_ablate(self):
        torch.manual_seed(0)
        net = self.SeqFirst()
        hooked = HookedModel(net, [Tower("visual", {"block": "visual.block"}, lambda b: net(torch.zeros(b, 5, 4)))])
        site = hooked.site("visual.block")
        assert site.seq_first and site.layout == "tokens" and site.shape == (5, 4)
        x = torch.randn(2, 5, 4)
        with hooked.capture("visual.block") as acts:
            out = net(x)
        assert torch.equal(acts["visual.block"], out)
        with hooked.ablate(Unit.neuron("visual.block", 2, token=1)):
            ablated = net(x)
        assert (ablated[:, 1, 2] == 0).all() and torch.equal(ablated[:, 0], out[:, 0])
