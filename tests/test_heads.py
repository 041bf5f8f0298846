"""Head-level sites of transformer blocks: attention patterns, per-head values and outputs, the residual
stream, and head units (capture, read, zero-, mean-ablation and patching), on open_clip and transformers.

Known answers throughout: the explicit attention must equal the fused kernel it replaces; the heads'
results plus the output bias must sum to the attention output; the residual aliases must differ by the
attention and MLP outputs; ablated and patched values are checked against hand computations.
Tolerance: the contract's 1e-5 (fp32). Measured on CPU: explicit vs fused at most 6e-7 (tiny ViT
embeddings; 0 for open_clip's attention outputs, whose fused path does the same arithmetic; 4e-7 on a
random ViT-B/32 in transformers); a converted random ViT-B/32 vs its open_clip original 2.4e-6 (image)
and 3.2e-6 (text) on unnormalized embeddings of size up to 3, the same patterns and head results (every
block runs the same explicit code on both sides).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import clipscope
from clipscope import Unit
from clipscope.backends.attention import clip_attention, multihead_attention
from clipscope.backends.convert import open_clip_to_transformers
from clipscope.hooks import HeadPoints
from clipscope.validate import InvalidArgumentError

from .conftest import DEVICE, PRECISION, open_clip_variant, write_tiny_hf_clip

pytestmark = pytest.mark.skipif(PRECISION != "fp32", reason="equivalences to 1e-5 hold in fp32 only")
ATOL = 1e-5


def _images(model, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *model.image_size, generator=generator).to(model.device)


def _module(model, site: str) -> torch.nn.Module:
    return model.model.get_submodule(model.site(site).module)


def _fused_and_explicit(model, site: str, forward) -> tuple[torch.Tensor, torch.Tensor]:
    """``site``'s activation from ``forward()`` run as the model runs it, and with its attention explicit."""
    with torch.no_grad():
        with model.capture(site) as fused:
            forward()
        with model.capture([site, f"{site}.pattern"]) as explicit:
            forward()
    return fused[site], explicit[site]


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A random transformers CLIP (2 vision layers, 2 text layers, 2 heads) loaded as ``hf:/folder``."""
    pytest.importorskip("transformers")
    folder = write_tiny_hf_clip(tmp_path_factory.mktemp("hf-heads"), seed=0, text_layers=2,
                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return clipscope.load(f"hf:{folder}", device=DEVICE, precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# Sites


def test_every_transformer_block_lists_head_sites_and_residual_aliases_with_their_shapes(tiny_vit, hf_vit):
    for model in (tiny_vit, hf_vit):
        for tower in ("visual", "text"):
            heads = model.head_count(tower)
            assert heads == 2
            for block, attention in zip(model.blocks(tower), model.attention_sites(tower)):
                length, width = model.site(attention).shape
                assert model.site(f"{attention}.pattern").shape == (heads, length, length)
                assert model.site(f"{attention}.pattern").layout == "pattern"
                for kind, features in (("v", width // heads), ("z", width // heads), ("result", width)):
                    site = model.site(f"{attention}.{kind}")
                    assert (site.layout, site.shape) == ("heads", (length, heads, features))
                for alias in ("resid_pre", "resid_mid", "resid_post"):
                    site = model.site(f"{block}.{alias}")
                    assert (site.layout, site.shape) == ("tokens", (length, width))


def test_a_resnet_has_no_heads(tiny_rn):
    assert tiny_rn.head_count("visual") == 0
    assert not tiny_rn.layers().filter(tower="visual", layout="pattern")
    with pytest.raises(InvalidArgumentError, match="head-level sites"):
        tiny_rn.output_projection("visual.attnpool")


# ---------------------------------------------------------------------------------------------
# Explicit attention equals the fused one


def test_explicit_attention_equals_the_fused_one_in_the_open_clip_image_tower(tiny_vit):
    x = _images(tiny_vit, 3, seed=1)
    for attention in tiny_vit.attention_sites("visual"):
        fused, explicit = _fused_and_explicit(tiny_vit, attention, lambda: tiny_vit.encode_image(x))
        assert torch.allclose(fused, explicit, atol=ATOL)
    with torch.no_grad():
        plain = tiny_vit.encode_image(x)
        with tiny_vit.capture([f"{a}.result" for a in tiny_vit.attention_sites("visual")]):
            explicit = tiny_vit.encode_image(x)
    assert torch.allclose(plain, explicit, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal-mask", "no-mask"])
def test_explicit_attention_equals_the_fused_one_in_the_open_clip_text_tower(tiny_vit, causal):
    clip = tiny_vit.model
    tokens = tiny_vit.tokenize(["a photo of a red circle", "word"])
    x = clip.token_embedding(tokens) + clip.positional_embedding
    mask = clip.attn_mask if causal else None
    attention = tiny_vit.attention_sites("text")[0]
    fused, explicit = _fused_and_explicit(tiny_vit, attention, lambda: clip.transformer(x, attn_mask=mask))
    assert torch.allclose(fused, explicit, atol=ATOL)
    with torch.no_grad(), tiny_vit.capture(f"{attention}.pattern") as acts:
        clip.transformer(x, attn_mask=mask)
    above_diagonal = torch.ones(16, 16, dtype=torch.bool).triu(1)
    assert bool((acts[f"{attention}.pattern"][..., above_diagonal] == 0).all()) == causal


def test_the_text_tower_through_the_model_api_is_causal_and_unchanged(tiny_vit):
    texts = ["a photo of a red circle", "word"]
    attention = tiny_vit.attention_sites("text")[0]
    plain = tiny_vit.encode_text(texts, normalize=False)
    with tiny_vit.capture(f"{attention}.pattern") as acts:
        explicit = tiny_vit.encode_text(texts, normalize=False)
    assert torch.allclose(plain, explicit, atol=ATOL)
    pattern = acts[f"{attention}.pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 2, 16), atol=ATOL)  # rows of a softmax
    assert (pattern.triu(1) == 0).all()


def test_sequence_first_open_clip_blocks_give_the_same_head_sites(tiny_vit):
    """open_clip 3.3's ``Transformer(batch_first=False)`` path (no model config selects it any more, so the
    flags of a fresh copy are flipped): the same weights give the same per-head tensors, batch first."""
    seq_first = clipscope.load("clipscope-tiny-vit", device=DEVICE, precision=PRECISION)
    seq_first.model.load_state_dict(tiny_vit.model.state_dict())
    transformer = seq_first.model.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    attention = seq_first.attention_sites("visual")[1]
    assert seq_first.site(attention).seq_first
    x = _images(tiny_vit, 2, seed=2)
    fused, explicit = _fused_and_explicit(seq_first, attention, lambda: seq_first.encode_image(x))
    assert torch.allclose(fused, explicit, atol=ATOL)
    sites = [f"{attention}.{kind}" for kind in ("pattern", "v", "z", "result")]
    with torch.no_grad(), seq_first.capture(sites) as theirs, tiny_vit.capture(sites) as ours:
        seq_first.encode_image(x)
        tiny_vit.encode_image(x)
    for site in sites:
        assert torch.allclose(theirs[site], ours[site], atol=ATOL), site


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_explicit_attention_equals_the_fused_one_in_transformers(hf_vit, implementation):
    clip = hf_vit.model.clip
    before = clip.config._attn_implementation
    clip.set_attn_implementation(implementation)
    try:
        x = _images(hf_vit, 2, seed=3)
        for attention in hf_vit.attention_sites("visual"):
            fused, explicit = _fused_and_explicit(hf_vit, attention, lambda: hf_vit.encode_image(x))
            assert torch.allclose(fused, explicit, atol=ATOL)
        ids = hf_vit.tokenize(["a photo of a red circle", "word"])
        padding = (torch.arange(16) < torch.tensor([[8], [3]])).long()  # the tokenizer's lengths
        for mask in (None, padding):
            for attention in hf_vit.attention_sites("text"):
                fused, explicit = _fused_and_explicit(
                    hf_vit, attention, lambda: clip.get_text_features(input_ids=ids, attention_mask=mask))
                valid = slice(None) if mask is None else padding.bool()  # padded queries see nothing real
                assert torch.allclose(fused[valid], explicit[valid], atol=ATOL)
    finally:
        clip.set_attn_implementation(before)


def test_no_head_site_no_explicit_attention(tiny_vit):
    """The fused module runs unless a head-level site is in use, and is back when the last use ends."""
    attention = tiny_vit.attention_sites("visual")[0]
    module = _module(tiny_vit, attention)
    with tiny_vit.capture([attention, tiny_vit.blocks()[0] + ".resid_mid"]):
        assert "forward" not in vars(module)
    with tiny_vit.ablate(Unit.head(f"{attention}.z", 0)):
        with tiny_vit.capture(f"{attention}.pattern"):
            assert "forward" in vars(module)
        assert "forward" in vars(module)
    assert "forward" not in vars(module)


# ---------------------------------------------------------------------------------------------
# Sums that must hold


@pytest.mark.parametrize("which", ["open_clip", "transformers"])
def test_head_results_sum_to_the_attention_output_and_z_projects_to_them(tiny_vit, hf_vit, which):
    model = tiny_vit if which == "open_clip" else hf_vit
    x = _images(model, 2, seed=4)
    for attention in model.attention_sites("visual"):
        with torch.no_grad():
            with model.capture(attention) as fused:
                model.encode_image(x)
            with model.capture([f"{attention}.z", f"{attention}.result"]) as heads:
                model.encode_image(x)
        weight, bias = model.output_projection(attention)
        result = heads[f"{attention}.result"]
        assert torch.allclose(result.sum(dim=-2) + bias, fused[attention], atol=ATOL)
        assert torch.allclose(torch.einsum("blhd,hde->blhe", heads[f"{attention}.z"], weight), result, atol=ATOL)


@pytest.mark.parametrize("which", ["open_clip", "transformers"])
def test_the_residual_stream_aliases_differ_by_the_attention_and_the_mlp(tiny_vit, hf_vit, which):
    """resid_pre is the previous block's output, resid_post the block's own; in between the stream gains
    the attention output, then the MLP's (tiny_vit has no layer scale: ls_1 and ls_2 are the identity)."""
    model = tiny_vit if which == "open_clip" else hf_vit
    previous, block, attention = model.blocks()[0], model.blocks()[1], model.attention_sites()[1]
    mlp = next(n for n in model.layers().names() if n == f"{block}.mlp")
    names = [f"{block}.resid_pre", f"{block}.resid_mid", f"{block}.resid_post", attention, mlp, previous, block]
    with torch.no_grad(), model.capture(names) as acts:
        model.encode_image(_images(model, 2, seed=5))
    pre, mid, post, attn_out, mlp_out, previous_out, block_out = (acts[n] for n in names)
    assert torch.equal(pre, previous_out)
    assert torch.allclose(mid - pre, attn_out, atol=ATOL)
    assert torch.allclose(post - mid, mlp_out, atol=ATOL)
    assert torch.equal(post, block_out)


