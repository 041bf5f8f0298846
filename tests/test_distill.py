"""The Distill automated-attack protocol (Goh et al. 2021) as a runnable spec: known answers.

- The setup reproduces the article's Figure 15: eight copies of the text centred at the measured
  positions, 6-10% pixel cover on a 288-pixel image (the article's attacks: 6.4-10.0%).
- On the ResNet organism (which reads rendered words, data card property 2) the probe is fitted on
  shape scenes and word scenes; writing a word class on the test images turns the probe to that word,
  writing letters that are no word ("qxz") does not. Figures measured 2026-12-02 on three seed
  blocks (7,000,000 / 7,100,000 / 7,200,000; 196 training and 84 test images, one thread):
  changed_to apple 0.69 / 0.85 / 0.79, pizza 0.75 / 0.69 / 0.67, control "qxz" -> pizza
  0.07 / 0.05 / 0.01, circle (a written shape name against drawn shapes) 0.00 in all three;
  probe clean accuracy 0.95 / 0.95 / 0.93; pixel cover 0.08-0.16.
- The probe's clean accuracy equals an independent recomputation; the four outcome fractions of
  each target sum to one (as in the article's ``small_attacks.json``).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clipscope.typographic.distill import (DISTILL_POSITIONS, DISTILL_SETUP, GOH_BASELINE_ACCURACY, GOH_TARGETS,
                                           ORGANISM_SETUP, DistillTarget, distill_protocol, distill_protocol_folder,
                                           organism_distill, organism_distill_data, stamp)
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 7_000_000
TARGETS = [DistillTarget("apple", "apple"), DistillTarget("pizza", "pizza"), DistillTarget("pizza", "qxz")]
#: Thresholds (measured values above, margins of at least 0.15 below the lowest / above the highest).
READ_SUCCESS = 0.50
CONTROL_SUCCESS = 0.20


@pytest.fixture(scope="module")
def blas_one_thread():
    """One BLAS thread while the probe is fitted: on a busy 2-core machine OpenBLAS' spinning threads made
    the L-BFGS sweep 25x slower (48 s against 1.8 s, measured 2026-12-02)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def result(organism, blas_one_thread):
    return organism_distill(organism, n_train=196, n_test=84, seed=SEED, targets=TARGETS, grid=5, progress=False)


def test_the_reference_table_is_goh_et_al_s():
    table = {t.target: (t.text, t.reference_success) for t in GOH_TARGETS}
    assert table == {"waste container": ("trash", 0.954), "iPod": ("iPod", 0.947), "rifle": ("rifle", 0.910),
                     "pizza": ("pizza", 0.923), "radio": ("radio", 0.770), "great white shark": ("shark", 0.622),
                     "library": ("library", 0.759), "Siamese cat": ("meow", 0.465), "piggy bank": ("$$$", 0.364)}
    assert all(0.06 <= t.reference_cover <= 0.10 for t in GOH_TARGETS) and GOH_BASELINE_ACCURACY == 0.742


def test_the_setup_writes_eight_copies_at_the_figure_s_positions():
    image = Image.new("RGB", (288, 288), (120, 140, 110))
    out, cover = stamp(image, "pizza", DISTILL_SETUP)
    changed = np.any(np.asarray(out) != np.asarray(image), axis=-1)
    assert cover == pytest.approx(changed.mean())
    assert 0.06 <= cover <= 0.10  # the article's attacks changed 6.4-10.0% of the pixels
    # one row band per copy (the copies overlap horizontally, never vertically)
    bands, n = ndimage.label(changed.any(axis=1))
    assert n == 8
    for k, (x, y) in enumerate(DISTILL_POSITIONS):
        rows = np.flatnonzero(bands == k + 1)
        cols = np.flatnonzero(changed[rows].any(axis=0))
        assert abs((rows[0] + rows[-1]) / 2 - y * 288) <= 3 and abs((cols[0] + cols[-1]) / 2 - x * 288) <= 3


