"""Run an audit: ``run_audit(spec_or_path) -> AuditResult``, and the ``clipscope audit`` command.

Steps: read the spec; read the data set through its adapter; per model, embed every image once
through the on-disk cache; per taxonomy, zero-shot classify the cached embeddings (only the class
prompts are encoded); compute the disaggregated metrics, the paired taxonomy comparison and the
retrieval metrics; write the report. A black-box model (``endpoint:URL``) gives no embeddings: its
images are classified per taxonomy by the model itself (:mod:`clipscope.audit.black_box`) and the
retrieval metrics are left out.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..distributed import Context, context
from ..io import check_writable, ensure_folder
from ..progress import progress_bar
from ..endpoint import PREFIX as ENDPOINT_PREFIX
from ..endpoint import is_black_box, load_endpoint
from .adapters import KEY, ROW, AuditData, load_data
from .black_box import score_rows
from .cache import embed_cached
from .compare import CHANGE_COLUMNS, paired_changes
from .frames import Outcomes
from .metrics import disaggregate, group_labels, retrieval_metrics
from .result import AuditResult
from .spec import AuditSpec, ModelSpec, SpecError, expand_path, load_spec


def _load_model(m: ModelSpec | Any, device: str):
    import clipscope
    if isinstance(m, clipscope.ClipModel):
        return m
    if is_black_box(m):
        return m
    if isinstance(m, str):
        m = ModelSpec(name=m)
    if m.name.startswith(ENDPOINT_PREFIX):
        if m.pretrained is not None:
            raise SpecError("<spec>", [(None, "models", f"model {m.name!r} is an endpoint: it takes no 'pretrained'")])
        return load_endpoint(m.name, **(m.endpoint.model_dump(exclude_none=True) if m.endpoint else {}))
    return clipscope.load(m.name, pretrained=m.pretrained, device=device)


#: Columns of ``AuditResult.label_issues``.
ISSUE_COLUMNS = ["model", "taxonomy", "task", "column", "reason", "value", "count"]
#: Columns of ``AuditResult.class_shares``.
SHARE_COLUMNS = ["model", "taxonomy", "grouping", "group", "class", "count", "share"]


def _outcomes_for(spec: AuditSpec, tax, pred: np.ndarray, frame: pd.DataFrame, metric_set: Sequence[str],
                  issues: list[dict], model_name: str) -> Outcomes:
    """Binary outcomes of one taxonomy, keyed by ``(taxonomy, outcome)``, for the metric families asked for.

    ``pred`` is the index of each row's predicted class. Label values left out of an accuracy outcome
    are appended to ``issues``.
    """
    predicted = np.asarray(tax.classes)[pred]
    arrays, metric = {}, {}
    if "harm_rate" in metric_set:
        for cat, members in tax.harm.items():
            arrays[(tax.name, f"harm:{cat}")] = (np.isin(predicted, members), np.ones(len(pred), bool))
            metric[(tax.name, f"harm:{cat}")] = "harm_rate"
    if "accuracy" in metric_set:
        for task, lab in tax.labels.items():
            head = {"model": model_name, "taxonomy": tax.name, "task": task, "column": lab.column}
            arrays[(tax.name, f"accuracy:{task}")] = _accuracy(predicted, frame[lab.column], lab.correct_classes(),
                                                               head, issues)
            metric[(tax.name, f"accuracy:{task}")] = "accuracy"
    return Outcomes.from_arrays(arrays, names=("taxonomy", "outcome"), metric=metric, n_rows=len(pred))


def _accuracy(predicted: np.ndarray, values: pd.Series, correct: dict[str, list[str]], head: dict,
              issues: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, valid)`` per row: the prediction is a correct class for the row's label value.

    Rows with a missing label value or one without correct classes are not valid; each kind is counted
    into ``issues`` (one row per reason and value, starting with ``head``).
    """
    n = len(predicted)
    y, valid = np.zeros(n, bool), np.zeros(n, bool)
    unmapped: dict[str, int] = {}
    missing = 0
    for i, v in enumerate(values.to_numpy(dtype=object)):
        if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
            missing += 1
            continue
        cls = correct.get(str(v))
        if cls is None:
            unmapped[str(v)] = unmapped.get(str(v), 0) + 1
            continue
        valid[i] = True
        y[i] = predicted[i] in cls
    if missing:
        issues.append({**head, "reason": "missing label value", "value": None, "count": missing})
    for v, c in unmapped.items():
        issues.append({**head, "reason": "label value has no correct class in this taxonomy", "value": v, "count": c})
    return y, valid


