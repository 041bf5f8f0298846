"""The attribution methods as objects (captum's style): same answers as ``attribute_match``, occlusion's
cost as documented, batching that changes nothing but speed, and one clear error per bad setting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipscope.attribution import (METHODS, IntegratedGradients, InputXGradient, Occlusion, Saliency, SmoothGrad,
                                   attribute_match)
from clipscope.organism import SHAPES, ZERO_SHOT_TEMPLATES
from clipscope.organism.scenes import object_scene
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"integrated_gradients": IntegratedGradients, "saliency": Saliency, "input_x_gradient": InputXGradient,
           "smoothgrad": SmoothGrad, "occlusion": Occlusion}
SETTINGS = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 2}, "occlusion": {}}


@pytest.fixture(scope="module")
def scene():
    return object_scene(shape="star", colour="red", seed=3)


class CountingImageTower:
    """Counts the calls of ``model.encode_image`` and the images they carry, while in a ``with`` block."""

    def __init__(self, model):
        self.model, self.calls, self.images = model, 0, 0

    def __enter__(self):
        original = self.model.encode_image

        def counted(images, **kwargs):
            self.calls += 1
            self.images += len(images)
            return original(images, **kwargs)
        self.model.encode_image = counted
        return self

    def __exit__(self, *exc):
        del self.model.encode_image   # back to the class's method


def test_there_is_one_class_per_method_named_as_in_METHODS():
    assert {name: cls.name for name, cls in CLASSES.items()} == {name: name for name in METHODS}
    assert {cls.description for cls in CLASSES.values()} == set(METHODS.values())


@pytest.mark.parametrize("method", list(METHODS))
def test_a_class_gives_what_attribute_match_gives(organism, scene, method):
    settings = SETTINGS.get(method, {})
    by_object = CLASSES[method](organism, **settings).attribute(scene.image, list(SHAPES), target="star",
                                                                  templates=ZERO_SHOT_TEMPLATES)
    by_name = attribute_match(organism, scene.image, list(SHAPES), target="star", templates=ZERO_SHOT_TEMPLATES,
                              method=method, **settings)
    assert by_object.method == by_name.method == method
    assert torch.equal(by_object.attributions, by_name.attributions)
    assert (by_object.score, by_object.target) == (by_name.score, by_name.target)


def test_the_scores_are_the_model_classifiers(organism, scene):
    """Probability: the model's zero-shot head on the image as preprocessed; similarity: the cosine to the
    text's class embedding."""
    a = attribute_match(organism, scene.image, list(SHAPES), target="star", templates=ZERO_SHOT_TEMPLATES,
                        method="saliency")
    emb = organism.encode_image([scene.image], progress=False)
    probs = organism.classifier(list(SHAPES), ZERO_SHOT_TEMPLATES).probs(emb)[0]
    assert a.score == pytest.approx(float(probs[SHAPES.index("star")]), abs=1e-5)
    one = attribute_match(organism, scene.image, "star", templates=ZERO_SHOT_TEMPLATES, method="saliency")
    cosine = F.normalize(emb, dim=-1) @ organism.class_embeddings(["star"], ZERO_SHOT_TEMPLATES).T
    assert one.objective == "similarity" and one.score == pytest.approx(float(cosine[0, 0]), abs=1e-5)