# ---------------------------------------------------------------------------------------------
# Head units


def test_a_head_unit_reads_the_norm_of_the_heads_vector(tiny_vit):
    site = tiny_vit.attention_sites()[0] + ".result"
    with torch.no_grad(), tiny_vit.capture(site) as acts:
        tiny_vit.encode_image(_images(tiny_vit, 2, seed=6))
    norms = acts[site][:, :, 1].norm(dim=-1)  # (B, L)
    assert tiny_vit.token_pool == "patches"  # no token named: the mean over the patch tokens
    assert torch.allclose(tiny_vit.read(Unit.head(site, 1), acts), norms[:, tiny_vit.prefix_tokens:].mean(dim=1))
    assert torch.allclose(tiny_vit.read(Unit.head(site, 1, token=0), acts), norms[:, 0])
    assert torch.equal(tiny_vit.read(Unit.head(site, 1, token=3, index=5), acts), acts[site][:, 3, 1, 5])


def test_zero_ablating_every_head_leaves_only_the_output_bias(tiny_vit):
    """With every head's result zeroed the attention writes its output bias alone: the same embeddings as
    replacing the fused attention output by that bias with a plain torch hook."""
    attention = tiny_vit.attention_sites()[1]
    _, bias = tiny_vit.output_projection(attention)
    x = _images(tiny_vit, 2, seed=7)
    heads = [Unit.head(f"{attention}.result", h) for h in range(tiny_vit.head_count())]
    with torch.no_grad(), tiny_vit.ablate(heads):
        ablated = tiny_vit.encode_image(x)
    handle = _module(tiny_vit, attention).register_forward_hook(
        lambda _m, _inp, out: (bias.expand_as(out[0]).clone(),) + tuple(out[1:]))
    try:
        with torch.no_grad():
            by_hand = tiny_vit.encode_image(x)
    finally:
        handle.remove()
    assert torch.allclose(ablated, by_hand, atol=ATOL)
    assert not torch.allclose(ablated, tiny_vit.encode_image(x), atol=1e-3)


