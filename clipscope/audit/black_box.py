"""Audit a black-box model (a deployed endpoint, :class:`~clipscope.endpoint.EndpointModel`): zero-shot
predictions per taxonomy straight from the model, without embeddings.

An in-process audit embeds every image once and classifies the embeddings under each taxonomy; a
black-box model gives no embeddings, so each image is sent once per taxonomy with that taxonomy's
classes. The endpoint's own answer cache (per endpoint, image and labels) makes a rerun resume.
Retrieval metrics need image and text embeddings and are not computed for a black-box model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..progress import manual_bar
from .adapters import AuditData
from .spec import AuditSpec


@dataclass
class ScoredRows:
    """Zero-shot predictions of a black-box model for an audit table: row ``rows[i]`` of ``data.frame`` was
    predicted ``predictions[taxonomy][i]`` (class index) under each taxonomy. ``unreadable`` lists ``(row,
    reason)`` for rows that were not scored under every taxonomy; ``stats`` counts rows sent and answered
    from the cache, and the seconds spent."""

    rows: np.ndarray
    predictions: dict[str, np.ndarray]
    unreadable: list[tuple[int, str]]
    stats: dict = field(default_factory=dict)


def score_rows(model, spec: AuditSpec, data: AuditData, *, progress: bool | None = None) -> ScoredRows:
    """Classify every row of ``data`` under every taxonomy of ``spec`` with the black-box ``model``.

    Rows are fetched ``spec.chunk_size`` at a time and sent in requests of ``spec.batch_size`` rows.
    A row the model could not score under some taxonomy is left out of every taxonomy (and listed with
    the first reason), so all taxonomies are compared on the same rows.
    """
    t0 = time.perf_counter()
    before = dict(model.stats)
    source_rows = data.frame["_row"].to_numpy()
    n = len(data)
    preds = {t.name: np.full(n, -1, dtype=np.int64) for t in spec.taxonomies}
    reasons: dict[int, str] = {}
    with manual_bar(progress, n > spec.chunk_size, "audit: endpoint zero-shot", total=n) as bar:
        for start in range(0, n, spec.chunk_size):
            stop = min(n, start + spec.chunk_size)
            items = data.fetch([int(r) for r in source_rows[start:stop]])
            for tax in spec.taxonomies:
                result = model.zero_shot(items, tax.classes, tax.templates, batch_size=spec.batch_size,
                                         progress=False, warn=False)  # skipped rows are reported by the audit
                top1 = result.top1.numpy()
                for position, k in zip(result.positions, top1):
                    preds[tax.name][start + position] = k
                missing = sorted(set(range(len(items))) - set(result.positions))  # skipped, in input order
                for position, (_, reason) in zip(missing, result.skipped):
                    reasons.setdefault(start + position, reason)
            bar.update(stop - start)
    ok = np.all(np.stack([p >= 0 for p in preds.values()]), axis=0) if n else np.zeros(0, bool)
    for row in np.flatnonzero(~ok):
        reasons.setdefault(int(row), "not scored under every taxonomy")
    rows = np.flatnonzero(ok)
    stats = {k: model.stats.get(k, 0) - before.get(k, 0) for k in ("requests", "retries", "rows_sent", "rows_cached")}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return ScoredRows(rows, {name: p[rows] for name, p in preds.items()}, sorted(reasons.items()), stats)
