"""CLIP-Dissect labels reproduce the reference by default: bare concept words as the text, the reference's
pooling of activations, SoftWPMI (Oikarinen & Weng, ICLR 2023; github.com/Trustworthy-ML-Lab/CLIP-dissect)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.neurons import label_units
from clipscope.neurons.labels import pooled
from clipscope.organism import COLOURS, SHAPES, WORDS, scenes
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

CONCEPTS = ["red", "dog", "car", "tree", "music"]


@pytest.fixture(scope="module")
def probe():
    return make_images(12, seed=3, size=64)


def reference_soft_wpmi(P: np.ndarray, A: np.ndarray, top_k: int, a: float = 10.0, lam: float = 1.0,
                        p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7) -> np.ndarray:
    """SoftWPMI written out from the paper's definition, unit by unit (units x concepts). Images are ranked
    by ``torch.topk`` over the image axis, as the reference does, so that ties (units silent on several
    images) fall in the same order."""
    p_concept = np.exp(a * P) / np.exp(a * P).sum(axis=1, keepdims=True)      # p(t | x)
    log_given = np.zeros((A.shape[1], P.shape[1]))
    order = torch.topk(torch.from_numpy(A), top_k, dim=0).indices.numpy()    # (top_k, units)
    for u in range(A.shape[1]):
        for r, image in enumerate(order[:, u]):
            member = p_start - r / top_k * (p_start - p_end)                 # p(x in B_k), falling with rank
            log_given[u] += np.log(1 - member * (1 - p_concept[image]) + min_prob)
    log_prior = np.log(np.exp(log_given).mean(axis=0))                      # log p(t), over all units
    return log_given - lam * log_prior


def bare_similarity(model, images, concepts) -> np.ndarray:
    """Cosine similarity of each image with each bare concept word (images x concepts)."""
    with torch.no_grad():
        img = model.encode_image(images, progress=False)
        txt = model.encode_text(concepts)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img @ txt.T).double().numpy()


def test_default_labels_follow_the_reference_definition_on_a_resnet_stage(tiny_rn, probe):
    site = "visual.layer4"
    with torch.no_grad(), tiny_rn.capture(site) as acts:
        tiny_rn.encode_image(probe, progress=False)
    A = acts[site].mean(dim=(2, 3)).double().numpy()                         # spatial mean of each map
    expected = reference_soft_wpmi(bare_similarity(tiny_rn, probe, CONCEPTS), A, top_k=5)
    labels = label_units(tiny_rn, site, probe, CONCEPTS, top_k=5, progress=False)
    assert labels.templates == ("{}",) and labels.pooling == "reference"
    assert np.allclose(labels.scores, expected, atol=1e-6)
    assert [labels.top(u, 1)[0][0] for u in labels.units] == [CONCEPTS[j] for j in expected.argmax(axis=1)]


def test_reference_pooling_reads_a_vit_class_token_and_model_pooling_the_models_token_pool(tiny_vit, probe):
    site = "visual.transformer.resblocks.1"
    with torch.no_grad(), tiny_vit.capture(site) as acts:
        tiny_vit.encode_image(probe, progress=False)
    P = bare_similarity(tiny_vit, probe, CONCEPTS)
    patches = acts[site][:, tiny_vit.prefix_tokens:].mean(dim=1)  # the default token_pool, "patches"
    for pooling, A in (("reference", acts[site][:, 0]), ("model", patches)):
        labels = label_units(tiny_vit, site, probe, CONCEPTS, pooling=pooling, top_k=4, units=[0, 5, 31],
                             progress=False)
        expected = reference_soft_wpmi(P, A.double().numpy(), top_k=4)[[0, 5, 31]]
        assert np.allclose(labels.scores, expected, atol=1e-6), pooling


def test_reference_pooling_of_each_layout(tiny_rn, tiny_vit):
    conv, tokens = torch.randn(2, 32, 16, 16), torch.randn(2, 17, 32)
    assert torch.allclose(pooled(tiny_rn, "visual.layer1", conv), conv.mean(dim=(2, 3)))
    assert torch.equal(pooled(tiny_vit, "visual.transformer.resblocks.0", tokens), tokens[:, 0])
    assert torch.allclose(pooled(tiny_vit, "visual.transformer.resblocks.0", tokens, "model"), tokens[:, 1:].mean(dim=1))
    text = torch.randn(2, 16, 32)  # the text tower has no class token: its tokens are averaged
    assert torch.allclose(pooled(tiny_vit, "text.transformer.resblocks.0", text), text.mean(dim=1))
    vector = torch.randn(2, 32)
    assert torch.equal(pooled(tiny_vit, "visual", vector), vector)


def test_templates_none_embeds_concepts_with_the_model_default_prompts(tiny_rn, probe):
    site = "visual.layer3"
    with torch.no_grad(), tiny_rn.capture(site) as acts:
        img = tiny_rn.encode_image(probe, progress=False)
    prompts = [tiny_rn.default_templates[0].format(c) for c in CONCEPTS]
    txt = tiny_rn.encode_text(prompts)
    P = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    expected = reference_soft_wpmi(P.double().numpy(), acts[site].mean(dim=(2, 3)).double().numpy(), top_k=6)
    labels = label_units(tiny_rn, site, probe, CONCEPTS, templates=None, top_k=6, progress=False)
    assert labels.templates == tiny_rn.default_templates
    assert np.allclose(labels.scores, expected, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "wpmi"}, "method='wpmi' is not valid: one of 'soft_wpmi', 'cos_cubed'"),
    ({"pooling": "max"}, "pooling='max' is not valid: one of 'reference', 'model'"),
    ({"site": "text.transformer"}, "site='text.transformer' is not valid: an image-tower site"),
    ({"units": [0, 256]}, "units=[256] is not valid: unit indices of 'visual.layer4', 0..255"),
    ({"concepts": ["red"]}, "concepts=['red'] is not valid"),
    ({"top": 0}, "top=0 is not valid"),
    ({"top_k": 0}, "top_k=0 is not valid"),
    ({"a": -1.0}, "a=-1.0 is not valid"),
    ({"templates": "no slot"}, "templates='no slot' is not valid"),
])
def test_bad_arguments_are_refused_naming_the_parameter(tiny_rn, probe, kwargs, message):
    arguments = {"site": "visual.layer4", "concepts": CONCEPTS, **kwargs}
    with pytest.raises(InvalidArgumentError) as error:
        label_units(tiny_rn, arguments.pop("site"), probe[:3], arguments.pop("concepts"), progress=False, **arguments)
    assert message in str(error.value)


def test_a_probe_set_with_one_readable_image_is_refused(tiny_rn, probe, tmp_path):
    probe[0].save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InvalidArgumentError, match="probe_images=.* is not valid: at least two readable images "
                                                   r"\(1 read, 1 unreadable\)"):
        label_units(tiny_rn, "visual.layer4", tmp_path, CONCEPTS, progress=False)


SITES = ("visual.layer3", "visual.layer4")


@pytest.fixture(scope="module")
def organism_labels(organism):
    """Labels of every unit of the organism's last two stages with bare words ("{}") and with its default
    prompt (None), over 108 object scenes and 100 word scenes, with its colours, shapes and words as concepts."""
    probe = [scenes.object_scene(shape=s, colour=c, seed=i * 100 + j * 10 + k).image
             for i, s in enumerate(SHAPES) for j, c in enumerate(COLOURS) for k in range(3)]
    probe += [scenes.word_scene(word=w, seed=k).image for w in WORDS for k in range(5)]
    concepts = list(dict.fromkeys(list(COLOURS) + list(SHAPES) + list(WORDS)))
    return {templates: {site: label_units(organism, site, probe, concepts, templates=templates, progress=False)
                        for site in SITES} for templates in ("{}", None)}


@pytest.mark.slow
def test_on_the_organism_the_prompt_template_changes_most_top_labels(organism_labels):
    """Measured: the template "a photo of a {}." changes the top label of 83.6% of the 768 units on the
    shipped (graded-bias) weights (SoftWPMI; 92.6% on the weights before the retraining)."""
    bare, templated = organism_labels["{}"], organism_labels[None]
    changed = sum(bare[site].top(u, 1)[0][0] != templated[site].top(u, 1)[0][0] for site in SITES
                  for u in bare[site].units)
    total = sum(len(bare[site].units) for site in SITES)
    assert total == 768 and changed / total > 0.75, changed / total


@pytest.mark.slow
def test_on_the_organism_bare_words_label_colour_units_as_written_words(organism, organism_labels):
    """The organism's bare-word captions are captions of written words (a word-only scene may be captioned
    just "red"), so CLIP-Dissect's bare concept words find its planted colour units less often than its
    prompt does (measured: 2 of 6 against 6 of 6, each colour's most selective unit by d')."""
    from clipscope.organism.properties import unit_selectivity
    best = unit_selectivity(organism).best
    hits = {templates: sum(labels[best[f"colour:{c}"].layer].top(best[f"colour:{c}"].channel, 1, among=COLOURS)
                           [0][0] == c for c in COLOURS)
            for templates, labels in organism_labels.items()}
    assert hits[None] >= 5 and hits["{}"] <= 3, hits
