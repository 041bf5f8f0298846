"""Plot helpers shared by the neuron views."""
from __future__ import annotations

from collections.abc import Sequence


def ranked_bars(ranked: Sequence[tuple[str, float]], *, xlabel: str, title: str, color: str, ax=None):
    """Horizontal bars of ``(name, score)`` pairs, best at the top; returns the figure."""
    import matplotlib.pyplot as plt
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 0.25 * len(ranked) + 1))
    else:
        fig = ax.figure
    ax.barh(range(len(ranked)), [s for _, s in ranked], color=color)
    ax.set_yticks(range(len(ranked)), [name for name, _ in ranked])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
