"""One token policy: wherever a ViT unit is read as one number per image with no token named, the image
tower's tokens are pooled as ``model.token_pool`` says ("patches" by default, "class", or "all"), the
same in ``model.read``, ``model.unit_values``, rendered-word responses, objectives and label pooling."""
from __future__ import annotations

import pytest
import torch

import clipscope
from clipscope.hooks import Unit
from clipscope.neurons.words import default_fonts, render_word_variants, word_responses
from clipscope.optvis import objectives
from clipscope.validate import InvalidArgumentError

SITE = "visual.transformer.resblocks.0.mlp.c_fc"


@pytest.fixture
def vit():
    return clipscope.load("clipscope-tiny-vit")  # a fresh model: tests set its token_pool


@pytest.fixture
def acts(vit):
    with torch.no_grad(), vit.capture([SITE, "text.transformer.resblocks.0"]) as acts:
        vit.encode_image(torch.rand(3, 3, *vit.image_size), progress=False)
        vit.encode_text(["a red circle", "a dog"])
    return acts


def expected(acts, pool: str, prefix: int) -> torch.Tensor:
    tokens = acts[SITE]
    return {"patches": tokens[:, prefix:].mean(1), "class": tokens[:, 0], "all": tokens.mean(1)}[pool]


@pytest.mark.parametrize("pool", ["patches", "class", "all"])
def test_every_reader_pools_image_tokens_as_the_policy_says(vit, acts, pool):
    vit.token_pool = pool
    want = expected(acts, pool, vit.prefix_tokens)
    assert torch.allclose(vit.unit_values(SITE, acts), want)
    assert torch.allclose(vit.read(Unit.neuron(SITE, 7), acts), want[:, 7])
    ctx = objectives.Context(vit, {SITE: acts[SITE]}, None, torch.zeros(3, 3, *vit.image_size))
    assert torch.allclose(objectives.channel(SITE, 7)(ctx), want[:, 7])


def test_the_default_is_the_mean_over_patch_tokens(vit, acts):
    assert vit.token_pool == "patches" and vit.prefix_tokens == 1
    assert torch.allclose(vit.unit_values(SITE, acts), acts[SITE][:, 1:].mean(1))


def test_a_named_token_and_the_text_tower_ignore_the_policy(vit, acts):
    vit.token_pool = "class"
    assert torch.equal(vit.read(Unit.neuron(SITE, 3, token=5), acts), acts[SITE][:, 5, 3])
    text = "text.transformer.resblocks.0"
    assert torch.allclose(vit.unit_values(text, acts), acts[text].mean(1))


def test_rendered_word_responses_follow_the_policy(vit):
    words, n = ["red", "dog"], 2
    fonts = default_fonts()
    images = [im for w in words for im in render_word_variants(w, n, vit.image_size[::-1], fonts=fonts,
                                                                  sizes=(0.2, 0.3), seed=0)]
    with torch.no_grad(), vit.capture(SITE) as acts:
        vit.encode_image(images, progress=False)
    for pool in ("class", "all"):
        vit.token_pool = pool
        got = word_responses(vit, SITE, words=words, n_variants=n, fonts=fonts, progress=False).responses[SITE]
        want = expected(acts, pool, vit.prefix_tokens).view(len(words), n, -1).mean(1).numpy()
        assert abs(got - want).max() < 1e-5, pool


def test_bad_policies_are_refused_naming_the_value():
    rn = clipscope.load("clipscope-tiny-rn")
    with pytest.raises(InvalidArgumentError, match="token_pool.*'class'.*no class token"):
        rn.token_pool = "class"
    with pytest.raises(InvalidArgumentError, match="token_pool.*'cls'"):
        rn.token_pool = "cls"


def test_dataset_examples_rank_by_the_policy(vit):
    from clipscope.neurons.examples import dataset_examples
    images = [torch.rand(3, *vit.image_size, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    with torch.no_grad(), vit.capture(SITE) as acts:
        vit.encode_image(torch.stack(images), progress=False)
    for pool in ("class", "patches"):
        vit.token_pool = pool
        ranked = dataset_examples(vit, images, SITE, k=4, units=[2, 9], progress=False)
        for unit in (2, 9):
            want = expected(acts, pool, vit.prefix_tokens)[:, unit]
            order = torch.sort(want, descending=True, stable=True).indices[:4].tolist()
            assert [e.key for e in ranked.top(SITE, unit)] == order, (pool, unit)