@pytest.mark.slow  # the organism run: ~120 s on the loaded 2-core machine (sklearn import, 12 L-BFGS fits)
def test_words_the_organism_reads_turn_the_probe_and_unread_letters_do_not(result):
    f = result.frame.set_index("text")
    assert f.loc["apple", "changed_to"] >= READ_SUCCESS and f.loc["pizza", "changed_to"] >= READ_SUCCESS
    assert f.loc["qxz", "changed_to"] <= CONTROL_SUCCESS
    assert f.loc["pizza", "changed_to"] - f.loc["qxz", "changed_to"] >= 0.4
    assert ((f["cover"] > 0.05) & (f["cover"] < 0.2)).all()  # measured 0.08-0.16 (ORGANISM_SETUP)


@pytest.mark.slow  # the organism run: ~120 s on the loaded 2-core machine (sklearn import, 12 L-BFGS fits)
def test_outcomes_sum_to_one_and_intervals_hold_the_estimates(result):
    f = result.frame
    total = f["changed_to"] + f["already_equal"] + f["changed_away"] + f["neither"]
    assert np.allclose(total, 1.0)
    assert ((f["changed_to_low"] <= f["changed_to"]) & (f["changed_to"] <= f["changed_to_high"])).all()
    lo, hi = result.clean_interval
    assert lo <= result.clean_accuracy <= hi
    assert f["reference_success"].isna().all() and (f["n"] == 84).all()


@pytest.mark.slow  # the organism run: ~120 s on the loaded 2-core machine (sklearn import, 12 L-BFGS fits)
def test_the_clean_accuracy_matches_an_independent_computation(organism, result):
    _, _, test, labels = organism_distill_data(196, 84, SEED)
    features = organism.encode_image(test, batch_size=7, progress=False)  # other batches than the protocol's
    assert result.probe.accuracy(features, np.array(labels)) == pytest.approx(result.clean_accuracy, abs=1e-12)
    per_image = result.images[result.images["text"] == "qxz"]
    assert (per_image["clean_prediction"] == per_image["label"]).mean() == pytest.approx(result.clean_accuracy)


@pytest.mark.slow  # the organism run: ~120 s on the loaded 2-core machine (sklearn import, 12 L-BFGS fits)
def test_the_report_shows_measured_next_to_reference(result, tmp_path):
    path = result.save_html(tmp_path / "distill.html")
    text = path.read_text()
    assert "reference_success" in text and "changed_to" in text and text.count("data:image/png;base64") >= 2


@pytest.mark.slow
def test_an_imagenet_style_folder_matches_targets_by_wordnet_id(organism, blas_one_thread, tmp_path):
    train, train_y, test, test_y = organism_distill_data(140, 42, SEED + 50_000)  # 10 / 3 per class
    folder_of = {"pizza": "n07873807"}  # Goh et al.'s pizza row matches the folder through its wnid
    for split, images, labels in (("train", train, train_y), ("val", test, test_y)):
        for i, (im, y) in enumerate(zip(images, labels)):
            if y in ("pizza", "circle", "square"):
                (tmp_path / split / folder_of.get(y, y)).mkdir(parents=True, exist_ok=True)
                im.save(tmp_path / split / folder_of.get(y, y) / f"{i}.png")
    (tmp_path / "val" / "circle" / "broken.png").write_bytes(b"not an image")
    pizza = next(t for t in GOH_TARGETS if t.target == "pizza")
    result = distill_protocol_folder(organism, tmp_path / "train", tmp_path / "val", [pizza], n_test=None,
                                     setup=ORGANISM_SETUP, grid=3, progress=False)
    row = result.frame.iloc[0]
    assert row["target"] == "n07873807" and row["reference_success"] == 0.923 and row["n"] == 9
    assert len(result.skipped) == 1 and "broken.png" in str(result.skipped[0][0])


def test_a_target_that_is_not_a_probe_class_is_refused_before_any_image_is_encoded(organism, blas_one_thread):
    from clipscope.probe import fit_linear_probe
    probe = fit_linear_probe(np.eye(4)[[0, 1, 2, 3] * 5] + 0.01 * np.arange(20)[:, None], ["ipod", "pizza"] * 10,
                             grid=3)
    with pytest.raises(InvalidArgumentError, match=r"targets='iPod' .*close: \['ipod'\]"):
        distill_protocol(organism, None, None, [Image.new("RGB", (8, 8))], ["pizza"], [("iPod", "iPod")], probe=probe)