def test_mean_ablation_sets_a_head_to_its_mean_over_a_reference_set(tiny_vit):
    attention = tiny_vit.attention_sites()[1]
    z_site = f"{attention}.z"
    reference, x = _images(tiny_vit, 5, seed=8), _images(tiny_vit, 2, seed=9)
    means = tiny_vit.mean_activations(reference, z_site, batch_size=2)
    with torch.no_grad(), tiny_vit.capture(z_site) as ref_acts:
        tiny_vit.encode_image(reference)
    assert torch.allclose(means[z_site], ref_acts[z_site].mean(dim=0), atol=1e-6)
    with torch.no_grad():
        with tiny_vit.capture(z_site) as clean:
            tiny_vit.encode_image(x)
        with tiny_vit.ablate(Unit.head(z_site, 1), value=means), tiny_vit.capture([z_site, attention]) as acts:
            tiny_vit.encode_image(x)
    z = acts[z_site]
    assert torch.equal(z[:, :, 1], means[z_site][:, 1].expand_as(z[:, :, 1]))
    assert torch.equal(z[:, :, 0], clean[z_site][:, :, 0])
    weight, bias = tiny_vit.output_projection(attention)  # the attention output, by hand, from the edited z
    expected = clean[z_site][:, :, 0] @ weight[0] + means[z_site][:, 1] @ weight[1] + bias
    assert torch.allclose(acts[attention], expected, atol=ATOL)


