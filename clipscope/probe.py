"""Linear probes on frozen features, as in the CLIP paper (Radford et al. 2021, appendix A.3).

Logistic regression fitted with L-BFGS; the inverse regularization strength
``C`` is swept on a log grid from 1e-6 to 1e6 on a validation split, refined once
around the best value, and the final probe is refitted on train + validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class LinearProbe:
    """A fitted probe. ``sweep`` is a DataFrame of (C, val_accuracy) for every C tried."""

    classifier: Any
    C: float
    val_accuracy: float
    sweep: Any

    @property
    def classes(self) -> np.ndarray:
        return self.classifier.classes_

    @property
    def weights(self) -> np.ndarray:
        """Weight matrix ``(n_classes or 1, n_features)``: one row for a binary probe."""
        return self.classifier.coef_

    def predict(self, features) -> np.ndarray:
        """Predicted label per row of ``features``."""
        return self.classifier.predict(_numpy(features))

    def predict_proba(self, features) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in the order of :attr:`classes`."""
        return self.classifier.predict_proba(_numpy(features))

    def accuracy(self, features, labels) -> float:
        """Fraction of rows whose prediction equals ``labels`` (in [0, 1])."""
        return float((self.predict(features) == _numpy(labels)).mean())

    def plot(self, ax=None):
        """Validation accuracy against C (log scale); returns the figure."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        s = self.sweep.sort_values("C")
        ax.semilogx(s["C"], s["val_accuracy"], marker="o")
        ax.axvline(self.C, color="tab:red", linestyle="--", label=f"chosen C={self.C:.3g}")
        ax.set_xlabel("C (inverse L2 strength)")
        ax.set_ylabel("validation accuracy")
        ax.legend()
        return ax.figure

    def _repr_html_(self) -> str:
        return (f"<p>LinearProbe: {len(self.classes)} classes, C={self.C:.3g}, "
                f"validation accuracy {self.val_accuracy:.1%}</p>")


def fit_linear_probe(features, labels, val_features=None, val_labels=None, *, val_fraction: float = 0.2,
                     grid: int = 13, max_iter: int = 1000, seed: int = 0) -> LinearProbe:
    """Fit a logistic-regression probe, choosing C on a validation split; returns a :class:`LinearProbe`.

    Without ``val_features``, a stratified ``val_fraction`` of the training rows
    is held out for the sweep. ``grid`` is the number of log-spaced C values in
    [1e-6, 1e6]; one refinement of 8 values between the best C's neighbours follows.
    """
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = _numpy(features), _numpy(labels)
    if len(x) != len(y):
        raise ValueError(f"features has {len(x)} rows but labels has {len(y)}")
    if len(np.unique(y)) < 2:
        raise ValueError("a probe needs at least two classes in labels")
    if val_features is None:
        x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    else:
        x_tr, y_tr, x_val, y_val = x, y, _numpy(val_features), _numpy(val_labels)

    scores: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in scores:
            clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
            scores[c] = float(clf.fit(x_tr, y_tr).score(x_val, y_val))
        return scores[c]

    coarse = np.logspace(-6, 6, grid)
    best = max(coarse, key=lambda c: (score(c), -abs(np.log10(c))))
    i = int(np.argmin(np.abs(coarse - best)))
    fine = np.logspace(np.log10(coarse[max(i - 1, 0)]), np.log10(coarse[min(i + 1, grid - 1)]), 8)
    best = max(list(coarse) + list(fine), key=lambda c: (score(c), -abs(np.log10(c))))
    final = LogisticRegression(C=best, solver="lbfgs", max_iter=max_iter).fit(
        np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val]))
    sweep = pd.DataFrame(sorted(scores.items()), columns=["C", "val_accuracy"])
    return LinearProbe(final, float(best), scores[best], sweep)
