"""Audit reports that cannot mislead, spec paths that resolve against the spec's folder, and output faults
caught before any image is encoded (issue #14)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import clipscope
from clipscope import cli
from clipscope.audit import load_spec, run_audit
from clipscope.audit.metrics import disaggregate, max_gap_interval, min_ratio_interval
from clipscope.audit.plots import plot_class_shares, plot_comparison
from clipscope.io import OutputError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# class-share chart: one colour per class, a legend for every class, no band for a missing class

SHARES = {  # taxonomy -> group -> class -> share (every taxonomy's classes, in its own order)
    "roles+thief": {"A": {"doctor": 0.5, "teacher": 0.5, "thief": 0.0},
                    "B": {"doctor": 0.0, "teacher": 0.0, "thief": 1.0}},
    "roles+thief+child": {"A": {"child": 0.5, "doctor": 0.3, "teacher": 0.2, "thief": 0.0},
                          "B": {"child": 0.4, "doctor": 0.0, "teacher": 0.0, "thief": 0.6}},
}


def shares_frame() -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "taxonomy": tax, "grouping": "group", "group": g, "class": c,
                          "count": int(share * 10), "share": share}
                         for tax, by_group in SHARES.items() for g, by_class in by_group.items()
                         for c, share in by_class.items()])


def the_legend(fig):
    """The figure's one legend, wherever it is placed."""
    [legend] = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return legend


