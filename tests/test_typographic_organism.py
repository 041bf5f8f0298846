"""Typographic attacks on the model organism: the toolkit finds the planted property the data card states.

The organism (``data_cards/organism.md``) was trained on captions that often name only a word written
over an object, so it reads rendered words and typographic attacks work on it. These tests run
clipscope's own renderer and harness (``clipscope.typographic``), not the organism's training
renderer, on object scenes drawn from a seed block used nowhere else (training used seed 0, the
card's evaluation seeds 1,000,003 and up).

Figures measured when the thresholds were set (balanced blocks of 180 object scenes, classes = SHAPES,
default template "a photo of a {}."), style ``TextStyle(size=0.25, padding=0.1)`` (black on a white box)
at the centre, on this file's block and five others:
- attack success 0.52-0.57 (this block 0.55); clean accuracy 0.96-0.99, attacked accuracy 0.18-0.23;
- under ``PromptDefence()``: success 0.00, every attacked image goes to a "text that says ..." class
  (text_detected_rate 1.00), clean accuracy unchanged;
- success over sizes 0.08 / 0.14 / 0.20 / 0.25: 0.04-0.08 / 0.14-0.17 / 0.43-0.51 / 0.52-0.57, mean pixel
  cover 0.022 / 0.084 / 0.148 / 0.185. Above 0.25 success plateaus (long names hit the fit-to-width
  limit, so the letters stop growing), so only the rising range is required to be monotone;
- single-image (iPod-style) case: 9 of 11 clean-correct scenes flip to the written word on this block,
  9-12 of 12 on eight other blocks.
"""
from __future__ import annotations

import numpy as np
import pytest

from clipscope.organism import SHAPES
from clipscope.organism.scenes import object_scene
from clipscope.typographic import Attack, PromptDefence, TextStyle, evaluate, render_text, sweep

#: First seed of this file's evaluation scenes; distinct from training (0), from the card's
#: evaluation seeds (1,000,003+) and from the blocks used to choose the settings below (5,000,000+).
TEST_SEED = 4_000_000
N_SCENES = 180  # 30 per shape

#: The documented attack style: DejaVu Sans Bold, a quarter of the image high, black on a white box.
STYLE = TextStyle(size=0.25, colour="black", box="white", padding=0.1)

#: Data card, property 2 "typographic attack": test threshold on the success rate (Distill
#: definition). The card measured 0.497 with the organism's own training renderer
#: (clipscope.organism.scenes.render_word); this file uses clipscope's renderer instead.
CARD_SUCCESS_THRESHOLD = 0.40
#: Data card: shape accuracy must drop by more than this under the attack (measured 0.983 -> 0.243).
CARD_ACCURACY_DROP = 0.30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(organism):
    return organism


@pytest.fixture(scope="module")
def scenes():
    """Word-free object scenes, balanced over the six shapes."""
    out = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=TEST_SEED + i) for i in range(N_SCENES)]
    return [s.image for s in out], [s.meta["shape"] for s in out]


@pytest.fixture(scope="module")
def attacked(model, scenes):
    images, labels = scenes
    return evaluate(model, images, labels, SHAPES, Attack.untargeted(STYLE, "center"), progress=False)


def test_writing_a_wrong_shape_name_reaches_the_cards_attack_success(attacked):
    m = attacked.metrics
    assert m["clean_accuracy"] >= 0.90  # the model knows the shapes before the attack
    assert m["attack_success_rate"] >= CARD_SUCCESS_THRESHOLD, m
    assert m["clean_accuracy"] - m["attacked_accuracy"] > CARD_ACCURACY_DROP, m
    # the success rate only counts images whose clean prediction was not already the written name
    frame = attacked.to_frame()
    eligible = frame[frame["clean_prediction"] != frame["text"]]
    assert frame["success"].notna().sum() == len(eligible) > 0.9 * len(frame)


def test_the_prompt_defence_lowers_success_and_keeps_clean_accuracy(model, scenes, attacked):
    images, labels = scenes
    defended = evaluate(model, images, labels, SHAPES, Attack.untargeted(STYLE, "center"),
                        defence=PromptDefence(), progress=False)
    before, after = attacked.metrics, defended.metrics
    assert after["attack_success_rate"] <= before["attack_success_rate"] - 0.25, (before, after)
    # attacked images are recognised as text rather than read as the written shape ...
    assert after["text_detected_rate"] >= 0.5, after
    # ... while clean images are not: the extra "text that says ..." classes cost little clean accuracy
    assert after["clean_accuracy"] >= 0.90, after
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.05, (before, after)


def test_larger_text_covers_more_pixels_and_succeeds_more_often(model, scenes):
    images, labels = scenes
    sizes = [0.08, 0.14, 0.2, 0.25]  # the rising range; success plateaus above 0.25
    result = sweep(model, images, labels, SHAPES, Attack.untargeted(STYLE, "center"), {"size": sizes},
                   progress=False)
    frame = result.frame.sort_values("size")
    assert list(frame["size"]) == sizes
    cover = frame["mean_cover"].to_numpy()
    assert np.all(np.diff(cover) > 0), cover  # strictly: bigger letters change more pixels
    success = frame["attack_success_rate"].to_numpy()
    assert np.all(np.diff(success) >= -0.03), success  # non-decreasing up to sampling noise
    assert success[-1] - success[0] >= 0.25, success
    accuracy = frame["attacked_accuracy"].to_numpy()
    assert accuracy[0] > accuracy[-1] + 0.2, accuracy  # and the model is right less often


#: iPod-style pairs (true shape -> written word), one per shape: the word whose attack succeeded most often
#: on the shipped (graded-bias) weights, measured on about 20 scenes per pair of another seed block
#: (4,600,000+; every chosen pair 0.94 to 1.00). The organism does not read every word equally: on a circle,
#: "square" and "triangle" never worked, and on a hexagon only "circle" works well (0.94; "triangle" 0.33),
#: so the single-image case is specified for words it reads.
IPOD_PAIRS = [("circle", "hexagon"), ("square", "hexagon"), ("triangle", "hexagon"), ("star", "triangle"),
              ("cross", "triangle"), ("hexagon", "circle")]


def test_a_word_written_on_one_object_becomes_its_top_prediction(model):
    clean_correct, flipped, lines = 0, 0, []
    for i, (shape, word) in enumerate(IPOD_PAIRS * 2):  # 12 scenes, two per pair
        clean = object_scene(shape=shape, seed=TEST_SEED + 100_000 + i).image
        written = render_text(clean, word, STYLE, "center").image
        result = model.zero_shot([clean, written], SHAPES, progress=False)
        before, after = result.predictions
        lines.append(f"{shape} + '{word}': {before} -> {after} (p={float(result.probs[1].max()):.2f})")
        if before == shape:  # like the apple: the model sees the object correctly before the label goes on
            clean_correct += 1
            flipped += after == word
    assert clean_correct >= 10, "\n".join(lines)
    assert flipped >= 2 / 3 * clean_correct, "\n".join(lines)  # most of them now read as the written word
