"""Audit outcomes and their disaggregation as frames, shaped like fairlearn's ``MetricFrame``.

:class:`Outcomes` holds binary per-image outcomes: one row per outcome, indexed by its key (in an audit a
``(taxonomy, outcome)`` MultiIndex, so no key is ever packed into a string), one column per image row.
:func:`~clipscope.audit.metrics.disaggregate` turns outcomes and one grouping into one
:class:`Disaggregation`: ``overall``, ``by_group``, ``difference()`` and ``ratio()`` as in MetricFrame (one
entry or column per outcome), :meth:`Disaggregation.intervals` for every interval beside them, and the
tidy ``groups`` / ``summary`` tables an audit report is built from.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..validate import InvalidArgumentError, check_choice, check_same_length

#: Columns of :attr:`Disaggregation.groups` after the outcome key's levels.
GROUP_COLUMNS = ("grouping", "group", "n", "count", "rate", "ci_low", "ci_high", "rest_rate", "diff_vs_rest",
                 "diff_ci_low", "diff_ci_high", "ratio_vs_rest", "ratio_ci_low", "ratio_ci_high", "z", "p_z",
                 "p_fisher", "p_fisher_holm")
#: Columns of :attr:`Disaggregation.summary` after the outcome key's levels.
SUMMARY_COLUMNS = ("grouping", "n", "count", "overall", "max_gap", "max_gap_ci_low", "max_gap_ci_high",
                   "min_ratio", "min_ratio_ci_low", "min_ratio_ci_high", "p_chi2", "n_groups")

# statistic -> (table, estimate column, interval columns) for Disaggregation.intervals
_INTERVALS = {
    "rate": ("groups", "rate", ("ci_low", "ci_high")),
    "diff_vs_rest": ("groups", "diff_vs_rest", ("diff_ci_low", "diff_ci_high")),
    "ratio_vs_rest": ("groups", "ratio_vs_rest", ("ratio_ci_low", "ratio_ci_high")),
    "difference": ("summary", "max_gap", ("max_gap_ci_low", "max_gap_ci_high")),
    "ratio": ("summary", "min_ratio", ("min_ratio_ci_low", "min_ratio_ci_high")),
}


@dataclass(frozen=True)
class Outcomes:
    """Binary outcomes of the same image rows, one frame row per outcome.

    ``y`` and ``valid`` are boolean DataFrames with the same index (the outcome keys: one ``outcome``
    level, or ``(taxonomy, outcome)`` in an audit) and one column per image row; ``valid`` False removes
    a row from that outcome (a missing label). ``metric`` names each outcome's metric family (same index;
    None where not given).
    """

    y: pd.DataFrame
    valid: pd.DataFrame
    metric: pd.Series

    @classmethod
    def from_arrays(cls, outcomes: Mapping[Hashable, tuple[np.ndarray, np.ndarray]], *,
                    names: Sequence[str] = ("outcome",), metric: Mapping[Hashable, str] | None = None,
                    n_rows: int | None = None) -> Outcomes:
        """Outcomes from ``{key: (y, valid)}`` boolean arrays of equal length.

        ``names`` names the key's levels: a key is a string for one level, a tuple as long as ``names``
        otherwise. ``n_rows`` gives the row count when ``outcomes`` is empty. Raises
        :class:`~clipscope.validate.InvalidArgumentError` for keys that do not match ``names`` or arrays
        of different lengths.
        """
        names = tuple(names)
        keys = list(outcomes)
        for key in keys:
            if (len(key) if isinstance(key, tuple) else 1) != len(names):
                raise InvalidArgumentError("outcomes", key, f"keys with one value per level of {list(names)}")
        arrays = {f"y[{k!r}]": v[0] for k, v in outcomes.items()} | {f"valid[{k!r}]": v[1] for k, v in outcomes.items()}
        n = check_same_length(**arrays) if arrays else int(n_rows or 0)
        index = (pd.MultiIndex.from_tuples(keys, names=names) if len(names) > 1 and keys else
                 pd.MultiIndex.from_arrays([[]] * len(names), names=names) if len(names) > 1 else
                 pd.Index(keys, name=names[0], dtype=object))
        y = np.stack([np.asarray(v[0], bool) for v in outcomes.values()]) if keys else np.zeros((0, n), bool)
        valid = np.stack([np.asarray(v[1], bool) for v in outcomes.values()]) if keys else np.zeros((0, n), bool)
        metric = metric or {}
        return cls(pd.DataFrame(y, index=index), pd.DataFrame(valid, index=index),
                   pd.Series([metric.get(k) for k in keys], index=index, dtype=object, name="metric"))

    @classmethod
    def concat(cls, parts: Sequence[Outcomes], n_rows: int) -> Outcomes:
        """The outcomes of every part, in order (``n_rows`` gives the row count when ``parts`` is empty)."""
        if not parts:
            return cls.from_arrays({}, n_rows=n_rows)
        return cls(pd.concat([p.y for p in parts]), pd.concat([p.valid for p in parts]),
                   pd.concat([p.metric for p in parts]))

    @property
    def keys(self) -> pd.Index:
        """The outcome keys (the frames' index)."""
        return self.y.index

    @property
    def key_names(self) -> tuple[str, ...]:
        """Names of the key's levels, e.g. ``("taxonomy", "outcome")``."""
        return tuple(self.y.index.names)

    @property
    def n_rows(self) -> int:
        """Number of image rows."""
        return self.y.shape[1]

    def __len__(self) -> int:
        return len(self.y)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(y, valid)`` as boolean arrays of shape ``(n_outcomes, n_rows)``."""
        return self.y.to_numpy(bool), self.valid.to_numpy(bool)

    def get(self, key: Hashable) -> tuple[np.ndarray, np.ndarray]:
        """``(y, valid)`` of one outcome as boolean arrays over the rows."""
        if key not in self.keys:
            raise InvalidArgumentError("key", key, f"one of {list(self.keys)}")
        return self.y.loc[key].to_numpy(bool), self.valid.loc[key].to_numpy(bool)

    def key_columns(self, key: Hashable) -> dict[str, Hashable]:
        """``{level name: value}`` of one key, the leading columns of a tidy row."""
        return dict(zip(self.key_names, key if isinstance(key, tuple) else (key,)))


@dataclass(frozen=True)
class Disaggregation:
    """Outcomes disaggregated by one grouping, the way fairlearn's ``MetricFrame`` shows a metric.

    ``by_group`` (groups x outcomes), ``overall``, ``difference()`` (largest gap, max - min) and
    ``ratio()`` (smallest ratio, min / max) hold rates, one entry or column per outcome key.
    :meth:`intervals` gives each statistic with its interval. The tidy tables: ``groups`` has one row
    per (outcome, group) with the key's levels, then :data:`GROUP_COLUMNS`; ``summary`` one row per
    outcome, then :data:`SUMMARY_COLUMNS`. ``samples[(key, group)]`` are the group's bootstrap rates
    (the same resamples for every outcome, so changes between outcomes are paired).

    Unpacking (``groups, summary, samples = disaggregate(...)``) yields the three tables.
    """

    grouping: str
    key_names: tuple[str, ...]
    groups: pd.DataFrame
    summary: pd.DataFrame
    samples: dict = field(default_factory=dict)
    confidence: float = 0.95

    def __iter__(self) -> Iterator:
        return iter((self.groups, self.summary, self.samples))

    @property
    def overall(self) -> pd.Series:
        """Rate over every row, per outcome key."""
        return self._per_outcome("overall")

    @property
    def by_group(self) -> pd.DataFrame:
        """Rates: one row per group, one column per outcome key (outcomes in their original order)."""
        keys = self._per_outcome("overall").index
        wide = self.groups.set_index([*self.key_names, "group"])["rate"].unstack(list(self.key_names))
        return wide.reindex(columns=keys).rename_axis(self.grouping)

    def difference(self) -> pd.Series:
        """Largest gap between group rates (max - min), per outcome key; see :meth:`intervals`."""
        return self._per_outcome("max_gap")

    def ratio(self) -> pd.Series:
        """Smallest ratio between group rates (min / max), per outcome key; see :meth:`intervals`."""
        return self._per_outcome("min_ratio")

    def intervals(self, statistic: str = "rate") -> pd.DataFrame:
        """A statistic with its interval at ``confidence``: columns ``estimate, ci_low, ci_high``.

        ``statistic``: ``"rate"``, ``"diff_vs_rest"``, ``"ratio_vs_rest"`` (indexed by outcome key and
        group), ``"difference"`` or ``"ratio"`` (the grouping's largest gap / smallest ratio, indexed
        by outcome key).
        """
        table, estimate, (low, high) = _INTERVALS[check_choice("statistic", statistic, _INTERVALS)]
        frame = getattr(self, table)
        index = [*self.key_names, "group"] if table == "groups" else list(self.key_names)
        out = frame.set_index(index)[[estimate, low, high]]
        return out.set_axis(["estimate", "ci_low", "ci_high"], axis=1)

    def _per_outcome(self, column: str) -> pd.Series:
        return self.summary.set_index(list(self.key_names))[column]