def run_audit(spec_or_path: str | os.PathLike | AuditSpec | dict, *, out: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, models: Sequence[Any] | None = None,
              write: bool = True, progress: bool | None = None,
              distributed: bool | None = None) -> AuditResult | None:
    """Run the audit a spec describes and return an :class:`~clipscope.audit.AuditResult`.

    ``spec_or_path``: a YAML path, YAML text, a dict or an :class:`AuditSpec` (see :func:`load_spec`
    for how paths in it resolve). ``out`` overrides the spec's output folder; ``cache_dir`` its
    embedding cache (default: the spec's ``cache_dir``, else ``$CLIPSCOPE_AUDIT_CACHE``, else
    ``OUTPUT/cache``). ``models`` replaces the spec's models (names, :class:`ModelSpec` or loaded
    :class:`~clipscope.ClipModel` objects). ``write=False`` skips writing the report.

    The output folder (when writing) and the cache folder are checked for writing before the data
    are read or any image is encoded: :class:`~clipscope.io.OutputError` names the folder and the cause.
    A taxonomy without ``harm`` or ``labels`` contributes its class shares and predictions only.

    ``distributed`` (default: detect a launcher such as ``torchrun``; see
    :func:`clipscope.distributed.context`): every rank encodes its share of the images into the
    shared cache (:func:`~clipscope.audit.cache.embed_cached`); rank 0 alone classifies, computes the
    metrics (equal to one process's: the merged embeddings are bitwise the same) and writes the
    report, and returns the result. The other ranks return ``None`` once the images are encoded,
    having written nothing but cache chunks. On several nodes ``cache_dir`` may be local to each.
    """
    spec = load_spec(spec_or_path)
    t_start = time.perf_counter()
    ctx = context(distributed)
    out_dir = Path(expand_path(str(out) if out is not None else spec.output))
    cache = _cache_folder(cache_dir, spec, out_dir)
    for folder in ([out_dir] if write and ctx.is_main else []) + [cache]:
        check_writable(ensure_folder(folder))  # an audit creates its folders up front
    data = _load_data(spec)
    _check_label_columns(spec, data)
    model_list = list(models) if models is not None else list(spec.models)
    device = str(ctx.device) if ctx.distributed and spec.device == "auto" else spec.device
    parts = []
    for m in model_list:  # one model in memory at a time
        model = _load_model(m, device)
        if not ctx.is_main:
            _encode_share(model, spec, data, cache, progress, ctx)
            continue
        parts.append(_audit_model(model, spec, data, cache, several=len(model_list) > 1, progress=progress,
                                  distributed=ctx.distributed))
    if not ctx.is_main:
        return None
    result = _assemble(spec, data, parts, cache, out_dir, t_start)
    if write:
        result.write_report(out_dir)
    return result


def _check_label_columns(spec: AuditSpec, data: AuditData) -> None:
    """Every label column an accuracy metric reads must be in the data (checked before any encoding)."""
    if "accuracy" not in spec.metric_set():
        return
    for t in spec.taxonomies:
        for task, lab in t.labels.items():
            if lab.column not in data.columns:
                raise ValueError(f"taxonomy {t.name!r} label task {task!r}: column {lab.column!r} is not in the "
                                 f"data; valid columns: {data.columns}")


@dataclass
class _ModelAudit:
    """What one model's audit produced: ``frame`` (the audited rows), prediction columns, the tables'
    parts, its unreadable rows, label issues and provenance."""
    name: str
    frame: pd.DataFrame
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[pd.DataFrame] = field(default_factory=list)
    summary: list[pd.DataFrame] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)
    shares: list[dict] = field(default_factory=list)
    retrieval: list[pd.DataFrame] = field(default_factory=list)
    issues: list[dict] = field(default_factory=list)
    unreadable: pd.DataFrame | None = None
    provenance: dict = field(default_factory=dict)


