"""Audit reports: one self-contained HTML file (figures embedded as base64 PNG) and a Markdown twin.

Every user-provided string (spec text, class and group names, paths, queries) is escaped, in HTML and
in Markdown. Files are written atomically; the tables also go out as CSV next to the report.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import figure_png, write_text_atomic
from ..pages import esc, page, png_uri

_METHODS = (
    "Rates are the share of audited images in a group whose zero-shot prediction falls in a category "
    "(harm) or is a correct class for the image's label (accuracy). A group's rate has a Wilson score "
    "interval and its difference to the rest a Newcombe score interval (both honest at rates of 0 or 1, where "
    "a bootstrap interval collapses to a point). The largest gap between the groups of a grouping (max_gap, "
    "highest rate minus lowest) has a simultaneous interval: every pair of groups gets a Newcombe score interval "
    "for its difference (Newcombe 1998, method 10) at Bonferroni-adjusted confidence 1 - (1 - confidence) / m for "
    "m pairs, and the gap lies between the largest lower and the largest upper limit. A gap cannot be negative, "
    "so the lower limit is clipped at 0; a lower limit of 0 means the data are consistent with no gap, and the "
    "chi-square p-value beside it tests that directly. The smallest ratio (min_ratio, lowest rate over highest) "
    "likewise comes from Wilson intervals of every group's rate at Bonferroni-adjusted confidence "
    "1 - (1 - confidence) / g for g groups (lowest lower limit over highest upper limit, up to lowest upper "
    "over highest lower, at most 1); an upper limit of 1 means the data are consistent with no disparity. "
    "(Percentile bootstraps of max - min and min / max cannot be used: they never cross 0 and 1, so their "
    "intervals exclude 'no disparity' even when every group has the same rate.) Ratios to the rest and changes "
    "have percentile bootstrap "
    "intervals at the stated confidence, resampling images within each group (group sizes fixed) with seeded "
    "draws; the same resamples are used for every taxonomy, so intervals for changes between taxonomies are "
    "paired. 'diff vs rest' compares a group with all other groups pooled; p-values are two-sided Fisher "
    "exact tests (Holm-adjusted across the groups of a grouping) and two-proportion z-tests; the chi-square "
    "test asks whether all groups of a grouping share one rate. Changes between taxonomies are tested with "
    "an exact McNemar test on the images whose outcome flipped. Retrieval: MaxSkew@k is the largest "
    "log-ratio of a group's share among the k images most similar to the query to its desired share "
    "(0 = as desired); NDKL is the rank-discounted KL divergence of the top-i group distribution from the "
    "desired one over i = 1..k; the random baseline is the mean over random rankings and p_random the share "
    "of random rankings at least as skewed. A zero-shot classifier was forced to pick one class for every "
    "image: rates depend on the class list, which is what the taxonomy comparison shows."
)


def md_esc(value) -> str:
    """Escape a string for Markdown text and table cells: HTML entities, then Markdown punctuation."""
    s = html.escape(str(value), quote=False)
    for ch in "\\`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", " ")


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "–"
        if np.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def md_table(df: pd.DataFrame, max_rows: int = 200) -> str:
    if df is None or df.empty:
        return "_(none)_\n"
    d = df.head(max_rows)
    lines = ["| " + " | ".join(md_esc(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    for _, row in d.iterrows():
        lines.append("| " + " | ".join(md_esc(_fmt(v)) for v in row.values) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_{len(df) - max_rows} more rows in the CSV files._")
    return "\n".join(lines) + "\n"


def html_table(df: pd.DataFrame, max_rows: int = 200) -> str:
    if df is None or df.empty:
        return "<p class='note'>(none)</p>"
    d = df.head(max_rows)
    out = d.to_html(index=False, escape=True, na_rep="–", float_format=lambda v: _fmt(v))
    if len(df) > max_rows:
        out += f"<p class='note'>{len(df) - max_rows} more rows in the CSV files.</p>"
    return out


def _rate_table(groups: pd.DataFrame) -> pd.DataFrame:
    cols = {"group": "group", "n": "n", "count": "count", "rate": "rate", "ci_low": "ci low", "ci_high": "ci high",
            "diff_vs_rest": "diff vs rest", "diff_ci_low": "diff ci low", "diff_ci_high": "diff ci high",
            "ratio_vs_rest": "ratio vs rest", "p_fisher": "p Fisher", "p_fisher_holm": "p Fisher (Holm)"}
    return groups[list(cols)].rename(columns=cols)


def _sections(result):
    """Yield (level, title, kind, payload) report blocks shared by the HTML and Markdown writers."""
    spec = result.spec
    yield 1, f"Audit: {spec.name}", "text", spec.description or ""
    yield 2, "Provenance", "table", _provenance_table(result)
    yield 2, "Skipped items", "table", result.skipped_by_group()
    if not result.label_issues.empty:
        yield 3, "Rows left out of accuracy metrics", "table", result.label_issues
    tax_rows = [(t.name, ", ".join(t.classes), "; ".join(f"{k}: {', '.join(v)}" for k, v in t.harm.items()),
                 "; ".join(f"{k} ({v.column})" for k, v in t.labels.items()),
                 " | ".join(t.templates) if isinstance(t.templates, list) else (t.templates or "model default"))
                for t in spec.taxonomies]
    yield 2, "Taxonomies", "table", pd.DataFrame(tax_rows, columns=["taxonomy", "classes", "harm categories",
                                                                    "label tasks", "templates"])
    yield 2, "Method", "text", _METHODS
    for model in result.models:
        yield from _model_sections(result, model)
    yield 2, "Spec", "code", spec.to_yaml()


def _provenance_table(result) -> pd.DataFrame:
    """Data set, counts, bootstrap settings, run time and every model's cache use, as (item, value) strings."""
    spec, p = result.spec, result.provenance
    conf = spec.bootstrap.confidence
    d = p.get("data", {})
    prov_rows = [("data kind", d.get("kind")), ("data path / source", d.get("path") or d.get("source")),
                 ("split", d.get("split")), ("data card", spec.data.data_card or "–"),
                 ("data fingerprint", d.get("fingerprint")), ("rows listed", d.get("rows_listed")),
                 ("rows skipped before encoding", d.get("rows_skipped_before_encoding")),
                 ("rows audited", p.get("rows_audited")), ("rows skipped in total", p.get("rows_skipped")),
                 ("group columns", ", ".join(spec.data.group_columns)),
                 ("groupings", "; ".join(p.get("groupings", []))),
                 ("bootstrap", f"n={spec.bootstrap.n}, seed={spec.bootstrap.seed}, confidence={conf}"),
                 ("run time (s)", p.get("seconds"))]
    for m in p.get("models", []):
        c = m["cache"]
        detail = (f"id {m['id']}; black box: {m['images_embedded']} scored; {c['rows_sent']} row(s) sent in "
                  f"{c['requests']} request(s) this run, {c['rows_cached']} answered from the cache; "
                  "no retrieval metrics" if "black_box" in m else
                  f"id {m['id']}; {m['images_embedded']} embedded; {c['images_encoded']} encoded this run, "
                  f"{c['chunks_reused']} cached chunk(s) reused")
        prov_rows.append((f"model {m['name']}", detail))
    return pd.DataFrame(prov_rows, columns=["item", "value"]).astype(str)


