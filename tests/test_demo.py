"""The main job writes one report folder: atlas, typographic attack, bias audit, timings, one index."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from clipscope.cli import main

PARTS = ["load the model", "list hookable layers", "zero-shot on generated scenes", "neuron atlas",
         "typographic attack, sweep and defences", "bias audit, two taxonomies"]


@pytest.fixture(scope="module")
def organism_report(tmp_path_factory):
    import io
    from contextlib import redirect_stdout
    out = tmp_path_factory.mktemp("demo") / "report"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--steps", "16"]) == 0
    return out, printed.getvalue()


def test_demo_prints_each_part_with_its_time_and_where_the_report_is(organism_report):
    out, printed = organism_report
    for part in PARTS:
        assert re.search(rf"  {re.escape(part)}: \d+\.\d s", printed), part
    assert f"open {(out / 'index.html').resolve()}" in printed


def test_index_links_the_atlas_the_attack_and_the_audit(organism_report):
    out, _ = organism_report
    index = (out / "index.html").read_text()
    for link in ("atlas/index.html", "attack/index.html", "audit/report.html", "zero_shot.png", "layers.csv"):
        assert f'href="{link}"' in index or f'src="{link}"' in index, link
        assert (out / link).exists(), link
    for part in PARTS:
        assert part in index


def test_atlas_shows_selective_units_of_the_two_last_blocks(organism_report):
    out, _ = organism_report
    for site in ("visual.layer3", "visual.layer4"):
        page = (out / "atlas" / f"{site}.html").read_text()
        assert page.count('class="clipscope-unit-card"') == 8
    labels = re.findall(r"unit \d+ <i>(\w+)</i>", (out / "index.html").read_text())
    assert {"red", "blue", "green"} & set(labels)  # the organism's colour units are among those shown


def test_attack_lowers_accuracy_and_the_sweep_covers_text_sizes(organism_report):
    out, _ = organism_report
    summary = pd.read_csv(out / "attack" / "summary.csv")
    assert list(summary["defence"].str.split(":").str[0]) == ["none", "prompt defence", "ablation of 16 unit(s)"]
    plain = summary.iloc[0]
    assert plain["clean_accuracy"] > 0.9 and plain["attacked_accuracy"] < plain["clean_accuracy"] - 0.3
    sweep = pd.read_csv(out / "attack" / "sweep.csv")
    assert list(sweep["size"]) == [0.1, 0.15, 0.2, 0.25, 0.3, 0.4]
    assert sweep["attack_success_rate"].iloc[-1] > sweep["attack_success_rate"].iloc[0]


def test_audit_finds_the_planted_group_under_both_taxonomies(organism_report):
    out, _ = organism_report
    groups = pd.read_csv(out / "audit" / "groups.csv")
    thief = groups[(groups["grouping"] == "group") & (groups["outcome"] == "harm:crime")]
    rates = thief.pivot(index="group", columns="taxonomy", values="rate")
    assert set(rates.columns) == {"roles+thief", "roles+thief+child"}
    # the graded planted bias (data_cards/organism.md): measured 2026-12-02, roles+thief A 0.070, B 0.285,
    # C 0.070; roles+thief+child A 0.030, B 0.175, C 0.055
    for taxonomy, gap in (("roles+thief", 0.10), ("roles+thief+child", 0.06)):
        assert rates.loc["B", taxonomy] > rates.loc["A", taxonomy] + gap
        assert rates.loc["B", taxonomy] > rates.loc["C", taxonomy] + gap


def test_demo_runs_on_another_architecture(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["demo", "--model", "clipscope-tiny-vit", "--out", str(out), "--steps", "2"]) == 0
    assert "neuron atlas:" in capsys.readouterr().out
    assert (out / "atlas" / "visual.transformer.resblocks.1.html").exists()
    table = pd.read_csv(out / "zero_shot.csv")
    assert len(table) == 64 and {"true_shape", "prediction", "predicted_colour"} <= set(table.columns)


@pytest.fixture(scope="module")
def vit_organism_report(tmp_path_factory):
    import io
    from contextlib import redirect_stdout
    out = tmp_path_factory.mktemp("demo-vit") / "report"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["demo", "--model", "organism-vit", "--out", str(out), "--steps", "2"]) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_runs_on_the_vit_organism_with_its_mlp_neurons_in_the_atlas(vit_organism_report):
    out, printed = vit_organism_report
    for part in PARTS:
        assert re.search(rf"  {re.escape(part)}: \d+\.\d s", printed), part
    layers = pd.read_csv(out / "layers.csv")
    assert (layers["layout"] == "pattern").any()  # head-level sites are listed
    # the organism's unit sites: the MLP activations (GELU) of the image tower's last two blocks
    mlp_neurons = layers[(layers["tower"] == "visual") & (layers["type"] == "GELU")]["name"].tolist()[-2:]
    for site in mlp_neurons:
        page = (out / "atlas" / f"{site}.html").read_text()
        assert page.count('class="clipscope-unit-card"') == 8
    labels = re.findall(r"unit \d+ <i>(\w+)</i>", (out / "index.html").read_text())
    assert {"red", "blue", "green"} & set(labels)  # selective colour neurons are among those shown
