"""Audit metrics: disaggregated rates with score and bootstrap intervals, significance tests, retrieval skew.

Classification side (:func:`disaggregate`): for binary per-image outcomes (``assigned a harmful
class``, ``correct``), the rate in every group with its Wilson score interval, the group's difference
to the rest of the data (all other groups pooled) with Newcombe's score interval for a difference of
two independent proportions, the ratio to the rest with a percentile-bootstrap interval, Fisher's exact test and a
two-proportion z-test of the gap (two-sided, Holm-adjusted across the groups of one grouping), and
for the grouping as a whole the largest gap (max - min) and the smallest ratio (min / max) with
simultaneous score intervals (:func:`max_gap_interval`, :func:`min_ratio_interval`) and a chi-square
test of homogeneity.
Point estimates come from fairlearn's ``MetricFrame``.

Score intervals rather than the bootstrap for rates and differences: at a rate of 0 or 1 (a group
never or always labelled "thief") every bootstrap resample has the same rate, so a percentile
interval collapses to a point and claims a certainty 200 images cannot give; the Wilson interval
for 0 of 200 is [0, 0.019] at 95%. The largest gap and smallest ratio cannot use a percentile
bootstrap of max - min or min / max either: those statistics never cross 0 and 1, so their intervals
exclude "no disparity" even when every group has the same rate. The ratio to the rest and taxonomy
changes keep the bootstrap, which pairs them.

The bootstrap resamples images *within each group* (group sizes fixed), with draws that depend only
on ``(seed, grouping, group)``. Every outcome computed for the same rows therefore uses the same
resamples, which makes intervals for the change between two taxonomies *paired*.

Retrieval side (:func:`max_skew_at_k`, :func:`ndkl`, :func:`retrieval_metrics`): rank images by
similarity to a text query and compare the groups among the top ``k`` with a desired distribution
(Geyik et al., 2019; Berg et al., 2022). ``Skew@k(a) = ln(p_topk(a) / p_desired(a))``;
``MaxSkew@k = max_a Skew@k(a)``; ``NDKL = (1/Z) sum_{i<=k} KL(D_top-i || D_desired) / log2(i + 1)``
with ``Z = sum_{i<=k} 1 / log2(i + 1)``.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..validate import check_int, check_number, check_same_length
from .frames import GROUP_COLUMNS, SUMMARY_COLUMNS, Disaggregation, Outcomes

_MAX_DRAW_CELLS = 4_000_000  # bootstrap draws held in memory at once


# ---------------------------------------------------------------------------------------
# tests


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z statistic for ``k1/n1 - k2/n2`` and its two-sided p-value."""
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p-value for the 2x2 table ``[[k1, n1-k1], [k2, n2-k2]]``."""
    from scipy.stats import fisher_exact
    if n1 == 0 or n2 == 0:
        return float("nan")
    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)


def chi2_homogeneity_p(k: Sequence[int], n: Sequence[int]) -> float:
    """p-value of the chi-square test that every group has the same rate (1.0 when no outcome varies)."""
    from scipy.stats import chi2_contingency
    k, n = np.asarray(k, float), np.asarray(n, float)
    keep = n > 0
    k, n = k[keep], n[keep]
    if len(k) < 2 or k.sum() == 0 or k.sum() == n.sum():
        return 1.0
    return float(chi2_contingency(np.stack([k, n - k], axis=1)).pvalue)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` (yes->no) and ``c`` (no->yes)."""
    from scipy.stats import binomtest
    if b + c == 0:
        return 1.0
    return float(binomtest(int(b), int(b + c), 0.5).pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(pvalues, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    idx = np.where(ok)[0][np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------
# disaggregation with bootstrap


def _draw_seed(seed: int, grouping: str, group: str) -> list[int]:
    return [int(seed), zlib.crc32(grouping.encode()), zlib.crc32(str(group).encode())]


def bootstrap_group_sums(y: np.ndarray, valid: np.ndarray, members: np.ndarray, n_boot: int,
                         rng_seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap sums over one group's rows: ``(k*, n*)`` arrays of shape ``(n_outcomes, n_boot)``.

    ``y`` and ``valid`` are ``(n_outcomes, n_rows)``; ``members`` the group's row indices. Rows are
    drawn with replacement from the group (deterministic given ``rng_seed``).
    """
    rng = np.random.default_rng(rng_seed)
    m = len(members)
    ks = np.zeros((y.shape[0], n_boot))
    ns = np.zeros((y.shape[0], n_boot))
    if m == 0 or n_boot == 0 or y.shape[0] == 0:
        return ks, ns
    yv = (y[:, members] * valid[:, members]).astype(np.float64)
    vv = valid[:, members].astype(np.float64)
    block = max(1, _MAX_DRAW_CELLS // m)
    for b0 in range(0, n_boot, block):
        b1 = min(n_boot, b0 + block)
        draws = rng.integers(0, m, size=(b1 - b0, m), dtype=np.int64)
        # counts of each member per resample, then one matrix product for every outcome
        flat = (draws + (np.arange(b1 - b0) * m)[:, None]).ravel()
        counts = np.bincount(flat, minlength=(b1 - b0) * m).reshape(b1 - b0, m).astype(np.float64)
        ks[:, b0:b1] = yv @ counts.T
        ns[:, b0:b1] = vv @ counts.T
    return ks, ns


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (non-finite ones dropped); ``(nan, nan)`` when none are left."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``; ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    from statistics import NormalDist
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_diff(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) for ``k1/n1 - k2/n2``, independent samples."""
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, confidence)
    l2, u2 = wilson(k2, n2, confidence)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def max_gap_interval(k: Sequence[int], n: Sequence[int], confidence: float = 0.95) -> tuple[float, float]:
    """Simultaneous interval of the largest gap between group rates, ``max_i k_i/n_i - min_j k_j/n_j``.

    Every pair of groups gets Newcombe's hybrid score interval for its difference (Newcombe, 1998,
    Statistics in Medicine 17:873-890, method 10) at the Bonferroni-adjusted confidence
    ``1 - (1 - confidence) / m`` for ``m`` pairs. With at least ``confidence`` probability every
    pairwise difference then lies in its interval, so the largest gap lies between the largest lower
    limit and the largest upper limit, whichever pairs attain them. A gap cannot be negative, so the
    lower limit is clipped at 0: it is 0 when the data are consistent with no gap (and always when
    every group has the same rate). Returns ``(low, high)`` in rate units; ``(nan, nan)`` with fewer
    than two groups that have rows (``n > 0``).
    """
    kept = [(int(ki), int(ni)) for ki, ni in zip(k, n) if ni > 0]
    m = len(kept) * (len(kept) - 1) // 2
    if m == 0:
        return float("nan"), float("nan")
    adjusted = 1 - (1 - confidence) / m
    limits = [newcombe_diff(k1, n1, k2, n2, adjusted) for i, (k1, n1) in enumerate(kept)
              for j, (k2, n2) in enumerate(kept) if i != j]
    return max(0.0, max(lo for lo, _ in limits)), min(1.0, max(hi for _, hi in limits))


def min_ratio_interval(k: Sequence[int], n: Sequence[int], confidence: float = 0.95) -> tuple[float, float]:
    """Simultaneous interval of the smallest ratio between group rates, ``min_i p_i / max_j p_j``.

    Every group's rate gets a Wilson score interval ``[l_i, u_i]`` at the Bonferroni-adjusted confidence
    ``1 - (1 - confidence) / g`` for ``g`` groups; with at least ``confidence`` probability every rate
    lies in its interval, and then the smallest ratio lies in ``[min l / max u, min u / max l]``. A
    ratio of the lowest to the highest rate cannot exceed 1, so the upper limit is clipped at 1: it is
    1 when the data are consistent with no disparity. Returns ``(low, high)`` as ratios;
    ``(nan, nan)`` with fewer than two groups that have rows (``n > 0``).
    """
    kept = [(int(ki), int(ni)) for ki, ni in zip(k, n) if ni > 0]
    if len(kept) < 2:
        return float("nan"), float("nan")
    limits = [wilson(ki, ni, 1 - (1 - confidence) / len(kept)) for ki, ni in kept]
    low = min(lo for lo, _ in limits) / max(hi for _, hi in limits)
    top = max(lo for lo, _ in limits)
    return low, 1.0 if top == 0 else min(1.0, min(hi for _, hi in limits) / top)


def group_labels(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """One label per row for a grouping: the column's value, or the values joined by ' × '."""
    if len(columns) == 1:
        return frame[columns[0]].astype(str).to_numpy()
    return frame[list(columns)].astype(str).agg(" × ".join, axis=1).to_numpy()


def disaggregate(outcomes: Outcomes | Mapping[Hashable, tuple[np.ndarray, np.ndarray]], labels: np.ndarray, *,
                 grouping: str, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> Disaggregation:
    """Per-group rates of binary outcomes with score and bootstrap intervals and significance tests.

    ``outcomes`` is an :class:`~clipscope.audit.frames.Outcomes` frame (keys such as ``(taxonomy,
    outcome)``) or a mapping ``{name: (y, valid)}`` of boolean arrays over the same rows (``valid``
    False removes a row from that outcome, e.g. a missing label). ``labels`` is the group of each row.
    Returns one :class:`~clipscope.audit.frames.Disaggregation`: rates per group and overall, the
    largest gap and smallest ratio (point estimates from fairlearn's ``MetricFrame``) with their
    intervals, the tidy per-group and per-outcome tables, and the bootstrap rates for paired comparisons.
    """
    labels = np.asarray(labels).astype(str)
    frame = outcomes if isinstance(outcomes, Outcomes) else Outcomes.from_arrays(outcomes, n_rows=len(labels))
    check_same_length(labels=labels, outcome_rows=range(frame.n_rows))
    n_boot = check_int("n_boot", n_boot, low=0)
    confidence = check_number("confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    groups = sorted(set(labels.tolist()))
    members = {g: np.where(labels == g)[0] for g in groups}
    Y, V = frame.arrays()
    draws = _bootstrap(Y, V, members, n_boot, seed, grouping)
    points = _point_estimates(Y, V, labels, grouping)
    rows, summary, samples = [], [], {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for j, key in enumerate(frame.keys):
            counts = _Counts.of(Y[j], V[j], members)
            head = {**frame.key_columns(key), "grouping": grouping}
            group_rows = _group_rows(head, counts, points.by_group[j], draws, j, confidence)
            rows += group_rows
            samples.update({(key, g): draws.rates(j, g) for g in groups})
            summary.append(_summary_row(head, counts, points, j, confidence))
    key_names = frame.key_names
    return Disaggregation(grouping, key_names, pd.DataFrame(rows, columns=[*key_names, *GROUP_COLUMNS]),
                          pd.DataFrame(summary, columns=[*key_names, *SUMMARY_COLUMNS]), samples, confidence)


@dataclass(frozen=True)
class _Counts:
    """One outcome's positives ``k[g]`` and valid rows ``n[g]`` per group (groups in sorted order)."""
    k: dict[str, int]
    n: dict[str, int]

    @classmethod
    def of(cls, y: np.ndarray, valid: np.ndarray, members: Mapping[str, np.ndarray]) -> _Counts:
        return cls({g: int((y & valid)[m].sum()) for g, m in members.items()},
                   {g: int(valid[m].sum()) for g, m in members.items()})

    @property
    def total(self) -> tuple[int, int]:
        return sum(self.k.values()), sum(self.n.values())


@dataclass(frozen=True)
class _Draws:
    """Bootstrap sums per group, ``k[g]`` and ``n[g]`` of shape ``(n_outcomes, n_boot)``, and their totals."""
    k: dict[str, np.ndarray]
    n: dict[str, np.ndarray]
    total_k: np.ndarray | None
    total_n: np.ndarray | None

    def rates(self, j: int, g: str) -> np.ndarray:
        """Bootstrap rates ``p*`` of outcome ``j`` in group ``g``."""
        return self.k[g][j] / self.n[g][j]

    def rest_rates(self, j: int, g: str) -> np.ndarray:
        """Bootstrap rates of outcome ``j`` over every group but ``g`` (from the same resamples)."""
        return (self.total_k[j] - self.k[g][j]) / (self.total_n[j] - self.n[g][j])


def _bootstrap(Y: np.ndarray, V: np.ndarray, members: Mapping[str, np.ndarray], n_boot: int, seed: int,
               grouping: str) -> _Draws:
    """Resample every group's rows once (seeded by ``(seed, grouping, group)``) for every outcome."""
    k, n = {}, {}
    for g, rows in members.items():
        k[g], n[g] = bootstrap_group_sums(Y, V, rows, n_boot, _draw_seed(seed, grouping, g))
    return _Draws(k, n, sum(k.values()) if members else None, sum(n.values()) if members else None)


@dataclass(frozen=True)
class _Points:
    """Point estimates per outcome index: rates per group (a Series), overall, largest gap, smallest ratio."""
    by_group: list[pd.Series]
    overall: list[float]
    gap: list[float]
    ratio: list[float]


def _point_estimates(Y: np.ndarray, V: np.ndarray, labels: np.ndarray, grouping: str) -> _Points:
    """Point estimates from fairlearn's ``MetricFrame``, one metric per outcome.

    ``y_true`` carries row indices so each outcome's metric applies its own validity mask within a group.
    """
    from fairlearn.metrics import MetricFrame
    n_out = Y.shape[0]
    if not n_out or not len(labels):
        nan = [float("nan")] * n_out
        return _Points([pd.Series(dtype=float)] * n_out, nan, nan, nan)

    def make_metric(j):
        def rate(rows, _pred):
            rows = np.asarray(rows)
            v = V[j, rows]
            return float(Y[j, rows][v].mean()) if v.any() else float("nan")
        return rate
    names = [f"outcome {j}" for j in range(n_out)]
    mf = MetricFrame(metrics={name: make_metric(j) for j, name in enumerate(names)},
                     y_true=np.arange(len(labels)), y_pred=np.zeros(len(labels)),
                     sensitive_features=pd.Series(labels, name=grouping))
    diff, ratio = mf.difference(), mf.ratio()
    return _Points([mf.by_group[name].astype(float) for name in names], [float(mf.overall[name]) for name in names],
                   [float(diff[name]) for name in names], [float(ratio[name]) for name in names])


def _group_rows(head: dict, counts: _Counts, by_group: pd.Series, draws: _Draws, j: int,
                confidence: float) -> list[dict]:
    """One row per group for outcome ``j``: rate, difference and ratio to the rest, intervals, tests."""
    K, N = counts.total
    rows = []
    for g in counts.k:
        k, n = counts.k[g], counts.n[g]
        rate = float(by_group[g]) if g in by_group.index else float("nan")
        kr, nr = K - k, N - n
        rest = kr / nr if nr else float("nan")
        r_star = draws.rates(j, g) / draws.rest_rates(j, g)
        z, pz = two_proportion_z(k, n, kr, nr)
        lo, hi = wilson(k, n, confidence)
        dlo, dhi = newcombe_diff(k, n, kr, nr, confidence)
        rlo, rhi = percentile_interval(r_star, confidence)
        rows.append({
            **head, "group": g, "n": n, "count": k, "rate": rate,
            "ci_low": lo, "ci_high": hi, "rest_rate": rest,
            "diff_vs_rest": rate - rest if n and nr else float("nan"), "diff_ci_low": dlo, "diff_ci_high": dhi,
            "ratio_vs_rest": _ratio_to_rest(rate, rest) if n and nr else float("nan"),
            "ratio_ci_low": rlo, "ratio_ci_high": rhi,
            "z": z, "p_z": pz, "p_fisher": fisher_p(k, n, kr, nr),
        })
    for row, p in zip(rows, holm([r["p_fisher"] for r in rows])):
        row["p_fisher_holm"] = float(p)
    return rows


def _ratio_to_rest(rate: float, rest: float) -> float:
    """``rate / rest``; inf for a positive rate over a zero rest, NaN for 0 / 0."""
    return rate / rest if rest else (float("inf") if rate else float("nan"))


def _summary_row(head: dict, counts: _Counts, points: _Points, j: int, confidence: float) -> dict:
    """The grouping as a whole for outcome ``j``: overall rate, largest gap and smallest ratio with
    simultaneous intervals, chi-square homogeneity p-value, number of groups with rows."""
    K, N = counts.total
    k, n = list(counts.k.values()), list(counts.n.values())
    gap_lo, gap_hi = max_gap_interval(k, n, confidence)
    ratio_lo, ratio_hi = min_ratio_interval(k, n, confidence)
    return {**head, "n": N, "count": K, "overall": points.overall[j],
            "max_gap": points.gap[j], "max_gap_ci_low": gap_lo, "max_gap_ci_high": gap_hi,
            "min_ratio": points.ratio[j], "min_ratio_ci_low": ratio_lo, "min_ratio_ci_high": ratio_hi,
            "p_chi2": chi2_homogeneity_p(k, n), "n_groups": sum(1 for x in n if x > 0)}


# ---------------------------------------------------------------------------------------
# retrieval


def _desired_vector(groups: Sequence[str], desired: str | Mapping[str, float], labels: np.ndarray) -> np.ndarray:
    if isinstance(desired, Mapping):
        d = np.array([float(desired.get(g, 0.0)) for g in groups])
    elif desired == "uniform":
        d = np.full(len(groups), 1.0 / len(groups))
    elif desired == "data":
        d = np.array([(labels == g).mean() for g in groups])
    else:
        raise ValueError(f"unknown desired distribution {desired!r}; valid: 'uniform', 'data', or a mapping")
    return d / d.sum()


def skew_at_k(ranked_labels: Sequence[str], k: int, desired: str | Mapping[str, float] = "uniform",
              groups: Sequence[str] | None = None, all_labels: Sequence[str] | None = None) -> dict[str, float]:
    """``Skew@k(a) = ln(p_topk(a) / p_desired(a))`` per group (``-inf`` for a group absent from the top k).

    ``ranked_labels`` is the group of each image in rank order; ``desired`` is ``"uniform"``, ``"data"``
    (group shares in ``all_labels``, default the ranking itself) or a mapping group -> share.
    """
    ranked = np.asarray(ranked_labels).astype(str)
    base = ranked if all_labels is None else np.asarray(all_labels).astype(str)
    groups = sorted(set(base.tolist())) if groups is None else list(groups)
    d = _desired_vector(groups, desired, base)
    k = min(int(k), len(ranked))
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    top = ranked[:k]
    out = {}
    with np.errstate(divide="ignore"):
        for g, dg in zip(groups, d):
            out[g] = float(np.log((top == g).mean() / dg))
    return out


def max_skew_at_k(ranked_labels: Sequence[str], k: int, desired: str | Mapping[str, float] = "uniform",
                  groups: Sequence[str] | None = None, all_labels: Sequence[str] | None = None) -> float:
    """MaxSkew@k: the largest Skew@k over groups (0 means the top k matches the desired distribution)."""
    return max(skew_at_k(ranked_labels, k, desired, groups, all_labels).values())


def ndkl(ranked_labels: Sequence[str], desired: str | Mapping[str, float] = "uniform", k: int | None = None,
         groups: Sequence[str] | None = None, all_labels: Sequence[str] | None = None) -> float:
    """Normalized discounted KL divergence of the top-``i`` group distributions (``i = 1..k``) from ``desired``."""
    ranked = np.asarray(ranked_labels).astype(str)
    base = ranked if all_labels is None else np.asarray(all_labels).astype(str)
    groups = sorted(set(base.tolist())) if groups is None else list(groups)
    d = _desired_vector(groups, desired, base)
    k = len(ranked) if k is None else min(int(k), len(ranked))
    onehot = (ranked[:k, None] == np.asarray(groups)[None, :]).astype(float)
    return float(_ndkl_from_onehot(onehot, d))


def _ndkl_from_onehot(onehot: np.ndarray, d: np.ndarray) -> np.ndarray:
    """NDKL for one ``(k, G)`` or many ``(R, k, G)`` rankings given as one-hot group rows."""
    k = onehot.shape[-2]
    props = np.cumsum(onehot, axis=-2) / np.arange(1, k + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(props > 0, props * np.log(props / d), 0.0)
    kl = terms.sum(-1)
    w = 1.0 / np.log2(np.arange(2, k + 2))
    return (kl * w).sum(-1) / w.sum()


def retrieval_metrics(similarity: np.ndarray, labels: np.ndarray, queries: Sequence[str], ks: Sequence[int], *,
                      grouping: str, desired: str = "uniform", n_random: int = 200, seed: int = 0) -> pd.DataFrame:
    """MaxSkew@k and NDKL@k per query and k, with the same figures for random rankings as a baseline.

    ``similarity`` is ``(n_queries, n_images)``. Ties are broken by image order (stable sort).
    ``p_random`` is the share of ``n_random`` random rankings (seeded) whose MaxSkew@k is at least the
    observed one (with the usual +1 correction): a permutation test of "the ranking ignores groups".
    """
    labels = np.asarray(labels).astype(str)
    groups = sorted(set(labels.tolist()))
    d = _desired_vector(groups, desired, labels)
    garr = np.asarray(groups)
    rng = np.random.default_rng([int(seed), zlib.crc32(grouping.encode())])
    perms = np.stack([rng.permutation(len(labels)) for _ in range(n_random)]) if n_random else None
    rows = []
    for qi, q in enumerate(queries):
        order = np.argsort(-similarity[qi], kind="stable")
        ranked = labels[order]
        for k in ks:
            kk = min(int(k), len(labels))
            skews = skew_at_k(ranked, kk, d_map := dict(zip(groups, d)), groups)
            ms = max(skews.values())
            nd = ndkl(ranked, d_map, kk, groups)
            row = {"query": q, "grouping": grouping, "k": kk, "desired": desired, "max_skew": ms,
                   "most_over": max(skews, key=skews.get), "most_under": min(skews, key=skews.get),
                   "ndkl": nd}
            if perms is not None:
                oh = (labels[perms[:, :kk]][..., None] == garr).astype(float)      # (R, k, G)
                shares = oh.mean(1)
                with np.errstate(divide="ignore"):
                    rms = np.log(shares / d).max(1)
                rnd = _ndkl_from_onehot(oh, d)
                row.update({"max_skew_random": float(rms.mean()), "ndkl_random": float(rnd.mean()),
                            "p_random": float((1 + (rms >= ms - 1e-12).sum()) / (n_random + 1))})
            for g in groups:
                row[f"share[{g}]"] = float((ranked[:kk] == g).mean())
            rows.append(row)
    return pd.DataFrame(rows)