def _model_sections(result, model: str):
    """Yield one model's report blocks: summary, taxonomy comparison, class shares, per-group rates, retrieval."""
    conf = result.spec.bootstrap.confidence
    yield 2, f"Results: {model}", "text", ""
    s = result.summary[result.summary["model"] == model] if not result.summary.empty else result.summary
    if not s.empty:
        cols = ["taxonomy", "outcome", "grouping", "n", "overall", "max_gap", "max_gap_ci_low",
                "max_gap_ci_high", "min_ratio", "min_ratio_ci_low", "min_ratio_ci_high", "p_chi2"]
        yield 3, "Summary by grouping", "table", s[cols]
    comp = result.compare(model=model)
    if not comp.table.empty:
        for o in dict.fromkeys(comp.table["outcome"]):
            yield 3, f"Taxonomy comparison: {o}", "figure", comp.plot(outcome=o)
            yield 4, f"{o}: side by side (rate [{int(conf * 100)}% CI]) and paired change", "table", \
                comp.side_by_side(outcome=o)
    if not result.class_shares.empty:
        from .plots import plot_class_shares
        sh = result.class_shares[result.class_shares["model"] == model]
        if not sh.empty:
            yield 3, "Predicted class shares per group", "figure", plot_class_shares(sh, result.taxonomies)
    g = result.groups[result.groups["model"] == model] if not result.groups.empty else result.groups
    for tax in result.taxonomies:
        gt = g[g["taxonomy"] == tax] if not g.empty else g
        if gt.empty:
            continue
        yield 3, f"Taxonomy {tax}: per-group rates", "text", ""
        for (o, grouping), sub in gt.groupby(["outcome", "grouping"], sort=False):
            yield 4, f"{tax} · {o} · by {grouping}", "table", _rate_table(sub)
    r = result.retrieval[result.retrieval["model"] == model] if not result.retrieval.empty else result.retrieval
    if not r.empty:
        from .plots import plot_retrieval
        title = f"Retrieval (desired distribution: {result.spec.retrieval.desired})"
        yield 3, title, "figure", plot_retrieval(r)
        yield 4, "MaxSkew@k and NDKL@k", "table", r.drop(columns=["model"])


