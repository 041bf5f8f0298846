"""Attribution of image-text scores to pixels (clipscope.attribution, on captum)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from clipscope.attribution import METHODS, attribute_match
from clipscope.organism import SHAPES, ZERO_SHOT_TEMPLATES
from clipscope.organism.scenes import object_scene
from clipscope.typographic import TextStyle, render_text

from .conftest import make_images

pytestmark = pytest.mark.usefixtures("one_thread")


def object_box(scene, size: int = 64) -> tuple[int, int, int, int]:
    cx, cy = scene.meta["object_center"]
    r = scene.meta["object_radius"]
    return (max(0, int((cx - r) * size)), max(0, int((cy - r) * size)),
            min(size, int((cx + r) * size) + 1), min(size, int((cy + r) * size) + 1))


def area(box, size: int = 64) -> float:
    return (box[2] - box[0]) * (box[3] - box[1]) / size / size


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_a_map_at_the_models_input_size(tiny, method):
    image = make_images(1, size=80)[0]
    a = attribute_match(tiny, image, ["a red square", "a blue circle"], method=method, n_steps=4, n_samples=2,
                        templates=("{}",))
    assert a.attributions.shape == (3, *tiny.image_size) and a.map.shape == tuple(tiny.image_size)
    assert torch.isfinite(a.attributions).all() and a.attributions.abs().sum() > 0
    assert a.image.shape == (3, *tiny.image_size) and 0 <= float(a.image.min()) <= float(a.image.max()) <= 1
    assert a.objective == "probability" and a.target in a.texts and 0 < a.score < 1
    frame = a.to_frame()
    assert list(frame["method"]) == [method]
    assert len(a.plot().axes) == 3 and "<img" in a._repr_html_()


def test_integrated_gradients_are_complete(organism):
    """The attributions add up to score(image) - score(baseline) (measured: 2% off at 64 steps)."""
    scene = object_scene(seed=7)
    for texts in (list(SHAPES), scene.meta["shape"]):   # probability among texts, and similarity to one text
        a = attribute_match(organism, scene.image, texts, target=scene.meta["shape"], templates=ZERO_SHOT_TEMPLATES,
                            method="integrated_gradients", baseline="grey", n_steps=64)
        gap = a.score - a.baseline_score
        assert abs(gap) > 0.2
        assert float(a.attributions.sum()) == pytest.approx(gap, abs=0.05 * abs(gap))
        assert abs(a.delta) < 0.05 * abs(gap)


def test_the_shape_of_an_object_is_found_on_the_object(organism):
    """Occlusion maps of the true shape's probability lie on the object (measured with the default 16 px
    window moved 8 px: 0.82 of the positive mass in a box of 0.35 of the image, on average over these 12
    scenes; every scene above its box's area; the old default, 8 px moved 4, gave 0.96)."""
    masses, areas = [], []
    for i in range(12):
        scene = object_scene(seed=900 + i)
        a = attribute_match(organism, scene.image, list(SHAPES), target=scene.meta["shape"],
                            templates=ZERO_SHOT_TEMPLATES)
        masses.append(a.mass_in(object_box(scene)))
        areas.append(area(object_box(scene)))
    assert np.mean(masses) > np.mean(areas) + 0.25
    assert sum(m > a for m, a in zip(masses, areas)) >= 11


@pytest.fixture(scope="module")
def attacked():
    """Object scenes with a wrong shape's name written below the object (text and object apart)."""
    cases, seed = [], 500
    while len(cases) < 12:
        seed += 1
        scene = object_scene(seed=seed)
        box = object_box(scene)
        if box[3] > 40:
            continue
        wrong = SHAPES[(SHAPES.index(scene.meta["shape"]) + 3) % len(SHAPES)]
        rendered = render_text(scene.image, wrong, TextStyle(size=0.22), position="bottom")
        if rendered.boxes[0][1] < box[3]:
            continue
        cases.append((rendered.image, scene.meta["shape"], wrong, rendered.boxes[0], box))
    return cases


@pytest.mark.slow
def test_the_attacking_word_drives_the_wrong_label_and_the_object_the_right_one(organism, attacked):
    """Measured on these 12 images with the default occlusion (16 px window moved 8 px, 52 forward passes
    per map): the attacking class's positive attribution lies 0.60 in the text box and 0.16 on the object;
    the true class's 0.30 in the text box and 0.35 on the object; the attacking class puts more of it on
    the text in 8 of 12 images. (The old default, 8 px moved 4, 228 passes: 0.46 / 0.26 and 0.30 / 0.51,
    8 of 12. Gradient methods separate them less on this small 64 px model; see notebook 05.)"""
    text_mass = {"true": [], "wrong": []}
    object_mass = {"true": [], "wrong": []}
    for image, true, wrong, text_box, obj_box in attacked:
        for name, target in (("true", true), ("wrong", wrong)):
            a = attribute_match(organism, image, list(SHAPES), target=target, templates=ZERO_SHOT_TEMPLATES)
            text_mass[name].append(a.mass_in(text_box))
            object_mass[name].append(a.mass_in(obj_box))
    assert np.mean(text_mass["wrong"]) > np.mean(text_mass["true"]) + 0.08
    assert np.mean(object_mass["true"]) > np.mean(object_mass["wrong"]) + 0.15
    assert sum(w > t for w, t in zip(text_mass["wrong"], text_mass["true"])) >= 7


def test_default_target_is_the_top_prediction_and_bad_input_is_refused(organism):
    scene = object_scene(shape="star", colour="red", seed=3)
    a = attribute_match(organism, scene.image, list(SHAPES), templates=ZERO_SHOT_TEMPLATES)
    assert a.target == organism.zero_shot([scene.image], list(SHAPES), ZERO_SHOT_TEMPLATES,
                                          progress=False).predictions[0]
    with pytest.raises(ValueError, match="valid: \\['integrated_gradients'"):
        attribute_match(organism, scene.image, list(SHAPES), method="gradcam")
    with pytest.raises(ValueError, match="not among the texts"):
        attribute_match(organism, scene.image, list(SHAPES), target="zebra")
    with pytest.raises(ValueError, match="unknown baseline"):
        attribute_match(organism, scene.image, "a star", baseline="white")
    with pytest.raises(ValueError, match="non-empty"):
        attribute_match(organism, scene.image, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a tensor image in [0, 1] is taken as the model would see it
        t = attribute_match(organism, torch.rand(3, 80, 80), "a star", method="saliency")
    assert t.image.shape == (3, 64, 64)
