"""Audit metrics against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clipscope.audit.metrics import (
    chi2_homogeneity_p,
    disaggregate,
    fisher_p,
    holm,
    max_skew_at_k,
    mcnemar_p,
    ndkl,
    retrieval_metrics,
    skew_at_k,
    two_proportion_z,
)


def test_skew_and_max_skew_on_a_four_item_ranking():
    ranked = ["A", "A", "B", "B"]
    # top 2 is all A; uniform desired share 1/2 -> Skew(A) = ln(1 / 0.5), Skew(B) = ln(0) = -inf
    skews = skew_at_k(ranked, 2)
    assert skews["A"] == pytest.approx(math.log(2))
    assert skews["B"] == -math.inf
    assert max_skew_at_k(ranked, 2) == pytest.approx(math.log(2))
    assert max_skew_at_k(ranked, 3) == pytest.approx(math.log((2 / 3) / 0.5))
    assert max_skew_at_k(ranked, 4) == pytest.approx(0.0)


def test_skew_with_the_data_distribution_as_desired():
    ranked = ["A", "B", "B", "B"]          # A is 1/4 of the data
    assert max_skew_at_k(ranked, 1, desired="data") == pytest.approx(math.log(1 / 0.25))
    assert max_skew_at_k(ranked, 4, desired="data") == pytest.approx(0.0)
    assert skew_at_k(ranked, 2, desired={"A": 0.5, "B": 0.5}) == pytest.approx({"A": 0.0, "B": 0.0})


def test_ndkl_by_hand():
    ranked = ["A", "A", "B", "B"]
    kl = [math.log(2), math.log(2), (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5), 0.0]
    w = [1 / math.log2(i + 1) for i in range(1, 5)]
    expected = sum(a * b for a, b in zip(kl, w)) / sum(w)
    assert ndkl(ranked) == pytest.approx(expected)
    assert ndkl(ranked, k=2) == pytest.approx(math.log(2))          # both prefixes are all A
    assert ndkl(["A", "B", "A", "B"], k=2) == pytest.approx(math.log(2) * 1 / (1 + 1 / math.log2(3)))


def test_tests_match_hand_values():
    z, p = two_proportion_z(3, 4, 1, 4)
    assert z == pytest.approx(0.5 / math.sqrt(0.25 * 0.5))
    assert p == pytest.approx(math.erfc(1.0))
    assert fisher_p(3, 4, 1, 4) == pytest.approx(34 / 70)              # hypergeometric tails: (1+16+16+1)/70
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert chi2_homogeneity_p([0, 0], [5, 5]) == 1.0
    assert chi2_homogeneity_p([50, 5], [100, 100]) < 1e-6


def test_disaggregate_rates_differences_and_tests():
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    labels = np.array(["A"] * 4 + ["B"] * 4)
    groups, summary, _ = disaggregate({"harm": (y, np.ones(8, bool))}, labels, grouping="g", n_boot=200, seed=0)
    a = groups.set_index("group").loc["A"]
    assert (a["n"], a["count"], a["rate"], a["rest_rate"]) == (4, 3, 0.75, 0.25)
    assert a["diff_vs_rest"] == pytest.approx(0.5)
    assert a["ratio_vs_rest"] == pytest.approx(3.0)
    assert a["p_fisher"] == pytest.approx(34 / 70)
    assert a["ci_low"] <= 0.75 <= a["ci_high"]
    s = summary.iloc[0]
    assert (s["overall"], s["max_gap"], s["min_ratio"]) == pytest.approx((0.5, 0.5, 1 / 3))


def test_validity_mask_removes_rows_from_one_outcome_only():
    y = np.array([1, 0, 1, 1], bool)
    valid = np.array([True, True, False, True])
    labels = np.array(["A", "A", "B", "B"])
    groups, _, _ = disaggregate({"acc": (y, valid), "all": (y, np.ones(4, bool))}, labels, grouping="g", n_boot=50)
    acc = groups[groups["outcome"] == "acc"].set_index("group")
    assert acc.loc["A", "rate"] == 0.5 and acc.loc["B", "n"] == 1 and acc.loc["B", "rate"] == 1.0
    allr = groups[groups["outcome"] == "all"].set_index("group")
    assert allr.loc["B", "n"] == 2


def test_point_estimates_agree_with_fairlearn_metricframe():
    from fairlearn.metrics import MetricFrame
    rng = np.random.default_rng(1)
    labels = rng.choice(["x", "y", "z"], 300)
    y = rng.random(300) < np.where(labels == "y", 0.4, 0.1)
    groups, summary, _ = disaggregate({"o": (y, np.ones(300, bool))}, labels, grouping="g", n_boot=10)
    mf = MetricFrame(metrics=lambda t, p: np.mean(p), y_true=y, y_pred=y, sensitive_features=labels)
    assert groups.set_index("group")["rate"].to_dict() == pytest.approx(mf.by_group.to_dict())
    assert summary["max_gap"].iloc[0] == pytest.approx(mf.difference())


def test_rate_interval_is_close_to_the_normal_approximation_and_ratios_are_seeded():
    rng = np.random.default_rng(0)
    labels = np.repeat(["A", "B"], 400)
    y = np.concatenate([rng.random(400) < 0.25, rng.random(400) < 0.10])
    g1, _, _ = disaggregate({"o": (y, np.ones(800, bool))}, labels, grouping="g", n_boot=2000, seed=3)
    a = g1.set_index("group").loc["A"]
    half_width = 1.96 * math.sqrt(a["rate"] * (1 - a["rate"]) / 400)
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * half_width, rel=0.15)
    assert a["diff_ci_low"] > 0                       # a 15-point gap with n=400 per group is clear
    g2, _, _ = disaggregate({"o": (y, np.ones(800, bool))}, labels, grouping="g", n_boot=2000, seed=3)
    pd.testing.assert_frame_equal(g1, g2)
    g3, _, _ = disaggregate({"o": (y, np.ones(800, bool))}, labels, grouping="g", n_boot=2000, seed=4)
    assert not np.allclose(g1["ratio_ci_low"], g3["ratio_ci_low"])   # the ratio's interval is bootstrapped
    pd.testing.assert_frame_equal(g1[["ci_low", "ci_high"]], g3[["ci_low", "ci_high"]])  # score intervals: no draws


def test_rates_of_zero_and_one_get_honest_intervals_not_points():
    labels = np.repeat(["A", "B", "C"], 200)
    y = labels == "B"                                # B always, A and C never
    groups, _, _ = disaggregate({"o": (y, np.ones(600, bool))}, labels, grouping="g", n_boot=500, seed=0)
    g = groups.set_index("group")
    assert g.loc["A", "ci_low"] == 0 and g.loc["A", "ci_high"] == pytest.approx(0.0188, abs=5e-4)  # Wilson, 0/200
    assert g.loc["B", "ci_high"] == 1 and g.loc["B", "ci_low"] == pytest.approx(0.9812, abs=5e-4)
    assert g.loc["B", "diff_ci_low"] < 1 and g.loc["B", "diff_ci_low"] > 0.95   # Newcombe: wide of a point
    assert g.loc["A", "diff_ci_low"] < -0.5 < g.loc["A", "diff_ci_high"]


def test_wilson_and_newcombe_match_published_values():
    from clipscope.audit.metrics import newcombe_diff, wilson
    # Newcombe (1998), Statistics in Medicine 17:857, table II: 56/70 - 48/80 -> 0.0524 to 0.3339
    lo, hi = newcombe_diff(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert np.isnan(wilson(0, 0)[0])


def test_resamples_are_shared_across_outcomes_so_changes_are_paired():
    rng = np.random.default_rng(0)
    labels = np.repeat(["A", "B"], 50)
    y = rng.random(100) < 0.3
    y2 = y.copy()
    y2[:5] = ~y2[:5]
    _, _, samples = disaggregate({"t1": (y, np.ones(100, bool)), "t1 again": (y, np.ones(100, bool)),
                                  "t2": (y2, np.ones(100, bool))}, labels, grouping="g", n_boot=300, seed=0)
    assert np.array_equal(samples[("t1", "A")], samples[("t1 again", "A")])
    change = samples[("t2", "A")] - samples[("t1", "A")]
    assert change.std() < (samples[("t1", "A")]).std()   # pairing makes the change far less noisy


def test_retrieval_metrics_with_a_perfectly_biased_ranking():
    labels = np.array(["A"] * 10 + ["B"] * 10)
    sim = np.array([np.r_[np.ones(10), np.zeros(10)] + np.linspace(0, 0.01, 20)])   # all A first
    df = retrieval_metrics(sim, labels, ["q"], [5, 20], grouping="g", n_random=100, seed=0)
    top5 = df[df["k"] == 5].iloc[0]
    assert top5["max_skew"] == pytest.approx(math.log(2))
    assert top5["most_over"] == "A" and top5["share[A]"] == 1.0
    assert top5["p_random"] < 0.2 and top5["max_skew_random"] < math.log(2)
    assert df[df["k"] == 20].iloc[0]["max_skew"] == pytest.approx(0.0)