def test_patching_a_head_from_another_image_changes_exactly_that_heads_result(tiny_vit):
    blocks = tiny_vit.attention_sites()
    site, earlier = f"{blocks[1]}.result", f"{blocks[0]}.result"
    x, y = _images(tiny_vit, 2, seed=10), _images(tiny_vit, 2, seed=11)
    with torch.no_grad():
        with tiny_vit.capture([site, earlier]) as source:
            tiny_vit.encode_image(x)
        with tiny_vit.capture([site, earlier]) as target:
            tiny_vit.encode_image(y)
        with tiny_vit.ablate(Unit.head(site, 0), value=source), tiny_vit.capture([site, earlier]) as patched:
            tiny_vit.encode_image(y)
    assert torch.equal(patched[site][:, :, 0], source[site][:, :, 0])
    assert torch.equal(patched[site][:, :, 1], target[site][:, :, 1])
    assert torch.equal(patched[earlier], target[earlier])


def test_a_patch_source_that_never_recorded_the_site_is_named(tiny_vit):
    site = tiny_vit.attention_sites()[0] + ".z"
    with tiny_vit.capture(site) as nothing_ran:
        pass
    with pytest.raises(InvalidArgumentError, match=f"^value=.*{site}' recorded nothing"), \
            tiny_vit.ablate(Unit.head(site, 0), value=nothing_ran):
        pass


