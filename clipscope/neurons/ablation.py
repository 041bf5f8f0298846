"""Effect of ablating units on zero-shot classification."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..hooks import Unit


@dataclass
class AblationEffect:
    """Zero-shot predictions over a labelled data set with and without an ablation."""

    classes: list[str]
    labels: list[str]
    before: list[str]
    after: list[str]
    n_units: int
    templates: tuple[str, ...]

    @property
    def accuracy_before(self) -> float:
        return float(np.mean(np.array(self.before) == np.array(self.labels)))

    @property
    def accuracy_after(self) -> float:
        return float(np.mean(np.array(self.after) == np.array(self.labels)))

    @property
    def accuracy_change(self) -> float:
        """Accuracy after minus before (negative: the ablation hurts)."""
        return self.accuracy_after - self.accuracy_before

    @property
    def fraction_changed(self) -> float:
        """Fraction of images whose top-1 prediction changed."""
        return float(np.mean(np.array(self.before) != np.array(self.after)))

    @property
    def per_class(self) -> dict[str, dict[str, float]]:
        """Per true class: ``n``, ``before``, ``after`` accuracy and ``change``."""
        y, b, a = np.array(self.labels), np.array(self.before), np.array(self.after)
        out = {}
        for c in self.classes:
            m = y == c
            if m.any():
                acc_b, acc_a = float((b[m] == c).mean()), float((a[m] == c).mean())
                out[c] = {"n": int(m.sum()), "before": acc_b, "after": acc_a, "change": acc_a - acc_b}
        return out

    def to_frame(self):
        """DataFrame, one row per class present in ``labels`` plus an ``(all)`` row."""
        import pandas as pd
        frame = pd.DataFrame.from_dict(self.per_class, orient="index")
        frame.loc["(all)"] = {"n": len(self.labels), "before": self.accuracy_before,
                              "after": self.accuracy_after, "change": self.accuracy_change}
        frame.index.name = "class"
        frame["n"] = frame["n"].astype(int)
        return frame

    def plot(self, ax=None):
        """Grouped bars of per-class accuracy before and after; returns the figure."""
        import matplotlib.pyplot as plt
        frame = self.to_frame()
        if ax is None:
            fig, ax = plt.subplots(figsize=(0.5 * len(frame) + 2, 3))
        else:
            fig = ax.figure
        x = np.arange(len(frame))
        ax.bar(x - 0.2, frame["before"], 0.4, label="before")
        ax.bar(x + 0.2, frame["after"], 0.4, label="after")
        ax.set_xticks(x, frame.index, rotation=60, ha="right")
        ax.set_ylabel("accuracy")
        ax.legend()
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        return (f"<p>Ablating {self.n_units} unit(s): accuracy {self.accuracy_before:.3f} -> "
                f"{self.accuracy_after:.3f} ({self.accuracy_change:+.3f}); "
                f"{self.fraction_changed:.1%} of predictions changed</p>"
                + self.to_frame().to_html(float_format=lambda v: f"{v:.3f}"))


def ablation_effect(model, units: Unit | Sequence[Unit], images, labels: Sequence[str], classes: Sequence[str],
                    templates: str | Sequence[str] | None = None, *, batch_size: int = 64,
                    progress: bool | None = None) -> AblationEffect:
    """Zero-shot classify ``images`` among ``classes`` with and without ``model.ablate(units)``.

    ``labels[i]`` is image ``i``'s true class (one of ``classes``).
    """
    unit_list = [units] if isinstance(units, Unit) else list(units)
    if not unit_list:
        raise ValueError("units must hold at least one Unit")
    classes, labels = list(classes), list(labels)
    unknown = sorted({l for l in labels if l not in classes})
    if unknown:
        raise ValueError(f"labels {unknown[:10]} are not among the classes {classes}")
    images = list(images)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    before = model.zero_shot(images, classes, templates, batch_size=batch_size, progress=progress)
    with model.ablate(unit_list):
        after = model.zero_shot(images, classes, templates, batch_size=batch_size, progress=progress)
    if before.skipped or after.skipped:
        raise ValueError(f"unreadable images: {before.skipped[:5]}")
    return AblationEffect(classes, labels, before.predictions, after.predictions, len(unit_list), before.templates)
