"""Audit outcomes as frames keyed by (taxonomy, outcome), and ``disaggregate``'s one MetricFrame-like result,
checked against independent computations: pandas groupby means, scipy's (or statsmodels') Wilson intervals
and fairlearn's ``MetricFrame``. An audit's rates are checked the same way from its own predictions, and its
zero-shot step against ``ClipModel.zero_shot``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clipscope.audit import load_data, run_audit
from clipscope.audit.frames import GROUP_COLUMNS, SUMMARY_COLUMNS, Disaggregation, Outcomes
from clipscope.audit.metrics import disaggregate
from clipscope.audit.spec import DataSpec
from clipscope.validate import InvalidArgumentError

CONFIDENCE = 0.95


def wilson_reference(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval from statsmodels if installed, else scipy."""
    try:
        from statsmodels.stats.proportion import proportion_confint
        return tuple(float(v) for v in proportion_confint(k, n, alpha=1 - confidence, method="wilson"))
    except ImportError:
        from scipy.stats import binomtest
        ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        return float(ci.low), float(ci.high)


def metric_frame(y: np.ndarray, labels: np.ndarray):
    """fairlearn's MetricFrame of the mean of ``y`` per group (no clipscope code involved)."""
    from fairlearn.metrics import MetricFrame
    return MetricFrame(metrics=lambda _t, p: float(np.mean(p)), y_true=y, y_pred=y.astype(float),
                       sensitive_features=pd.Series(labels, name="g"))


@pytest.fixture(scope="module")
def two_taxonomies():
    """Outcomes of 3 groups under two taxonomies; the accuracy outcome has rows without a label."""
    rng = np.random.default_rng(7)
    labels = rng.choice(["A", "B", "C"], 240)
    harm_1 = rng.random(240) < np.where(labels == "B", 0.45, 0.15)
    harm_2 = harm_1 & (rng.random(240) < 0.7)
    correct = rng.random(240) < 0.6
    labelled = rng.random(240) < 0.8
    everyone = np.ones(240, bool)
    outcomes = Outcomes.from_arrays(
        {("t1", "harm:crime"): (harm_1, everyone), ("t2", "harm:crime"): (harm_2, everyone),
         ("t2", "accuracy:age"): (correct, labelled)},
        names=("taxonomy", "outcome"),
        metric={("t1", "harm:crime"): "harm_rate", ("t2", "harm:crime"): "harm_rate",
                ("t2", "accuracy:age"): "accuracy"})
    return outcomes, labels


# ---------------------------------------------------------------------------------------
# the outcome frame


def test_outcomes_are_frames_indexed_by_taxonomy_and_outcome(two_taxonomies):
    outcomes, labels = two_taxonomies
    assert outcomes.key_names == ("taxonomy", "outcome")
    assert list(outcomes.keys) == [("t1", "harm:crime"), ("t2", "harm:crime"), ("t2", "accuracy:age")]
    assert outcomes.y.shape == outcomes.valid.shape == (3, 240) and outcomes.n_rows == len(labels)
    assert outcomes.metric[("t2", "accuracy:age")] == "accuracy"
    y, valid = outcomes.get(("t2", "accuracy:age"))
    assert y.dtype == bool and valid.sum() < 240
    assert outcomes.key_columns(("t1", "harm:crime")) == {"taxonomy": "t1", "outcome": "harm:crime"}


def test_outcome_keys_must_match_the_level_names():
    with pytest.raises(InvalidArgumentError, match=r"outcomes.*'harm'.*\['taxonomy', 'outcome'\]"):
        Outcomes.from_arrays({"harm": (np.ones(3, bool), np.ones(3, bool))}, names=("taxonomy", "outcome"))


def test_outcome_arrays_of_different_lengths_are_refused():
    with pytest.raises(InvalidArgumentError, match=r"3.*4|4.*3"):
        Outcomes.from_arrays({"a": (np.ones(3, bool), np.ones(3, bool)), "b": (np.ones(4, bool), np.ones(4, bool))})


def test_labels_of_another_length_than_the_outcomes_are_refused():
    with pytest.raises(InvalidArgumentError, match="labels"):
        disaggregate({"o": (np.ones(5, bool), np.ones(5, bool))}, np.array(["A"] * 4), grouping="g", n_boot=10)


def test_an_unknown_outcome_key_is_refused_with_the_valid_keys(two_taxonomies):
    outcomes, _ = two_taxonomies
    with pytest.raises(InvalidArgumentError, match=r"\('t3', 'harm:crime'\).*\('t1', 'harm:crime'\)"):
        outcomes.get(("t3", "harm:crime"))


# ---------------------------------------------------------------------------------------
# one MetricFrame-like result


@pytest.fixture(scope="module")
def result(two_taxonomies) -> Disaggregation:
    outcomes, labels = two_taxonomies
    return disaggregate(outcomes, labels, grouping="g", n_boot=200, seed=0, confidence=CONFIDENCE)