def test_a_patch_source_must_match_the_batch(tiny_vit):
    site = tiny_vit.attention_sites()[0] + ".z"
    with torch.no_grad(), tiny_vit.capture(site) as source:
        tiny_vit.encode_image(_images(tiny_vit, 3, seed=12))
    with pytest.raises(InvalidArgumentError, match="a batch of 2"), tiny_vit.ablate(Unit.head(site, 0), value=source):
        tiny_vit.encode_image(_images(tiny_vit, 2, seed=13))
    with pytest.raises(InvalidArgumentError, match="one example's shape"):
        with tiny_vit.ablate(Unit.head(site, 0), value={site: torch.zeros(5)}):
            pass


def test_head_unit_errors_name_the_value_and_the_valid_range(tiny_vit):
    attention = tiny_vit.attention_sites()[0]
    result = f"{attention}.result"
    with pytest.raises(InvalidArgumentError, match=r"head=7 .*2 heads \(valid: 0\.\.1\)"):
        tiny_vit.read(Unit.head(result, 7), torch.zeros(1, 17, 2, 32))
    with pytest.raises(InvalidArgumentError, match=r"head=0 .*needs a head-level site.*'tokens'"), \
            tiny_vit.ablate(Unit.head(attention, 0)):
        pass
    with pytest.raises(InvalidArgumentError, match=r"head=None .*Unit\.head\(site, head\) \(valid heads: 0\.\.1\)"), \
            tiny_vit.ablate(Unit.neuron(result, 3)):
        pass
    with pytest.raises(InvalidArgumentError, match=r"index=32 .*32 features \(valid: 0\.\.31\)"), \
            tiny_vit.ablate(Unit.head(result, 0, index=32)):
        pass
    with pytest.raises(InvalidArgumentError, match=r"token=17 .*17 tokens"), \
            tiny_vit.ablate(Unit.head(f"{attention}.pattern", 0, token=17)):
        pass
    with pytest.raises(InvalidArgumentError, match="head"):
        Unit.head(result, "first")


# ---------------------------------------------------------------------------------------------
# Same answers from both backends


