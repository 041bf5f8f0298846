"""Matplotlib figures for audits: per-group rates with intervals under each taxonomy, retrieval skew."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _t(s) -> str:
    """A user string made safe for matplotlib text ('$' would start mathtext)."""
    return str(s).replace("\\", "\\\\").replace("$", r"\$")


def _pick_grouping(table: pd.DataFrame, grouping: str | None) -> str | None:
    if grouping is not None:
        return grouping
    if table.empty:
        return None
    sizes = table.groupby("grouping")["group"].nunique()
    single = [g for g in table["grouping"].drop_duplicates() if " × " not in g and sizes[g] <= 20]
    return single[0] if single else table["grouping"].iloc[0]


def plot_comparison(table: pd.DataFrame, taxonomies: Sequence[str], *, outcome: str | None = None,
                    grouping: str | None = None, ax=None, title: str | None = None):
    """Grouped bars: one cluster per group, one bar per taxonomy, error bars from the rates' Wilson intervals.

    One panel per outcome (or just ``outcome``), for one grouping (default: the first single column).
    Returns the figure.
    """
    import matplotlib.pyplot as plt
    grouping = _pick_grouping(table, grouping)
    t = table[table["grouping"] == grouping] if grouping is not None else table
    outcomes = [outcome] if outcome is not None else list(dict.fromkeys(t["outcome"]))
    n = max(1, len(outcomes))
    if ax is None:
        fig, axes = plt.subplots(1, n, figsize=(max(4.0, 0.9 * t["group"].nunique() * len(taxonomies) / 2 + 2) * min(n, 3) / 1.5, 3.4),
                                 squeeze=False)
        axes = list(axes[0])
    else:
        fig, axes = ax.figure, [ax]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a, o in zip(axes, outcomes):
        sub = t[t["outcome"] == o]
        groups = sorted(sub["group"].unique())
        width = 0.8 / max(1, len(taxonomies))
        for i, tax in enumerate(taxonomies):
            s = sub[sub["taxonomy"] == tax].set_index("group").reindex(groups)
            if s["rate"].isna().all():
                continue
            x = np.arange(len(groups)) + (i - (len(taxonomies) - 1) / 2) * width
            rate = s["rate"].to_numpy(float)
            err = np.vstack([rate - s["ci_low"].to_numpy(float), s["ci_high"].to_numpy(float) - rate])
            err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
            a.bar(x, rate, width, yerr=err, capsize=3, label=_t(tax), color=colours[i % len(colours)])
        a.set_xticks(np.arange(len(groups)), [_t(g) for g in groups], rotation=30 if len(groups) > 4 else 0,
                     ha="right" if len(groups) > 4 else "center", fontsize=8)
        a.set_title(_t(o), fontsize=9)
        a.set_xlabel(_t(grouping))
        a.set_ylabel("rate")
        a.set_ylim(0, min(1.0, max(0.05, float(np.nanmax(sub["ci_high"].to_numpy(float), initial=0)) * 1.15)))
    if axes:
        axes[0].legend(fontsize=8, title="taxonomy", title_fontsize=8)
    if title:
        fig.suptitle(_t(title), fontsize=10)
    fig.tight_layout()
    return fig


def plot_class_shares(shares: pd.DataFrame, taxonomies: Sequence[str], grouping: str | None = None):
    """Stacked bars: the share of each predicted class per group, one panel per taxonomy."""
    import matplotlib.pyplot as plt
    grouping = _pick_grouping(shares, grouping)
    t = shares[shares["grouping"] == grouping]
    fig, axes = plt.subplots(1, len(taxonomies), figsize=(3.6 * len(taxonomies), 3.2), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab20")
    for a, tax in zip(axes[0], taxonomies):
        s = t[t["taxonomy"] == tax].pivot_table(index="group", columns="class", values="share", aggfunc="first").fillna(0)
        bottom = np.zeros(len(s))
        for j, c in enumerate(s.columns):
            a.bar(range(len(s)), s[c].to_numpy(), bottom=bottom, label=_t(c), color=cmap(j % 20))
            bottom += s[c].to_numpy()
        a.set_xticks(range(len(s)), [_t(g) for g in s.index], fontsize=8)
        a.set_title(_t(tax), fontsize=9)
        a.set_xlabel(_t(grouping))
    axes[0][0].set_ylabel("share of predictions")
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_retrieval(frame: pd.DataFrame):
    """MaxSkew@k per query (lines) against the mean of random rankings (dashed)."""
    import matplotlib.pyplot as plt
    groupings = list(dict.fromkeys(frame["grouping"]))
    fig, axes = plt.subplots(1, len(groupings), figsize=(4.2 * len(groupings), 3.2), squeeze=False)
    for a, g in zip(axes[0], groupings):
        sub = frame[frame["grouping"] == g]
        for q, s in sub.groupby("query", sort=False):
            line, = a.plot(s["k"], s["max_skew"], marker="o", label=_t(q))
            if "max_skew_random" in s:
                a.plot(s["k"], s["max_skew_random"], ls="--", color=line.get_color(), alpha=0.6)
        a.set_xscale("log")
        a.set_xlabel("k")
        a.set_ylabel("MaxSkew@k")
        a.set_title(f"by {_t(g)} (dashed: random ranking)", fontsize=9)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig
