"""Taxonomy comparison: how each group's outcomes move when the class list changes.

Both taxonomies classify the *same* images, so the change in a group's rate is estimated from paired
data: its interval comes from the same bootstrap resamples (see :mod:`clipscope.audit.metrics`) and
its test is an exact McNemar test on the images whose outcome flipped.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .frames import Disaggregation, Outcomes
from .metrics import mcnemar_p, percentile_interval

#: Columns of the rows :func:`paired_changes` returns (``AuditResult.changes``).
CHANGE_COLUMNS = ["model", "outcome", "grouping", "group", "taxonomy_a", "taxonomy_b", "n", "rate_a", "rate_b",
                  "change", "change_ci_low", "change_ci_high", "flipped_to_no", "flipped_to_yes", "p_mcnemar"]


def paired_changes(model: str, outcomes: Outcomes, result: Disaggregation, labels: np.ndarray,
                   taxonomies: list[str]) -> list[dict]:
    """Rows of changes between every ordered pair of taxonomies, for every shared outcome and group.

    ``outcomes`` is keyed by ``(taxonomy, outcome)``; ``result`` is their disaggregation by ``labels``
    (one grouping), whose bootstrap rates pair the change intervals. One row per (taxonomy pair,
    outcome, group): both rates on the rows valid under both, the change with its interval, the flips
    each way and the exact McNemar p-value.
    """
    rows = []
    groups = sorted(set(labels.tolist()))
    keys = set(outcomes.keys)
    for base, other in [(a, b) for a in taxonomies for b in taxonomies if a != b]:
        for o in sorted({o for (t, o) in keys if t == base}):
            if (other, o) not in keys:
                continue
            head = {"model": model, "outcome": o, "grouping": result.grouping}
            pair = (base, other, outcomes.get((base, o)), outcomes.get((other, o)))
            rows += [_change_row(head, pair, labels == g, g, result) for g in groups]
    return rows


def _change_row(head: dict, pair: tuple, in_group: np.ndarray, group: str, result: Disaggregation) -> dict:
    """The change of one outcome in one group from taxonomy ``pair[0]`` to ``pair[1]``."""
    base, other, (ya, va), (yb, vb) = pair
    m = in_group & va & vb
    n = int(m.sum())
    ra = float(ya[m].mean()) if n else float("nan")
    rb = float(yb[m].mean()) if n else float("nan")
    b = int((ya & ~yb & m).sum())
    c = int((~ya & yb & m).sum())
    o = head["outcome"]
    sa, sb = result.samples.get(((base, o), group)), result.samples.get(((other, o), group))
    paired = sa is not None and sb is not None and len(sa)
    lo, hi = percentile_interval(sb - sa, result.confidence) if paired else (np.nan, np.nan)
    return {**head, "group": group, "taxonomy_a": base, "taxonomy_b": other, "n": n, "rate_a": ra, "rate_b": rb,
            "change": rb - ra, "change_ci_low": lo, "change_ci_high": hi,
            "flipped_to_no": b, "flipped_to_yes": c, "p_mcnemar": mcnemar_p(b, c)}


@dataclass
class TaxonomyComparison:
    """Side-by-side per-group outcomes under two or more taxonomies (one model).

    ``table`` has one row per (outcome, grouping, group) with the rate and interval under each
    taxonomy; ``changes`` the paired change from the first taxonomy to each other one.
    """

    table: pd.DataFrame
    changes: pd.DataFrame
    taxonomies: list[str]
    model: str

    def to_frame(self) -> pd.DataFrame:
        return self.changes.copy()

    def side_by_side(self, outcome: str | None = None, grouping: str | None = None) -> pd.DataFrame:
        """Wide table: one row per group, ``rate [ci]`` under each taxonomy, then the change."""
        t = self.table
        if outcome is not None:
            t = t[t["outcome"] == outcome]
        if grouping is not None:
            t = t[t["grouping"] == grouping]
        if t.empty:
            return pd.DataFrame()
        t = t.assign(cell=[_fmt_rate(r, lo, hi) for r, lo, hi in zip(t["rate"], t["ci_low"], t["ci_high"])])
        wide = t.pivot_table(index=["outcome", "grouping", "group"], columns="taxonomy", values="cell",
                             aggfunc="first")[[x for x in self.taxonomies if x in set(t["taxonomy"])]]
        ch = self.changes
        if not ch.empty:
            ch = ch.assign(cell=[f"{c:+.3f} [{lo:+.3f}, {hi:+.3f}] (p={p:.2g})" for c, lo, hi, p in
                                 zip(ch["change"], ch["change_ci_low"], ch["change_ci_high"], ch["p_mcnemar"])])
            for other in self.taxonomies[1:]:
                sub = ch[ch["taxonomy_b"] == other].set_index(["outcome", "grouping", "group"])["cell"]
                wide[f"change {self.taxonomies[0]} → {other}"] = sub.reindex(wide.index).values
        wide.columns.name = None
        return wide.reset_index()

    def plot(self, outcome: str | None = None, grouping: str | None = None, ax=None):
        from .plots import plot_comparison
        return plot_comparison(self.table, self.taxonomies, outcome=outcome, grouping=grouping, ax=ax,
                               title=f"{self.model}: taxonomy comparison")

    def _repr_html_(self) -> str:
        head = f"<p>Taxonomy comparison for model {html.escape(self.model)}: " + \
               " vs ".join(html.escape(t) for t in self.taxonomies) + "</p>"
        return head + self.side_by_side().to_html(index=False, escape=True)


def _fmt_rate(rate: float, lo: float, hi: float) -> str:
    if np.isnan(rate):
        return "–"
    if np.isnan(lo):
        return f"{rate:.3f}"
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}]"