def render_html(result) -> str:
    parts = []
    for level, title, kind, payload in _sections(result):
        parts.append(f"<h{level}>{esc(title)}</h{level}>")
        if kind == "text" and payload:
            parts.append(f"<p>{esc(payload)}</p>")
        elif kind == "table":
            parts.append(html_table(payload))
        elif kind == "figure":
            parts.append(f"<img alt='{esc(title)}' src='{png_uri(figure_png(payload))}'>")
        elif kind == "code":
            parts.append(f"<pre>{esc(payload)}</pre>")
    return page(f"clipscope audit: {result.spec.name}", "\n".join(parts), heading=False)


def render_markdown(result, figure_files: bool = False) -> str:
    out = []
    for level, title, kind, payload in _sections(result):
        out.append(f"{'#' * level} {md_esc(title)}\n")
        if kind == "text" and payload:
            out.append(md_esc(payload) + "\n")
        elif kind == "table":
            out.append(md_table(payload))
        elif kind == "figure":
            import matplotlib.pyplot as plt
            plt.close(payload)
            out.append("_(figure in report.html)_\n")
        elif kind == "code":
            # an HTML <pre> block with entities rather than a code fence, so no raw user text reaches the file
            out.append("<pre>\n" + html.escape(str(payload), quote=False) + "</pre>\n")
    return "\n".join(out)


def write_report(result, out=None) -> Path:
    """Write ``report.html``, ``report.md``, the CSV tables, ``provenance.json`` and ``spec.yaml``; returns the folder.

    The folder is created if missing; every file is written atomically through :mod:`clipscope.io`, so a
    folder that cannot be written raises :class:`~clipscope.io.OutputError` naming the file and the cause.
    """
    from .spec import expand_path
    folder = Path(expand_path(str(out))) if out is not None else (result.output_dir or Path(result.spec.output))
    tables = {"groups.csv": result.groups, "summary.csv": result.summary, "changes.csv": result.changes,
              "class_shares.csv": result.class_shares, "retrieval.csv": result.retrieval,
              "skipped.csv": result.skipped, "label_issues.csv": result.label_issues,
              "predictions.csv": result.predictions}
    for name, df in tables.items():
        write_text_atomic(folder / name, df.to_csv(index=False))
    write_text_atomic(folder / "spec.yaml", result.spec.to_yaml())
    write_text_atomic(folder / "provenance.json", json.dumps(result.provenance, indent=1, default=str))
    write_text_atomic(folder / "report.md", render_markdown(result))
    write_text_atomic(folder / "report.html", render_html(result))
    result.output_dir = folder
    return folder
