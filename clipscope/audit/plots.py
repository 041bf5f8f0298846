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
    drawn = {}  # taxonomy -> one of its bar containers, so the legend lists every taxonomy of every panel
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
            drawn.setdefault(tax, a.bar(x, rate, width, yerr=err, capsize=3, label=_t(tax),
                                        color=colours[i % len(colours)]))
        a.set_xticks(np.arange(len(groups)), [_t(g) for g in groups], rotation=30 if len(groups) > 4 else 0,
                     ha="right" if len(groups) > 4 else "center", fontsize=8)
        a.set_title(_t(o), fontsize=9)
        a.set_xlabel(_t(grouping))
        a.set_ylabel("rate")
        a.set_ylim(0, min(1.0, max(0.05, float(np.nanmax(sub["ci_high"].to_numpy(float), initial=0)) * 1.15)))
    if title:
        fig.suptitle(_t(title), fontsize=10)
    fig.tight_layout()
    if axes and drawn:  # outside the panels (after the layout, so it widens the saved figure): never over a bar
        axes[-1].legend(handles=list(drawn.values()), fontsize=8, title="taxonomy", title_fontsize=8,
                        loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


def class_colours(classes: Sequence[str]) -> dict[str, tuple]:
    """One RGBA colour per class name, distinct for every class (tab10, tab20, then an even spread of turbo)."""
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(classes))
    if len(names) <= 20:
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        return {c: cmap(j) for j, c in enumerate(names)}
    cmap = plt.get_cmap("turbo")
    return {c: cmap(j / (len(names) - 1)) for j, c in enumerate(names)}


def plot_class_shares(shares: pd.DataFrame, taxonomies: Sequence[str], grouping: str | None = None):
    """Stacked bars: the share of each predicted class per group, one panel per taxonomy.

    A class has the same colour in every panel; a panel stacks only its own taxonomy's classes (a
    class a taxonomy lacks gets no band there) and one legend lists every class shown. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    grouping = _pick_grouping(shares, grouping)
    t = shares[(shares["grouping"] == grouping) & shares["taxonomy"].isin(list(taxonomies))]
    colours = class_colours(t["class"])
    groups = sorted(t["group"].unique())
    fig, axes = plt.subplots(1, len(taxonomies), figsize=(3.6 * len(taxonomies), 3.2), squeeze=False, sharey=True)
    for a, tax in zip(axes[0], taxonomies):
        sub = t[t["taxonomy"] == tax]
        bottom = np.zeros(len(groups))
        for c in dict.fromkeys(sub["class"]):
            share = sub[sub["class"] == c].set_index("group")["share"].reindex(groups).fillna(0).to_numpy(float)
            a.bar(range(len(groups)), share, bottom=bottom, color=colours[c])
            bottom += share
        a.set_xticks(range(len(groups)), [_t(g) for g in groups], fontsize=8)
        a.set_title(_t(tax), fontsize=9)
        a.set_xlabel(_t(grouping))
    axes[0][0].set_ylabel("share of predictions")
    fig.tight_layout()
    handles = [Patch(facecolor=colour, label=_t(c)) for c, colour in colours.items()]
    fig.legend(handles=handles, title="predicted class", fontsize=7, title_fontsize=7, loc="upper left",
               bbox_to_anchor=(1.0, 0.95))  # after the layout, outside the panels: widens the saved figure
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