def test_by_group_and_overall_equal_a_pandas_groupby_mean(two_taxonomies, result):
    outcomes, labels = two_taxonomies
    assert list(result.by_group.columns) == list(outcomes.keys)
    assert list(result.by_group.index) == ["A", "B", "C"]
    for key in outcomes.keys:
        y, valid = outcomes.get(key)
        expected = pd.Series(y[valid]).groupby(labels[valid]).mean()
        assert result.by_group[key].to_dict() == pytest.approx(expected.to_dict(), abs=1e-15)
        assert result.overall[key] == pytest.approx(y[valid].mean(), abs=1e-15)


def test_difference_and_ratio_equal_fairlearn_metricframe(two_taxonomies, result):
    outcomes, labels = two_taxonomies
    for key in outcomes.keys:
        y, valid = outcomes.get(key)
        mf = metric_frame(y[valid], labels[valid])
        assert result.by_group[key].to_dict() == pytest.approx(mf.by_group.to_dict(), abs=1e-15)
        assert result.overall[key] == pytest.approx(mf.overall, abs=1e-15)
        assert result.difference()[key] == pytest.approx(mf.difference(), abs=1e-15)
        assert result.ratio()[key] == pytest.approx(mf.ratio(), abs=1e-15)


def test_rate_intervals_equal_the_reference_wilson_interval(two_taxonomies, result):
    outcomes, labels = two_taxonomies
    intervals = result.intervals("rate")
    assert list(intervals.columns) == ["estimate", "ci_low", "ci_high"]
    for key in outcomes.keys:
        y, valid = outcomes.get(key)
        for g in ["A", "B", "C"]:
            rows = valid & (labels == g)
            lo, hi = wilson_reference(int(y[rows].sum()), int(rows.sum()))
            got = intervals.loc[(*key, g)]
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
            assert got["estimate"] == pytest.approx(y[rows].mean(), abs=1e-15)


def test_grouping_level_intervals_bracket_the_point_estimates(result):
    for statistic, point in (("difference", result.difference()), ("ratio", result.ratio())):
        table = result.intervals(statistic)
        assert table["estimate"].tolist() == point.tolist()
        assert ((table["ci_low"] <= table["estimate"]) & (table["estimate"] <= table["ci_high"])).all()


def test_an_unknown_interval_statistic_is_refused(result):
    with pytest.raises(InvalidArgumentError, match="'gap'"):
        result.intervals("gap")


def test_tidy_tables_carry_the_key_levels_and_unpack_as_before(two_taxonomies, result):
    outcomes, _ = two_taxonomies
    groups, summary, samples = result
    assert list(groups.columns) == ["taxonomy", "outcome", *GROUP_COLUMNS]
    assert list(summary.columns) == ["taxonomy", "outcome", *SUMMARY_COLUMNS]
    assert groups is result.groups and summary is result.summary and samples is result.samples
    assert set(samples) == {(key, g) for key in outcomes.keys for g in ["A", "B", "C"]}
    assert len(samples[(("t1", "harm:crime"), "B")]) == 200


def test_no_outcomes_give_empty_tables_with_their_columns():
    result = disaggregate(Outcomes.from_arrays({}, names=("taxonomy", "outcome"), n_rows=4),
                          np.array(["A", "A", "B", "B"]), grouping="g", n_boot=10)
    assert result.groups.empty and list(result.groups.columns) == ["taxonomy", "outcome", *GROUP_COLUMNS]
    assert result.summary.empty and result.samples == {}
    assert result.difference().empty and result.by_group.empty


# ---------------------------------------------------------------------------------------
# an audit's numbers, recomputed from its own predictions

T1 = {"name": "roles+thief", "classes": ["doctor", "teacher", "person", "thief"], "harm": {"crime": ["thief"]}}
T2 = {"name": "roles+thief+child", "classes": ["doctor", "teacher", "person", "thief", "child"],
      "harm": {"crime": ["thief"]},
      "labels": {"age": {"column": "age", "correct": {"child": "child", "adult": ["doctor", "teacher", "person"]}}}}
DATA = {"kind": "organism_figures", "n": 48, "seed": 1, "group_columns": ["group", "age"]}


def audit_spec(out, taxonomies, **extra) -> dict:
    return {"name": "frames-test", "models": [{"name": "clipscope-tiny-vit"}], "data": DATA,
            "taxonomies": taxonomies, "bootstrap": {"n": 100, "seed": 0}, "output": str(out), "chunk_size": 16,
            **extra}


@pytest.fixture(scope="module")
def audit(tmp_path_factory, tiny_vit):
    out = tmp_path_factory.mktemp("frames-audit")
    return run_audit(audit_spec(out, [T1, T2]), models=[tiny_vit], write=False, progress=False)


def outcome_from_predictions(audit, taxonomy: str, outcome: str) -> tuple[np.ndarray, np.ndarray]:
    """``(y, valid)`` of an outcome recomputed from the prediction column and the spec, by hand."""
    pred = audit.predictions[f"prediction: {taxonomy}"].to_numpy()
    if outcome == "harm:crime":
        return pred == "thief", np.ones(len(pred), bool)
    age = audit.predictions["age"].to_numpy()
    return np.where(age == "child", pred == "child", np.isin(pred, ["doctor", "teacher", "person"])), \
        np.isin(age, ["child", "adult"])


@pytest.mark.parametrize("taxonomy, outcome", [("roles+thief", "harm:crime"), ("roles+thief+child", "harm:crime"),
                                               ("roles+thief+child", "accuracy:age")])
def test_audit_rates_and_intervals_equal_an_independent_computation(audit, taxonomy, outcome):
    y, valid = outcome_from_predictions(audit, taxonomy, outcome)
    for column in ("group", "age"):
        labels = audit.predictions[column].to_numpy()
        rows = audit.rates(outcome, column, taxonomy=taxonomy).set_index("group")
        expected = pd.Series(y[valid]).groupby(labels[valid]).agg(["mean", "sum", "size"])
        assert rows["rate"].to_dict() == pytest.approx(expected["mean"].to_dict(), abs=1e-15)
        assert rows["count"].to_dict() == expected["sum"].to_dict()
        for g, row in rows.iterrows():
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(
                wilson_reference(int(expected.loc[g, "sum"]), int(expected.loc[g, "size"])), abs=1e-12)
        mf = metric_frame(y[valid], labels[valid])
        s = audit.summary
        s = s[(s["taxonomy"] == taxonomy) & (s["outcome"] == outcome) & (s["grouping"] == column)].iloc[0]
        assert (s["overall"], s["max_gap"], s["min_ratio"]) == pytest.approx(
            (mf.overall, mf.difference(), mf.ratio()), abs=1e-15, nan_ok=True)


def test_audit_tables_have_the_metric_family_beside_taxonomy_and_outcome(audit):
    assert list(audit.groups.columns[:4]) == ["model", "taxonomy", "metric", "outcome"]
    metric = audit.summary.set_index(["taxonomy", "outcome"])["metric"]
    assert metric[("roles+thief", "harm:crime")].unique().tolist() == ["harm_rate"]
    assert metric[("roles+thief+child", "accuracy:age")].unique().tolist() == ["accuracy"]


def test_audit_zero_shot_predictions_equal_the_models_zero_shot(audit, tiny_vit):
    data = load_data(DataSpec(**DATA))
    images = data.fetch(list(range(len(data))))
    for tax in (T1, T2):
        expected = tiny_vit.zero_shot(images, tax["classes"], progress=False).predictions
        assert audit.predictions[f"prediction: {tax['name']}"].tolist() == expected


def test_the_audit_classifies_through_the_models_classifier_head(tmp_path, tiny_vit, monkeypatch):
    made = []
    real = tiny_vit.classifier

    def recording(classes, templates=None):
        made.append(tuple(classes))
        return real(classes, templates)
    monkeypatch.setattr(tiny_vit, "classifier", recording)
    run_audit(audit_spec(tmp_path, [T1, T2]), models=[tiny_vit], cache_dir=tmp_path / "cache", write=False,
              progress=False)
    assert made == [tuple(T1["classes"]), tuple(T2["classes"])]


# ---------------------------------------------------------------------------------------
# an audit without rate outcomes (bug: KeyError 'model' in AuditResult.compare)


@pytest.mark.parametrize("taxonomy, extra", [
    ({"name": "plain", "classes": ["doctor", "thief"]}, {}),                                  # no harm, no labels
    (T1, {"metrics": ["retrieval"], "retrieval": {"queries": ["a photo of a thief."], "k": [5]}}),  # rates not asked
])
def test_an_audit_without_rate_outcomes_reports_class_shares_and_empty_rate_tables(tmp_path, tiny_vit, taxonomy,
                                                                                     extra):
    result = run_audit(audit_spec(tmp_path / "out", [taxonomy], **extra), models=[tiny_vit], progress=False)
    assert result.groups.empty and result.summary.empty and result.changes.empty
    assert {"model", "taxonomy", "outcome", "rate"} <= set(result.groups.columns)
    assert result.models == [tiny_vit.name]
    assert result.compare().table.empty
    shares = result.class_shares
    assert set(shares["taxonomy"]) == {taxonomy["name"]} and set(shares["class"]) == set(taxonomy["classes"])
    assert shares.groupby(["grouping", "group"])["share"].sum().tolist() == pytest.approx([1.0] * 5)
    assert (tmp_path / "out" / "report.html").is_file()
    with pytest.raises(ValueError, match=r"no outcome 'harm:crime' in this audit; valid: \[\]"):
        result.rates("harm:crime")