def legend_colours(legend) -> dict[str, tuple]:
    return {text.get_text(): tuple(handle.get_facecolor())
            for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def bars_by_class(ax, colours: dict[str, tuple]) -> dict[tuple[str, int], float]:
    """``{(class, group index): height}`` of a panel's bars, the class found from the legend's colour."""
    out = {}
    for patch in ax.patches:
        [name] = [c for c, colour in colours.items() if np.allclose(patch.get_facecolor(), colour)]
        out[(name, round(patch.get_x() + patch.get_width() / 2))] = patch.get_height()
    return out


def test_every_class_has_one_colour_and_the_legend_names_it_in_every_panel():
    fig = plot_class_shares(shares_frame(), list(SHARES))
    colours = legend_colours(the_legend(fig))
    assert sorted(colours) == ["child", "doctor", "teacher", "thief"]       # every class shown, once
    assert len({tuple(np.round(c, 6)) for c in colours.values()}) == 4      # four distinct colours
    panels = {ax.get_title(): ax for ax in fig.axes}
    for tax, by_group in SHARES.items():
        bars = bars_by_class(panels[tax], colours)
        expected = {(c, gi): share for gi, g in enumerate(sorted(by_group)) for c, share in by_group[g].items()}
        assert bars == pytest.approx(expected)
    assert bars_by_class(panels["roles+thief"], colours)[("thief", 1)] == 1.0   # B's 'thief' bar is thief's colour


def test_a_class_missing_from_a_taxonomy_has_no_bar_in_its_panel():
    fig = plot_class_shares(shares_frame(), list(SHARES))
    child = legend_colours(the_legend(fig))["child"]
    panel = next(ax for ax in fig.axes if ax.get_title() == "roles+thief")
    assert panel.patches and not [p for p in panel.patches if np.allclose(p.get_facecolor(), child)]


def test_the_comparison_legend_lists_the_taxonomies_of_every_panel_in_their_bar_colours():
    rows = [{"outcome": o, "grouping": "group", "group": g, "taxonomy": tax, "rate": 0.5, "ci_low": 0.4,
             "ci_high": 0.6} for o, tax in (("harm:crime", "t1"), ("accuracy:age", "t2")) for g in "AB"]
    fig = plot_comparison(pd.DataFrame(rows), ["t1", "t2"])
    colours = legend_colours(the_legend(fig))
    assert sorted(colours) == ["t1", "t2"]
    for ax, tax in zip(fig.axes, ["t1", "t2"]):
        assert ax.patches and all(np.allclose(p.get_facecolor(), colours[tax]) for p in ax.patches)


# ---------------------------------------------------------------------------------------
# the largest gap and smallest ratio: intervals that can cover "no disparity"


def groups_with_counts(counts: dict[str, int], n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Outcome and group label per row: ``counts[g]`` of group g's ``n`` rows are positive."""
    y = np.concatenate([np.arange(n) < k for k in counts.values()])
    return y, np.repeat(list(counts), n)


def summary_of(counts: dict[str, int]) -> pd.Series:
    y, labels = groups_with_counts(counts)
    _, summary, _ = disaggregate({"o": (y, np.ones(len(y), bool))}, labels, grouping="g", n_boot=200)
    return summary.iloc[0]


def test_equal_rates_give_a_zero_gap_whose_interval_contains_zero():
    s = summary_of({"A": 30, "B": 30, "C": 30})
    assert s["max_gap"] == 0.0 and s["p_chi2"] == 1.0
    assert s["max_gap_ci_low"] == 0.0 < s["max_gap_ci_high"] < 0.3
    assert s["min_ratio"] == 1.0 and s["min_ratio_ci_low"] < 1.0 == s["min_ratio_ci_high"]


def test_a_planted_gap_gets_an_interval_that_excludes_zero():
    s = summary_of({"A": 0, "B": 100})
    assert s["max_gap"] == 1.0 and 0.9 < s["max_gap_ci_low"] <= s["max_gap_ci_high"] == 1.0
    assert s["min_ratio"] == 0.0 and s["min_ratio_ci_low"] == 0.0 and s["min_ratio_ci_high"] < 0.1


def test_fewer_than_two_groups_with_rows_have_no_gap_interval():
    assert np.isnan(max_gap_interval([3], [10])).all()
    assert np.isnan(max_gap_interval([3, 0], [10, 0])).all()
    assert np.isnan(min_ratio_interval([3], [10])).all()


def coverage(true_rates: list[float], draws: int = 200, n: int = 100) -> tuple[int, int]:
    """Draws (of ``draws``) whose 95% gap and ratio intervals cover the true largest gap and smallest ratio."""
    rng = np.random.default_rng(14)
    gap, ratio = max(true_rates) - min(true_rates), min(true_rates) / max(true_rates)
    gaps = ratios = 0
    for _ in range(draws):
        k = rng.binomial(n, true_rates)
        lo, hi = max_gap_interval(k, [n] * len(k))
        gaps += lo <= gap <= hi
        lo, hi = min_ratio_interval(k, [n] * len(k))
        ratios += lo <= ratio <= hi
    return gaps, ratios


def test_intervals_cover_no_gap_in_at_least_90_percent_of_draws_of_equal_groups():
    # measured: 189 of 200 draws (gap) and 200 of 200 (ratio) for three groups at 0.3, n = 100 each
    gaps, ratios = coverage([0.3, 0.3, 0.3])
    assert gaps >= 180 and ratios >= 180


def test_intervals_cover_a_true_gap_in_at_least_90_percent_of_draws():
    # measured: 198 of 200 draws (gap 0.3) and 200 of 200 (ratio 0.4) for rates 0.2, 0.3, 0.5, n = 100 each
    gaps, ratios = coverage([0.2, 0.3, 0.5])
    assert gaps >= 180 and ratios >= 180


def test_the_interval_always_contains_the_observed_gap():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = rng.integers(1, 60, size=rng.integers(2, 6))
        k = rng.binomial(n, rng.random(len(n)))
        rates = k / n
        lo, hi = max_gap_interval(k, n)
        assert lo <= rates.max() - rates.min() <= hi
        lo, hi = min_ratio_interval(k, n)
        if rates.max() > 0:
            assert lo <= rates.min() / rates.max() <= hi


# ---------------------------------------------------------------------------------------
# paths inside a spec file resolve against the file's folder


def imagefolder_spec(**extra) -> dict:
    return {"name": "paths", "models": [{"name": "clipscope-tiny-vit"}],
            "data": {"kind": "imagefolder", "path": "images", "group_columns": ["group"]},
            "taxonomies": [{"name": "t", "classes": ["a", "b"], "harm": {"h": ["a"]}}], **extra}


def write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_relative_paths_resolve_against_the_spec_folder_not_the_working_directory(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "specs", imagefolder_spec(output="../reports/x", cache_dir="cache"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = load_spec(path)
    assert spec.source_dir == tmp_path / "specs"
    assert spec.data.path == str(tmp_path / "specs" / "images")
    assert spec.output == str(tmp_path / "reports" / "x")
    assert spec.cache_dir == str(tmp_path / "specs" / "cache")


def test_absolute_paths_hub_ids_unset_variables_and_the_default_output_stay_as_written(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_AUDIT_ROOT", raising=False)
    spec = load_spec(write_spec(tmp_path, imagefolder_spec(data={"kind": "imagefolder", "path": str(tmp_path / "abs"),
                                                                 "group_columns": ["group"]})))
    assert spec.data.path == str(tmp_path / "abs") and spec.output == "audit-out"
    hub = imagefolder_spec(data={"kind": "hf", "path": "someone/faces", "group_columns": ["group"]})
    assert load_spec(write_spec(tmp_path / "hub", hub)).data.path == "someone/faces"
    unset = imagefolder_spec(data={"kind": "fairface", "path": "${NO_SUCH_AUDIT_ROOT}", "group_columns": ["race"]})
    assert load_spec(write_spec(tmp_path / "unset", unset)).data.path == "${NO_SUCH_AUDIT_ROOT}"


def test_a_missing_data_folder_error_names_the_folder_tried_and_the_spec_folder(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "specs", imagefolder_spec(output="out"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        run_audit(path, progress=False)
    message = str(info.value)
    assert repr(str(tmp_path / "specs" / "images")) in message and repr(str(tmp_path / "specs")) in message


def test_the_shipped_specs_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FAIRFACE_ROOT", raising=False)
    organism = load_spec(ROOT / "audits" / "organism_planted_bias.yaml")
    assert organism.output == "audit-out" and organism.source_dir == ROOT / "audits"
    paper = load_spec(ROOT / "audits" / "clip_paper_fairface.yaml")
    assert paper.output == str(ROOT / "audit-out" / "clip-paper-fairface")
    assert paper.data.path == "${FAIRFACE_ROOT}"


# ---------------------------------------------------------------------------------------
# unwritable output and cache folders are found before any image is encoded


@pytest.fixture
def no_encoding(monkeypatch) -> list:
    """Records every request to embed images (and refuses it): the list must stay empty."""
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(args)
        raise AssertionError("the audit asked the model to encode images")
    monkeypatch.setattr(clipscope.ClipModel, "embed", refuse)
    return calls


def organism_spec(**extra) -> dict:
    return {"name": "faults", "models": [{"name": "clipscope-tiny-vit"}],
            "data": {"kind": "organism_figures", "n": 12, "group_columns": ["group"]},
            "taxonomies": [{"name": "t", "classes": ["doctor", "thief"], "harm": {"crime": ["thief"]}}],
            "bootstrap": {"n": 20}, **extra}


def test_cli_reports_an_output_folder_under_a_file_in_one_line_before_encoding(tmp_path, capsys, no_encoding):
    (tmp_path / "file").write_text("not a folder")
    spec = write_spec(tmp_path, organism_spec())
    out = tmp_path / "file" / "out"
    assert cli.main(["audit", str(spec), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out) in err and "Not a directory" in err
    assert no_encoding == []


def test_an_unwritable_cache_folder_is_reported_before_encoding(tmp_path, no_encoding):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="Not a directory") as info:
        run_audit(organism_spec(), cache_dir=tmp_path / "file" / "cache", write=False, progress=False)
    assert info.value.path == tmp_path / "file" / "cache"
    assert no_encoding == []


def test_the_spec_cache_dir_is_the_cache_used(tmp_path, tiny_vit):
    result = run_audit(organism_spec(cache_dir=str(tmp_path / "spec-cache")), models=[tiny_vit], write=False,
                       progress=False)
    assert result.provenance["cache_dir"] == str(tmp_path / "spec-cache")
    assert list((tmp_path / "spec-cache").rglob("chunk_*.safetensors"))