def _encode_share(model, spec: AuditSpec, data: AuditData, cache: Path, progress: bool | None,
                  ctx: Context) -> None:
    """A rank other than 0: encode this rank's share of the images into the cache (with rank 0's
    :func:`_audit_model`); a black-box model is left to rank 0."""
    if not is_black_box(model):
        embed_cached(model, data, cache, chunk_size=spec.chunk_size, batch_size=spec.batch_size, progress=progress,
                     distributed=ctx.distributed)


def _audit_model(model, spec: AuditSpec, data: AuditData, cache: Path, *, several: bool,
                 progress: bool | None, distributed: bool = False) -> _ModelAudit:
    """Embed (through the cache), classify under every taxonomy, disaggregate, and measure retrieval.

    ``distributed``: the images are encoded together with the other ranks (this is rank 0).
    A black-box model classifies each taxonomy itself (no embeddings, no retrieval metrics)."""
    t0 = time.perf_counter()
    black_box = is_black_box(model)
    if black_box:
        scored = score_rows(model, spec, data, progress=progress)
        rows, unreadable, stats = scored.rows, scored.unreadable, scored.stats
        predict: Callable = lambda tax: scored.predictions[tax.name]  # noqa: E731
    else:
        cached = embed_cached(model, data, cache, chunk_size=spec.chunk_size, batch_size=spec.batch_size,
                              progress=progress, distributed=distributed)
        rows, unreadable, stats = cached.rows, cached.unreadable, cached.stats
        predict = lambda tax: _top1(model, tax, cached.embeddings)  # noqa: E731
    t_embed = time.perf_counter() - t0
    part = _ModelAudit(model.name, data.frame.iloc[rows].reset_index(drop=True))
    part.unreadable = _unreadable_rows(data, unreadable, model.name)
    outcomes, timings = _classify(predict, spec, part, several=several, progress=progress)
    t2 = time.perf_counter()
    _disaggregate_all(part, outcomes, spec)
    t_metrics = time.perf_counter() - t2
    retrieval = "retrieval" in spec.metric_set() and spec.retrieval is not None and len(rows)
    if retrieval and black_box:
        warnings.warn(f"audit: retrieval metrics need image and text embeddings, which the black-box model "
                      f"{model.name} does not give; they are left out", UserWarning, stacklevel=3)
    elif retrieval:
        part.retrieval = _retrieval(model, spec, cached.embeddings, part.frame, data.group_columns)
    part.provenance = {"name": model.name, "id": model.id, "pretrained": model.pretrained,
                       "images_embedded": len(rows), "unreadable": len(unreadable),
                       "cache": stats, "embed_seconds": round(t_embed, 3),
                       "taxonomy_seconds": {k: round(v, 4) for k, v in timings.items()},
                       "metrics_seconds": round(t_metrics, 3)}
    if black_box:
        part.provenance["black_box"] = "zero-shot answers of the endpoint; retrieval metrics not computed"
    return part


def _top1(model, tax, embeddings: torch.Tensor) -> np.ndarray:
    """Index of each embedding's predicted class under taxonomy ``tax`` (only the class prompts are encoded)."""
    head = model.classifier(tax.classes, tax.templates)
    with torch.no_grad():
        return head.top1(embeddings).cpu().numpy()


def _unreadable_rows(data: AuditData, unreadable: list[tuple[int, str]], model_name: str) -> pd.DataFrame | None:
    """Rows whose image could not be read, with their group values, the reason and stage ``encoding``."""
    if not unreadable:
        return None
    bad = data.frame.iloc[[r for r, _ in unreadable]][[KEY, ROW, *data.group_columns]].copy()
    bad["reason"] = [r for _, r in unreadable]
    bad["stage"] = "encoding"
    bad["model"] = model_name
    return bad


def _classify(predict: Callable, spec: AuditSpec, part: _ModelAudit, *, several: bool,
              progress: bool | None) -> tuple[Outcomes, dict[str, float]]:
    """Zero-shot classify the audited rows under every taxonomy: ``predict(taxonomy)`` gives each row's class index.

    Fills ``part``'s prediction columns, class shares and label issues; returns every taxonomy's
    outcomes in one frame and the seconds spent per taxonomy.
    """
    parts, timings = [], {}
    for tax in progress_bar(spec.taxonomies, progress, len(spec.taxonomies) > 2, "audit: taxonomies",
                            total=len(spec.taxonomies)):
        t1 = time.perf_counter()
        pred = predict(tax)
        col = f"{part.name} / {tax.name}" if several else tax.name
        part.predictions[f"prediction: {col}"] = np.asarray(tax.classes)[pred]
        part.shares += _class_shares(part.name, tax, pred, part.frame, spec.groupings())
        parts.append(_outcomes_for(spec, tax, pred, part.frame, spec.metric_set(), part.issues, part.name))
        timings[tax.name] = time.perf_counter() - t1
    return Outcomes.concat(parts, n_rows=len(part.frame)), timings


