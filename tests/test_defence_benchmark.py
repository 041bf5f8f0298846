"""The defence benchmark: attack sets x defences with Wilson intervals, known answers on the ResNet organism.

- The ``none`` row of a generated attack set is :func:`clipscope.typographic.evaluate`'s result, exactly.
- A defence that changes nothing gives the ``none`` numbers; intervals contain their estimates.
- Under :class:`~clipscope.typographic.PromptDefence` the organism's attacks fail (documented in
  ``tests/test_typographic_organism.py``: success 0.00, every attacked image a "text that says" class).
- Head ablation does not apply to a ResNet: one "not applicable" cell per attack set, no crash; a
  missing defence module is one clear error.
- On a public set (PAINT layout) the ``none`` row equals :meth:`TypographicSet.evaluate`; SCAM gives one
  row per attacked variant with the clean accuracy of its NoSCAM images.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pytest

from clipscope.audit.metrics import wilson
from clipscope.organism import SHAPES
from clipscope.organism.scenes import object_scene
from clipscope.typographic import Attack, Defence, TextStyle, evaluate, load_paint, load_scam, render_text
from clipscope.typographic.benchmark import AttackSet, benchmark, check_defences
from clipscope.validate import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 4_500_000  # a seed block of object scenes used by no other test
STYLE = TextStyle(size=0.25, colour="black", box="white", padding=0.1)  # the organism's documented attack style
ATTACK = Attack.untargeted(STYLE)


class Identity(Defence):
    """A defence with every hook overridden, each changing nothing."""

    name = "identity"

    def classes(self, classes):
        return list(classes), list(classes)

    def context(self, model):
        return contextlib.nullcontext()

    def image(self, image):
        return image.copy()

    def describe(self):
        return "identity (changes nothing)"


@pytest.fixture(scope="module")
def scenes():
    out = [object_scene(shape=SHAPES[i % len(SHAPES)], seed=SEED + i) for i in range(36)]
    return [s.image for s in out], [s.meta["shape"] for s in out]


@pytest.fixture(scope="module")
def result(organism, scenes):
    images, labels = scenes
    return benchmark(organism, images, labels, list(SHAPES), attacks=[ATTACK],
                     defences=["none", "prompt", "head_ablation", Identity()], progress=False)


def _row(result, defence):
    f = result.frame
    return f[f["defence"] == defence].iloc[0]


def test_the_none_row_is_evaluate_s_result_exactly(organism, scenes, result):
    images, labels = scenes
    direct = evaluate(organism, images, labels, list(SHAPES), ATTACK, progress=False)
    row = _row(result, "none")
    assert row["n"] == direct.metrics["n"]
    assert row["clean_accuracy"] == direct.metrics["clean_accuracy"]
    assert row["attacked_accuracy"] == direct.metrics["attacked_accuracy"]
    assert row["attack_success"] == direct.metrics["attack_success_rate"]
    assert row["attack_success"] >= 0.3  # the organism reads (measured 0.52-0.57 on 180-scene blocks)


def test_an_identity_defence_gives_the_none_numbers(result):
    cols = ["n", "clean_accuracy", "attacked_accuracy", "attack_success", "n_success", "success_low", "success_high"]
    assert _row(result, "identity")[cols].tolist() == _row(result, "none")[cols].tolist()


def test_intervals_are_wilson_s_and_contain_the_estimates(result):
    ok = result.frame[result.frame["status"] == "ok"]
    for metric, low, high in (("clean_accuracy", "clean_low", "clean_high"),
                              ("attacked_accuracy", "attacked_low", "attacked_high"),
                              ("attack_success", "success_low", "success_high")):
        assert ((ok[low] <= ok[metric]) & (ok[metric] <= ok[high])).all()
    row = _row(result, "none")
    k = round(row["attack_success"] * row["n_success"])
    assert (row["success_low"], row["success_high"]) == pytest.approx(wilson(k, int(row["n_success"])))


def test_the_prompt_defence_stops_the_organism_s_attack(result):
    row = _row(result, "prompt")
    assert row["attack_success"] <= 0.1 and row["text_detected_rate"] >= 0.9
    assert row["clean_accuracy"] == _row(result, "none")["clean_accuracy"]


def test_head_ablation_on_a_resnet_is_a_not_applicable_cell(result, tmp_path):
    row = _row(result, "head_ablation")
    assert row["status"].startswith("not applicable: head ablation needs attention heads")
    assert math.isnan(row["attack_success"])
    index = result.save(tmp_path / "report")
    page = index.read_text()
    assert "not applicable" in page and page.count("data:image/png;base64") == 1
    assert len(pd.read_csv(tmp_path / "report" / "benchmark.csv")) == 4


def test_an_unknown_defence_is_one_clear_error():
    with pytest.raises(InvalidArgumentError, match="defences='sae'"):
        check_defences(["none", "sae"])


def _paint_folder(folder, n=6):
    """Attacked organism scenes in the PAINT layout: true shape, another shape written over it."""
    folder.mkdir()
    for i in range(n):
        shape, text = SHAPES[i % 6], SHAPES[(i + 1) % 6]
        image = render_text(object_scene(shape=shape, seed=SEED + 100 + i).image, text, STYLE).image
        image.save(folder / f"label={shape}_text={text}__{i:05d}.png")
    return folder


def test_a_public_set_s_none_row_equals_its_own_evaluation(organism, tmp_path):
    tset = load_paint(_paint_folder(tmp_path / "paint"))
    result = benchmark(organism, attacks=[tset], defences=["none"], progress=False)
    _, metrics = tset.evaluate(organism)
    row = _row(result, "none")
    assert row["attacked_accuracy"] == metrics["attacked_accuracy"]
    assert row["attack_success"] == metrics["attack_success_rate"]
    assert math.isnan(row["clean_accuracy"])  # PAINT has no clean images


def test_scam_gives_one_row_per_attacked_variant(organism, tmp_path):
    folder = tmp_path / "scam"
    folder.mkdir()
    rows = []
    for i, variant in enumerate(["SCAM", "SCAM", "SynthSCAM", "NoSCAM", "NoSCAM"]):
        clean = object_scene(shape=SHAPES[i], seed=SEED + 200 + i).image
        image = clean if variant == "NoSCAM" else render_text(clean, SHAPES[i + 1], STYLE).image
        image.save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "type": variant, "object_label": SHAPES[i],
                     "attack_word": SHAPES[i + 1]})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    sets = AttackSet.public(load_scam(folder))
    assert [s.name for s in sets] == ["SCAM: SCAM", "SCAM: SynthSCAM"]
    result = benchmark(organism, attacks=sets, defences=["none"], progress=False)
    assert result.frame["n"].tolist() == [2, 1]
    assert result.frame["clean_accuracy"].nunique() == 1  # both from the two NoSCAM images


def test_the_cli_writes_the_benchmark_report(tmp_path, capsys):
    from clipscope.cli import main
    for i in range(8):
        shape = SHAPES[i % 2]
        (tmp_path / "data" / shape).mkdir(parents=True, exist_ok=True)
        object_scene(shape=shape, seed=SEED + 300 + i).image.save(tmp_path / "data" / shape / f"{i}.png")
    config = tmp_path / "bench.yaml"
    config.write_text(f"data: {{path: {tmp_path / 'data'}}}\nclasses: {list(SHAPES)}\n"
                      "attacks: [{size: 0.25, padding: 0.1}, {target: star, size: 0.25}]\n"
                      "defences: [none, prompt, head_ablation]\n")
    out = tmp_path / "report"
    assert main(["attack", "--benchmark", str(config), "--out", str(out)]) == 0
    assert str((out / "index.html").resolve()) in capsys.readouterr().out
    table = pd.read_csv(out / "benchmark.csv")
    assert len(table) == 6 and (table["status"] == "ok").sum() == 4
    assert "Typographic defence benchmark" in (out / "index.html").read_text()


def test_bad_benchmark_configs_are_one_line_errors(tmp_path, capsys):
    from clipscope.cli import main
    config = tmp_path / "bench.yaml"
    config.write_text("defences: [none, sae]\nsets: []\n")
    assert main(["attack", "--benchmark", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "defences='sae' is not valid" in capsys.readouterr().err
    config.write_text("attacks: [{size: 0.2}]\n")
    assert main(["attack", "--benchmark", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "data=None is not valid" in capsys.readouterr().err
    assert not np.any([p.name == "r" for p in tmp_path.iterdir()])