def test_the_default_occlusion_is_a_quarter_window_moved_an_eighth(organism, tiny):
    occ = Occlusion(organism)
    assert (occ.window, occ.stride, occ.positions, occ.forward_passes()) == (16, 8, 49, 52)
    side = min(tiny.image_size)
    assert Occlusion(tiny).window == max(2, side // 4) and Occlusion(tiny).stride == max(1, side // 8)


@pytest.mark.parametrize("window,stride,batch_size", [(16, 8, 16), (16, 8, 1), (8, 4, 16), (20, 12, 5)])
def test_occlusion_runs_the_documented_number_of_forward_passes(organism, scene, window, stride, batch_size):
    """P = (ceil((H - window) / stride) + 1) * (ceil((W - window) / stride) + 1) occluded images, plus 3,
    in ceil(P / batch_size) + 2 calls of the image tower (20 and 12 do not tile 64 px: the last patch is cut)."""
    occ = Occlusion(organism, window=window, stride=stride, batch_size=batch_size)
    h, w = organism.image_size
    positions = (math.ceil((h - window) / stride) + 1) * (math.ceil((w - window) / stride) + 1)
    with CountingImageTower(organism) as tower:
        occ.attribute(scene.image, list(SHAPES), templates=ZERO_SHOT_TEMPLATES)
    assert occ.positions == positions
    assert tower.images == occ.forward_passes() == positions + 3
    assert tower.calls == math.ceil(positions / batch_size) + 2


def test_batching_the_occluded_images_does_not_change_the_map(organism, scene):
    one = Occlusion(organism, batch_size=1).attribute(scene.image, list(SHAPES), templates=ZERO_SHOT_TEMPLATES)
    many = Occlusion(organism, batch_size=49).attribute(scene.image, list(SHAPES), templates=ZERO_SHOT_TEMPLATES)
    assert one.map.abs().sum() > 0
    torch.testing.assert_close(one.attributions, many.attributions, atol=1e-5, rtol=1e-4)
    assert one.score == pytest.approx(many.score, abs=1e-6)


BAD_SETTINGS = [
    (Occlusion, {"window": 0}, "window", "0"),
    (Occlusion, {"window": 65}, "window", "65"),
    (Occlusion, {"stride": 0}, "stride", "0"),
    (Occlusion, {"window": 8, "stride": 9}, "stride", "9"),
    (Occlusion, {"batch_size": 0}, "batch_size", "0"),
    (Occlusion, {"baseline": "white"}, "baseline", "'white'"),
    (Occlusion, {"baseline": torch.zeros(3, 32, 32)}, "baseline", "(3, 32, 32)"),
    (IntegratedGradients, {"n_steps": 0}, "n_steps", "0"),
    (IntegratedGradients, {"batch_size": 2.5}, "batch_size", "2.5"),
    (SmoothGrad, {"noise": -0.1}, "noise", "-0.1"),
    (SmoothGrad, {"n_samples": 0}, "n_samples", "0"),
]


@pytest.mark.parametrize("cls,settings,parameter,shown", BAD_SETTINGS,
                         ids=[f"{c.name}-{p}-{s}" for c, _, p, s in BAD_SETTINGS])
def test_a_bad_setting_is_refused_when_the_method_is_made(organism, cls, settings, parameter, shown):
    with pytest.raises(InvalidArgumentError, match="is not valid") as err:
        cls(organism, **settings)
    assert err.value.parameter == parameter and shown in str(err.value)


@pytest.mark.parametrize("texts,image,parameter,shown", [
    (["star", "star"], None, "texts", "'star' appears twice"),
    (["star", ""], None, "texts", "''"),
    (list(SHAPES), torch.rand(2, 3, 64, 64), "image", "(2, 3, 64, 64)"),
    (list(SHAPES), torch.rand(64, 64), "image", "(64, 64)"),
])
def test_bad_texts_or_images_are_refused_naming_them(organism, scene, texts, image, parameter, shown):
    with pytest.raises(InvalidArgumentError) as err:
        Saliency(organism).attribute(scene.image if image is None else image, texts)
    assert err.value.parameter == parameter and shown in str(err.value)


def test_a_tensor_baseline_of_the_input_size_is_the_occlusion_fill(organism, scene):
    """A baseline equal to the image changes nothing when a patch is 'occluded': the map is zero."""
    image = Saliency(organism).attribute(scene.image, "star").image
    a = Occlusion(organism, baseline=image).attribute(image, list(SHAPES), templates=ZERO_SHOT_TEMPLATES)
    assert float(a.map.abs().max()) == pytest.approx(0.0, abs=1e-6)
    assert a.baseline_score == pytest.approx(a.score, abs=1e-6)