def _class_shares(model_name: str, tax, pred: np.ndarray, frame: pd.DataFrame,
                  groupings: list[tuple[str, ...]]) -> list[dict]:
    """Share of each predicted class in each group of every single-column grouping."""
    rows = []
    for grouping in [g for g in groupings if len(g) == 1]:
        labels = group_labels(frame, grouping)
        for g in sorted(set(labels.tolist())):
            sel = pred[labels == g]
            counts = np.bincount(sel, minlength=len(tax.classes))
            rows += [{"model": model_name, "taxonomy": tax.name, "grouping": grouping[0], "group": g, "class": c,
                      "count": int(counts[ci]), "share": float(counts[ci] / max(1, len(sel)))}
                     for ci, c in enumerate(tax.classes)]
    return rows


def _disaggregate_all(part: _ModelAudit, outcomes: Outcomes, spec: AuditSpec) -> None:
    """Disaggregate every outcome by every grouping (one bootstrap per grouping covers every taxonomy and
    outcome, so taxonomy changes are paired) into ``part``'s groups, summary and changes."""
    boot = spec.bootstrap
    for grouping in spec.groupings():
        labels = group_labels(part.frame, grouping)
        result = disaggregate(outcomes, labels, grouping=" × ".join(grouping), n_boot=boot.n, seed=boot.seed,
                              confidence=boot.confidence)
        part.groups.append(_with_model_and_metric(result.groups, part.name, outcomes.metric))
        part.summary.append(_with_model_and_metric(result.summary, part.name, outcomes.metric))
        part.changes += paired_changes(part.name, outcomes, result, labels, [t.name for t in spec.taxonomies])


def _with_model_and_metric(table: pd.DataFrame, model_name: str, metric: pd.Series) -> pd.DataFrame:
    """``table`` (keyed by taxonomy and outcome) with the model first and each outcome's metric family third."""
    table = table.copy()
    table.insert(0, "model", model_name)
    table.insert(2, "metric", [metric[key] for key in zip(table["taxonomy"], table["outcome"])])
    return table


def _retrieval(model, spec: AuditSpec, embeddings: torch.Tensor, frame: pd.DataFrame,
               group_columns: list[str]) -> list[pd.DataFrame]:
    """MaxSkew@k / NDKL@k of the spec's text queries against the image embeddings, per group column."""
    r, boot = spec.retrieval, spec.bootstrap
    with torch.no_grad():
        q = model.encode_text(list(r.queries)).float().cpu()
    sim = (q @ embeddings.T).numpy()
    tables = []
    for col in (r.group_columns or group_columns):
        df = retrieval_metrics(sim, group_labels(frame, [col]), r.queries, r.k, grouping=col,
                               desired=r.desired, n_random=r.n_random, seed=boot.seed)
        df.insert(0, "model", model.name)
        tables.append(df)
    return tables