@pytest.mark.slow
def test_a_converted_vit_b32_gives_the_same_embeddings_and_head_sites(tmp_path):
    """A random ViT-B/32-shaped open_clip CLIP (224 px, patch 32, 12 + 12 layers, 12 + 8 heads) written with
    open_clip_to_transformers loads as ``hf:/folder`` with the same embeddings, patterns and head results."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random architecture says it is random
        torch.manual_seed(0)
        original = clipscope.load("ViT-B-32", device=DEVICE, precision=PRECISION)
    converted = clipscope.load(f"hf:{open_clip_to_transformers(original.model, tmp_path / 'b32')}",
                               device=DEVICE, precision=PRECISION)
    x = _images(original, 2, seed=14)
    texts = ["a photo of a cat", "a diagram"]
    with torch.no_grad():
        assert torch.allclose(original.encode_image(x), converted.encode_image(x), atol=ATOL)
    assert torch.allclose(original.encode_text(texts), converted.encode_text(texts), atol=ATOL)
    for tower in ("visual", "text"):
        assert original.head_count(tower) == converted.head_count(tower)
    pairs = list(zip(original.attention_sites(), converted.attention_sites()))[::5]
    kinds = ("pattern", "z", "result")
    with torch.no_grad(), original.capture([f"{a}.{k}" for a, _ in pairs for k in kinds]) as ours, \
            converted.capture([f"{b}.{k}" for _, b in pairs for k in kinds]) as theirs:
        original.encode_image(x)
        converted.encode_image(x)
    for a, b in pairs:
        for kind in kinds:
            assert torch.allclose(ours[f"{a}.{kind}"], theirs[f"{b}.{kind}"], atol=ATOL), (a, kind)


def test_a_converted_state_dict_loads_with_the_same_embeddings(tiny_vit, tmp_path):
    state = tiny_vit.model.state_dict()
    with pytest.raises(InvalidArgumentError, match="heads=None"):
        open_clip_to_transformers(state, tmp_path / "no-heads")
    folder = open_clip_to_transformers(state, tmp_path / "tiny", heads=(2, 2))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= \
        {p.name for p in folder.iterdir()}
    converted = clipscope.load(f"hf:{folder}", device=DEVICE, precision=PRECISION)
    x = _images(tiny_vit, 2, seed=15)
    with torch.no_grad():
        assert torch.allclose(tiny_vit.encode_image(x), converted.encode_image(x), atol=ATOL)
    texts = ["a photo of a red circle", "word"]
    assert torch.allclose(tiny_vit.encode_text(texts), converted.encode_text(texts), atol=ATOL)


def test_models_transformers_cannot_hold_are_refused_by_name(tiny_rn, tmp_path):
    with pytest.raises(InvalidArgumentError, match="ViT image tower"):
        open_clip_to_transformers(tiny_rn.model, tmp_path / "rn")
    with pytest.raises(InvalidArgumentError, match=r"have no place there: visual\.bn1\.weight"):
        open_clip_to_transformers(tiny_rn.model.state_dict(), tmp_path / "rn", heads=(2, 2))
    assert not (tmp_path / "rn").exists()


@pytest.mark.parametrize("attribute, value, setting", [
    ("visual.pool_type", "avg", "visual.pool_type='avg'"),
    ("visual.final_ln_after_pool", True, "visual.final_ln_after_pool=True"),
    ("text_pool_type", "last", "text_pool_type='last'"),
    ("attn_mask", None, r"attn_mask \(no_causal_mask\)"),
])
def test_settings_transformers_would_not_compute_are_refused_by_name(tiny_vit, tmp_path, attribute, value, setting):
    """Settings that leave every tensor in place, so the tensors alone would convert (a mean-pooled tiny ViT
    converted anyway was measured to disagree by up to 3.05 on its embeddings)."""
    model = copy.deepcopy(tiny_vit.model)
    owner, _, name = attribute.rpartition(".")
    setattr(model.get_submodule(owner), name, value)
    with pytest.raises(InvalidArgumentError, match=f"^model_or_state_dict=.*{setting}"):
        open_clip_to_transformers(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_layer_scale_is_refused_by_name_by_the_converter(layer_scaled, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"ls_init_value \(layer scale\)"):
        open_clip_to_transformers(layer_scaled.model, tmp_path / "refused")


def test_head_sites_carry_gradients_to_the_image(tiny_vit):
    """Objectives (feature visualization of a head) read head units with gradients through the explicit path."""
    site = tiny_vit.attention_sites()[1] + ".result"
    x = _images(tiny_vit, 2, seed=16).requires_grad_(True)
    acts = tiny_vit.activations(x, site, grad=True)
    tiny_vit.read(Unit.head(site, 1, token=0), acts).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_the_explicit_codes_flash_mask_path_agrees_with_its_own_eager_mask_path(hf_vit):
    """Flash attention hands CLIPAttention a (B, S) padding mask and is_causal (no flash kernel runs on the
    CPU). This checks the explicit code against itself: its flash path must equal its run on the full
    additive mask eager builds, a path checked against transformers' fused kernel above."""
    module = _module(hf_vit, hf_vit.attention_sites("text")[0])
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(17))
    padding = torch.arange(16) < torch.tensor([[8], [3]])
    allowed = padding[:, None, None, :] & torch.ones(16, 16, dtype=torch.bool).tril()
    full = torch.zeros(2, 1, 16, 16).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        flash, _ = clip_attention(module, HeadPoints(), h, attention_mask=padding.long(), is_causal=True)
        eager, _ = clip_attention(module, HeadPoints(), h, attention_mask=full)
    assert torch.allclose(flash, eager, atol=ATOL)


