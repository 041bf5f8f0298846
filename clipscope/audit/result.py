"""The result of an audit: tidy tables of every metric, plus comparison, plots and report writing."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .compare import TaxonomyComparison
from .spec import AuditSpec


@dataclass
class AuditResult:
    """Everything an audit measured.

    - ``groups``: one row per (model, taxonomy, metric, outcome, grouping, group) with ``n``,
      ``count``, ``rate`` and its interval, the difference and ratio to the rest of the data with
      intervals, and p-values (Fisher exact, z-test, Holm-adjusted Fisher).
    - ``summary``: one row per (model, taxonomy, metric, outcome, grouping): overall rate, largest gap
      and smallest ratio between groups with intervals, chi-square homogeneity p-value.
    - ``changes``: paired per-group changes between every ordered pair of taxonomies.
    - ``class_shares``: share of each predicted class per group (single group columns).
    - ``retrieval``: MaxSkew@k / NDKL@k per model, query, grouping and k.
    - ``skipped``: every row not audited, with the stage, reason and its group values.
    - ``label_issues``: rows left out of an accuracy metric (missing / unmapped label values).
    - ``predictions``: the audit table with the predicted class per model and taxonomy.
    - ``provenance``: model ids, data set provenance, counts, cache statistics, timings.
    """

    spec: AuditSpec
    groups: pd.DataFrame
    summary: pd.DataFrame
    changes: pd.DataFrame
    class_shares: pd.DataFrame
    retrieval: pd.DataFrame
    skipped: pd.DataFrame
    label_issues: pd.DataFrame
    predictions: pd.DataFrame
    provenance: dict = field(default_factory=dict)
    output_dir: Path | None = None

    # -- access -------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.groups["model"])) if not self.groups.empty else \
            [m["name"] for m in self.provenance.get("models", [])]

    @property
    def taxonomies(self) -> list[str]:
        return [t.name for t in self.spec.taxonomies]

    def to_frame(self) -> pd.DataFrame:
        """The per-group table (see the class docstring)."""
        return self.groups.copy()

    def rates(self, outcome: str | None = None, grouping: str | None = None, *, taxonomy: str | None = None,
              model: str | None = None) -> pd.DataFrame:
        """Per-group rows filtered by outcome (e.g. ``"harm:crime"``), grouping, taxonomy and model."""
        t = self.groups
        for col, val in (("outcome", outcome), ("grouping", grouping), ("taxonomy", taxonomy), ("model", model)):
            if val is not None:
                if val not in set(t[col]):
                    raise ValueError(f"no {col} {val!r} in this audit; valid: {sorted(set(self.groups[col]))}")
                t = t[t[col] == val]
        return t.reset_index(drop=True)

    def rate(self, outcome: str, grouping: str, group: str, taxonomy: str, model: str | None = None) -> pd.Series:
        """The one row for a group (rate, ci_low, ci_high, diff_vs_rest, ...)."""
        t = self.rates(outcome, grouping, taxonomy=taxonomy, model=model or self.models[0])
        row = t[t["group"] == group]
        if row.empty:
            raise ValueError(f"no group {group!r} in grouping {grouping!r}; valid: {sorted(t['group'])}")
        return row.iloc[0]

    def compare(self, taxonomy_a: str | None = None, taxonomy_b: str | None = None,
                model: str | None = None) -> TaxonomyComparison:
        """Side-by-side comparison of taxonomies (default: all of them, the first one as baseline)."""
        model = model or self.models[0]
        names = self.taxonomies
        for t in (taxonomy_a, taxonomy_b):
            if t is not None and t not in names:
                raise ValueError(f"unknown taxonomy {t!r}; valid: {names}")
        chosen = names if taxonomy_a is None else [taxonomy_a] + ([taxonomy_b] if taxonomy_b else
                                                                   [n for n in names if n != taxonomy_a])
        table = self.groups[(self.groups["model"] == model) & self.groups["taxonomy"].isin(chosen)]
        ch = self.changes
        if not ch.empty:
            ch = ch[(ch["model"] == model) & (ch["taxonomy_a"] == chosen[0]) & ch["taxonomy_b"].isin(chosen[1:])]
        return TaxonomyComparison(table.reset_index(drop=True), ch.reset_index(drop=True), chosen, model)

    def skipped_by_group(self) -> pd.DataFrame:
        """Counts of skipped rows per group column value and reason."""
        rows = []
        if self.skipped.empty:
            return pd.DataFrame(columns=["column", "group", "stage", "reason", "count"])
        for col in self.spec.data.group_columns:
            if col not in self.skipped.columns:
                continue
            g = self.skipped.assign(group=self.skipped[col].fillna("(missing)").astype(str))
            for (grp, stage, reason), n in g.groupby(["group", "stage", "reason"]).size().items():
                rows.append({"column": col, "group": grp, "stage": stage, "reason": reason, "count": int(n)})
        return pd.DataFrame(rows)

    # -- display ------------------------------------------------------------------------
    def plot(self, outcome: str | None = None, grouping: str | None = None, model: str | None = None):
        """Per-group rates with intervals, one bar per taxonomy (see :func:`plots.plot_comparison`)."""
        return self.compare(model=model).plot(outcome=outcome, grouping=grouping)

    def _repr_html_(self) -> str:
        p = self.provenance
        head = (f"<p><b>Audit {html.escape(self.spec.name)}</b>: {len(self.models)} model(s), "
                f"{len(self.taxonomies)} taxonomies, {p.get('rows_audited', '?')} images audited, "
                f"{len(self.skipped)} skipped.</p>")
        s = self.summary
        cols = ["model", "taxonomy", "outcome", "grouping", "overall", "max_gap", "max_gap_ci_low", "max_gap_ci_high",
                "p_chi2"]
        body = s[[c for c in cols if c in s.columns]].to_html(index=False, escape=True, float_format=lambda v: f"{v:.3g}")
        return head + body

    def write_report(self, out: str | Path | None = None) -> Path:
        """Write report.html, report.md and the CSV tables to ``out`` (default: the spec's output)."""
        from .report import write_report
        return write_report(self, out)