def _concat(parts: Sequence[pd.DataFrame | None], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The non-empty parts stacked; with none, an empty frame with the first part's (or the given) columns."""
    full = [p for p in parts if p is not None and len(p)]
    if full:
        return pd.concat(full, ignore_index=True)
    if columns is None:
        columns = next((list(p.columns) for p in parts if p is not None and len(p.columns)), None)
    return pd.DataFrame(columns=columns)


def _assemble(spec: AuditSpec, data: AuditData, parts: list[_ModelAudit], cache: Path, out_dir: Path,
              t_start: float) -> AuditResult:
    """One :class:`AuditResult` from every model's part, with the run's provenance."""
    skipped = _concat([data.skipped.assign(stage="before encoding", model=None)] + [p.unreadable for p in parts],
                      [KEY, ROW, "reason", "stage", "model", *data.group_columns])
    skipped = skipped.rename(columns={KEY: "key", ROW: "row"})
    prov = [p.provenance for p in parts]
    provenance = {"spec_name": spec.name, "data": data.provenance, "models": prov,
                  "rows_audited": int(prov[0]["images_embedded"]) if prov else 0,
                  "rows_skipped": len(skipped), "groupings": [" × ".join(g) for g in spec.groupings()],
                  "metrics": list(spec.metric_set()), "bootstrap": spec.bootstrap.model_dump(),
                  "seconds": round(time.perf_counter() - t_start, 3), "cache_dir": str(cache)}
    return AuditResult(
        spec=spec, groups=_concat([g for p in parts for g in p.groups]),
        summary=_concat([s for p in parts for s in p.summary]),
        changes=pd.DataFrame([c for p in parts for c in p.changes], columns=CHANGE_COLUMNS),
        class_shares=pd.DataFrame([s for p in parts for s in p.shares], columns=SHARE_COLUMNS),
        retrieval=_concat([r for p in parts for r in p.retrieval]), skipped=skipped,
        label_issues=pd.DataFrame([i for p in parts for i in p.issues], columns=ISSUE_COLUMNS),
        predictions=_predictions(data, parts).rename(columns={KEY: "key", ROW: "row"}),
        provenance=provenance, output_dir=out_dir)


def _predictions(data: AuditData, parts: list[_ModelAudit]) -> pd.DataFrame:
    """The first model's audited rows with every model's prediction columns (those of a model that audited
    a different number of rows are left out)."""
    if not parts:
        return data.frame.iloc[:0]
    predictions = parts[0].frame.copy()
    for p in parts:
        if len(p.frame) == len(predictions):
            for col, values in p.predictions.items():
                predictions[col] = values
    return predictions


def _cache_folder(cache_dir: str | os.PathLike | None, spec: AuditSpec, out_dir: Path) -> Path:
    """The embedding cache folder: the argument, else the spec's ``cache_dir``, else ``$CLIPSCOPE_AUDIT_CACHE``,
    else ``OUTPUT/cache``."""
    for choice in (cache_dir, spec.cache_dir, os.environ.get("CLIPSCOPE_AUDIT_CACHE") or None):
        if choice is not None:
            return Path(expand_path(str(choice)))
    return out_dir / "cache"


def _load_data(spec: AuditSpec):
    """The spec's data set; a missing file or folder's error says which folder relative paths resolved against."""
    try:
        return load_data(spec.data)
    except FileNotFoundError as exc:
        if spec.source_dir is None:
            raise
        raise FileNotFoundError(f"{exc} (relative paths in an audit spec resolve against its folder, "
                                f"{str(spec.source_dir)!r})") from exc


def cli_audit(spec_path: str, out: str | None = None) -> int:
    """``clipscope audit SPEC.yaml [--out DIR]``: run the audit, write the report, print a summary.

    Under a launcher (``torchrun --nproc-per-node N -m clipscope audit ...``) the ranks share the
    encoding and rank 0 alone writes the report and prints. Returns the process exit code: 0 on
    success, 2 for an invalid spec or data set or a resource fault (an ``OSError``: a missing file, an
    unwritable output or cache folder); the message goes to stderr.
    """
    from ..hub import UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
    try:
        result = run_audit(spec_path, out=out)
        if result is None:  # a rank other than 0 under a launcher: rank 0 reports
            return 0
    except (SpecError, OSError, ValueError, UnknownModelError, WeightsNotAvailableError,
            UnsafeCheckpointError) as exc:
        print(f"clipscope audit: {exc}", file=sys.stderr)
        return 2
    p = result.provenance
    print(f"audit {result.spec.name!r}: {p['rows_audited']} images, {p['rows_skipped']} skipped, "
          f"{len(result.taxonomies)} taxonomies, {len(result.models)} model(s) -> {result.output_dir / 'report.html'}")
    s = result.summary
    if not s.empty:
        single = s[~s["grouping"].str.contains(" × ")]
        for _, r in single.iterrows():
            print(f"  {r['model']} | {r['taxonomy']} | {r['outcome']} by {r['grouping']}: overall {r['overall']:.3f}, "
                  f"max gap {r['max_gap']:.3f} [{r['max_gap_ci_low']:.3f}, {r['max_gap_ci_high']:.3f}], "
                  f"chi2 p={r['p_chi2']:.2g}")
    return 0