def test_transformers_4s_separate_causal_mask_means_what_is_causal_means(hf_vit):
    """transformers 4.x passes CLIPAttention the text tower's causal mask apart (``causal_attention_mask``,
    additive, next to the padding mask, under every implementation; ``None`` in the image tower); 5.x
    passes ``is_causal`` instead. The same masking must give the same output either way."""
    module = _module(hf_vit, hf_vit.attention_sites("text")[0])
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(20))
    low = torch.finfo(torch.float32).min
    causal = torch.zeros(2, 1, 16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), low)
    padding = torch.arange(16) < torch.tensor([[8], [3]])
    padding_4d = torch.zeros(2, 1, 16, 16).masked_fill(~padding[:, None, None, :], low)
    with torch.no_grad():
        def run(**kwargs):
            return clip_attention(module, HeadPoints(), h, **kwargs)[0]
        assert torch.allclose(run(causal_attention_mask=causal), run(is_causal=True), atol=ATOL)
        both = run(attention_mask=padding_4d + causal)  # eager 5.x: one mask with both
        assert torch.allclose(run(attention_mask=padding_4d, causal_attention_mask=causal), both, atol=ATOL)
        assert torch.allclose(run(attention_mask=padding.long(), causal_attention_mask=causal), both, atol=ATOL)
        not_causal = run(is_causal=False)
        assert torch.allclose(run(causal_attention_mask=None, output_attentions=False), not_causal, atol=ATOL)
        assert not torch.allclose(run(is_causal=True), not_causal, atol=1e-3)
        older = copy.deepcopy(module)  # transformers 4.x eager modules have no is_causal attribute
        del older.is_causal
        assert torch.allclose(clip_attention(older, HeadPoints(), h)[0], not_causal, atol=ATOL)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_the_explicit_multihead_attention_equals_torchs_module_with_every_mask(kind):
    """``nn.MultiheadAttention`` itself (sequence first, keys of another length) with a 3-D per-head
    ``attn_mask`` and a ``key_padding_mask``, boolean or additive: the same output and per-head weights."""
    torch.manual_seed(21)
    module = nn.MultiheadAttention(16, 4, batch_first=False).eval()
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    blocked = torch.rand(2 * 4, 5, 7) < 0.4
    blocked[..., 0] = False  # every query keeps a key
    padded = torch.zeros(2, 7, dtype=torch.bool)
    padded[1, 4:] = True
    masks = (blocked, padded) if kind == "bool" else tuple(torch.zeros(m.shape).masked_fill(m, float("-inf"))
                                                            for m in (blocked, padded))
    with torch.no_grad():
        for average in (True, False):
            theirs = module(query, key, key, attn_mask=masks[0], key_padding_mask=masks[1],
                            average_attn_weights=average)
            ours = multihead_attention(module, HeadPoints(), query, key, key, attn_mask=masks[0],
                                       key_padding_mask=masks[1], average_attn_weights=average)
            assert ours[0].shape == theirs[0].shape == (5, 2, 16)
            assert torch.allclose(ours[0], theirs[0], atol=ATOL)
            assert torch.allclose(ours[1], theirs[1], atol=ATOL)
        padded_out, _ = multihead_attention(module, HeadPoints(), query, key, key, key_padding_mask=masks[1])
        assert not torch.allclose(padded_out, module(query, key, key)[0], atol=1e-3)  # the masks mattered


def test_in_training_mode_attention_dropout_applies_as_in_the_module():
    """With dropout 0.3 in training mode the explicit code drops attention weights as ``nn.MultiheadAttention``
    does: from the same seed, the same weights (both draw one mask over the (B * heads, L, S) weights)."""
    torch.manual_seed(22)
    module = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True).train()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.manual_seed(23)
        theirs, theirs_weights = module(x, x, x, average_attn_weights=False)
        torch.manual_seed(23)
        ours, weights = multihead_attention(module, HeadPoints(), x, x, x, average_attn_weights=False)
    assert bool((weights == 0).any())  # some weights were dropped
    assert torch.allclose(weights, theirs_weights, atol=ATOL)
    assert torch.allclose(ours, theirs, atol=ATOL)


