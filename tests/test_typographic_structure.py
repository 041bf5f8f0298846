"""Typographic evaluation structure: zero-shot scoring through the model's classifier, and clean scores
computed once (``clean_scores``) and handed to ``evaluate`` explicitly."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from clipscope.typographic import (AblationDefence, Attack, CleanScores, PromptDefence, TextStyle, clean_scores,
                                   evaluate)
from clipscope.hooks import Unit
from clipscope.typographic.attack import readable_jobs
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

CLASSES = ["cat", "dog", "ipod"]


@pytest.fixture(scope="module")
def images():
    return make_images(8, size=64)


LABELS = ["cat", "dog", "ipod", "cat", "dog", "ipod", "cat", None]


def counting(monkeypatch, model) -> list[int]:
    """Record the batch size of every image-tower forward pass of ``model``."""
    calls: list[int] = []
    original = model.model.encode_image
    monkeypatch.setattr(model.model, "encode_image", lambda x, *a, **k: calls.append(len(x)) or original(x, *a, **k))
    return calls


def test_clean_probabilities_are_the_model_zero_shot_head_on_the_clean_images(tiny_vit, images):
    result = evaluate(tiny_vit, images, LABELS, CLASSES, Attack.targeted("ipod"), templates="{} photo")
    head = tiny_vit.classifier(CLASSES, "{} photo")
    with torch.no_grad():
        expected = head.probs(tiny_vit.encode_image(torch.stack([tiny_vit.preprocess(im) for im in images])))
    frame = result.to_frame()
    assert list(frame["clean_prediction"]) == [CLASSES[i] for i in expected.argmax(1).tolist()]
    labelled = frame["label"].notna()
    rows = [CLASSES.index(label) for label in frame.loc[labelled, "label"]]
    mask = torch.tensor(labelled.to_list())
    assert torch.allclose(torch.tensor(frame.loc[labelled, "clean_p_label"].to_list()),
                          expected[mask].gather(1, torch.tensor(rows)[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(torch.tensor(frame["clean_p_target"].to_list()), expected[:, 2], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("defence", [None, PromptDefence()], ids=["no defence", "prompt defence"])
def test_evaluate_with_clean_scores_equals_evaluate_without(tiny_vit, images, defence):
    attack = Attack.untargeted(TextStyle(size=0.25), "random")
    clean = clean_scores(tiny_vit, images, CLASSES, defence=defence)
    assert isinstance(clean, CleanScores) and clean.indices == list(range(8)) and clean.probs.shape == (8, 3)
    plain = evaluate(tiny_vit, images, LABELS, CLASSES, attack, defence=defence, batch_size=3)
    for workers in (1, 2):  # with two workers the clean images are not even preprocessed again
        given = evaluate(tiny_vit, images, LABELS, CLASSES, attack, defence=defence, batch_size=3, workers=workers,
                         clean=clean)
        pd.testing.assert_frame_equal(given.to_frame(), plain.to_frame(), atol=1e-6)
        assert given.metrics == pytest.approx(plain.metrics, nan_ok=True)


def test_clean_scores_encode_each_clean_image_once_and_evaluate_then_only_the_attacked_ones(tiny_vit, images,
                                                                                          monkeypatch):
    calls = counting(monkeypatch, tiny_vit)
    clean = clean_scores(tiny_vit, images, CLASSES, batch_size=5)
    assert calls == [5, 3]
    calls.clear()
    evaluate(tiny_vit, images, LABELS, CLASSES, Attack.targeted("ipod"), batch_size=5, clean=clean)
    assert calls == [5, 3]  # attacked images only
    calls.clear()
    evaluate(tiny_vit, images, LABELS, CLASSES, Attack.targeted("ipod"), batch_size=5)
    assert calls == [5, 5, 3, 3]  # clean and attacked


def test_clean_scores_skip_and_list_unreadable_images(tiny_vit, images, tmp_path):
    bad = tmp_path / "truncated.png"
    images[0].save(bad)
    bad.write_bytes(bad.read_bytes()[:40])
    source = [images[0], str(bad), images[1]]
    clean = clean_scores(tiny_vit, source, CLASSES)
    assert clean.indices == [0, 2] and clean.keys == [0, 2] and clean.get(1) is None
    assert [key for key, _ in clean.skipped] == [str(bad)]
    result = evaluate(tiny_vit, source, ["cat", "dog", "ipod"], CLASSES, Attack.targeted("ipod"), clean=clean)
    assert list(result.frame["index"]) == [0, 2] and result.skipped == clean.skipped


def test_clean_scores_of_another_setting_are_refused(tiny_vit, images):
    attack = Attack.targeted("ipod")
    clean = clean_scores(tiny_vit, images, CLASSES)
    with pytest.raises(InvalidArgumentError, match=r"clean\.templates=\('a photo of a \{\}\.',\) is not valid"):
        evaluate(tiny_vit, images, LABELS, CLASSES, attack, templates="{} photo", clean=clean)
    with pytest.raises(InvalidArgumentError, match=r"clean\.scored=.* is not valid: .*'text that says cat'"):
        evaluate(tiny_vit, images, LABELS, CLASSES, attack, defence=PromptDefence(), clean=clean)
    ablation = AblationDefence([Unit.channel("visual.transformer.resblocks.1", 0)])
    with pytest.raises(InvalidArgumentError, match=r"clean\.defence='none' is not valid: 'ablation of 1 unit"):
        evaluate(tiny_vit, images, LABELS, CLASSES, attack, defence=ablation, clean=clean)
    with pytest.raises(InvalidArgumentError, match=r"clean\.classes=\('cat', 'dog', 'ipod'\) is not valid"):
        evaluate(tiny_vit, images, [None] * 8, ["cat", "ipod"], attack, clean=clean)
    with pytest.raises(InvalidArgumentError, match=r"clean=\{\} is not valid: CleanScores"):
        evaluate(tiny_vit, images, LABELS, CLASSES, attack, clean={})


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["cat", "cat"]}, "classes="),
    ({"classes": "cat, dog"}, "classes='cat, dog'"),
    ({"defence": "prompt"}, "defence='prompt'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"images": []}, "images=[] is not valid: at least one image"),
])
def test_bad_clean_scores_arguments_are_refused(tiny_vit, images, kwargs, message):
    arguments = {"images": images[:2], "classes": CLASSES, **kwargs}
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        clean_scores(tiny_vit, arguments.pop("images"), arguments.pop("classes"), **arguments)


def test_readable_jobs_without_labels_give_every_image_none(images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    skipped: list = []
    jobs = list(readable_jobs([images[0], str(bad), images[1]], None, skipped))
    assert [(index, key, label) for index, key, _, label in jobs] == [(0, 0, None), (2, 2, None)]
    assert [key for key, _ in skipped] == [str(bad)]