def test_a_failure_while_swapping_in_explicit_attention_undoes_the_swaps_already_made(tiny_vit, monkeypatch):
    first, second = tiny_vit.attention_sites()[:2]
    root, failing = tiny_vit.model, tiny_vit.site(second).module
    get_submodule = type(root).get_submodule

    def planted(self, target):
        if self is root and target == failing:
            raise RuntimeError("planted failure")
        return get_submodule(self, target)
    monkeypatch.setattr(type(root), "get_submodule", planted)
    with pytest.raises(RuntimeError, match="planted failure"), \
            tiny_vit.capture([f"{first}.pattern", f"{second}.pattern"]):
        pass
    monkeypatch.undo()
    module = _module(tiny_vit, first)
    assert "forward" not in vars(module)
    with tiny_vit.capture(f"{first}.pattern"):  # the use count is back to 0: one use swaps in and out
        assert "forward" in vars(module)
    assert "forward" not in vars(module)


# ---------------------------------------------------------------------------------------------
# Layer scale


def _random_attention_scales(model) -> None:
    """Give every image block's layer scale after the attention (``ls_1``) a random gain per channel, and its
    attention a random output bias (open_clip initializes it to 0)."""
    generator = torch.Generator().manual_seed(18)
    for block in model.visual.transformer.resblocks:
        for tensor in (block.ls_1.gamma, block.attn.out_proj.bias):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))


@pytest.fixture(scope="module")
def layer_scaled(tmp_path_factory):
    """The tiny ViT with layer scale (CaiT, Touvron et al. 2021): each block adds ``gamma * attention``."""
    return open_clip_variant(tmp_path_factory.mktemp("layer-scale") / "model", edit=_random_attention_scales,
                             ls_init_value=1.0)


def test_with_layer_scale_head_results_are_what_the_heads_add_to_the_residual_stream(layer_scaled):
    model = layer_scaled
    x = _images(model, 2, seed=24)
    for block, attention in zip(model.blocks(), model.attention_sites()):
        names = [f"{block}.resid_pre", f"{block}.resid_mid", attention, f"{attention}.z", f"{attention}.result"]
        with torch.no_grad():
            with model.capture(names) as acts:
                model.encode_image(x)
            with model.capture(attention) as fused:
                model.encode_image(x)
        weight, bias = model.output_projection(attention)  # layer scale folded in
        result = acts[f"{attention}.result"]
        added = acts[f"{block}.resid_mid"] - acts[f"{block}.resid_pre"]
        assert torch.allclose(result.sum(dim=-2) + bias, added, atol=ATOL)
        assert torch.allclose(torch.einsum("blhd,hde->blhe", acts[f"{attention}.z"], weight), result, atol=ATOL)
        assert torch.allclose(acts[attention], fused[attention], atol=ATOL)  # the module's own output, unscaled
        assert not torch.allclose(acts[attention], added, atol=1e-3)  # the scale mattered


def test_with_layer_scale_ablating_every_head_leaves_the_scaled_output_bias(layer_scaled):
    model = layer_scaled
    block, attention = model.blocks()[1], model.attention_sites()[1]
    _, bias = model.output_projection(attention)
    heads = [Unit.head(f"{attention}.result", h) for h in range(model.head_count())]
    with torch.no_grad(), model.ablate(heads), model.capture([f"{block}.resid_pre", f"{block}.resid_mid"]) as acts:
        model.encode_image(_images(model, 2, seed=25))
    added = acts[f"{block}.resid_mid"] - acts[f"{block}.resid_pre"]
    assert torch.allclose(added, bias.expand_as(added), atol=ATOL)
