"""Run an audit: ``run_audit(spec_or_path) -> AuditResult``, and the ``clipscope audit`` command.

Steps: read the spec; read the data set through its adapter; per model, embed every image once
through the on-disk cache; per taxonomy, zero-shot classify the cached embeddings (only the class
prompts are encoded); compute the disaggregated metrics, the paired taxonomy comparison and the
retrieval metrics; write the report.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import prompts
from ..io import OutputError
from .adapters import KEY, ROW, load_data
from .cache import embed_cached
from .compare import paired_changes
from .metrics import disaggregate, group_labels, retrieval_metrics
from .result import AuditResult
from .spec import AuditSpec, ModelSpec, SpecError, expand_path, load_spec


def _load_model(m: ModelSpec | Any, device: str):
    import clipscope
    if isinstance(m, clipscope.ClipModel):
        return m
    if isinstance(m, str):
        m = ModelSpec(name=m)
    return clipscope.load(m.name, pretrained=m.pretrained, device=device)


def _outcomes_for(spec: AuditSpec, tax, pred: np.ndarray, frame: pd.DataFrame, metric_set: Sequence[str],
                  issues: list[dict], model_name: str) -> dict[tuple[str, str], tuple[str, np.ndarray, np.ndarray]]:
    """Binary outcomes of one taxonomy: ``{(taxonomy, outcome): (metric, y, valid)}``."""
    classes = np.asarray(tax.classes)
    predicted = classes[pred]
    out = {}
    n = len(pred)
    if "harm_rate" in metric_set:
        for cat, members in tax.harm.items():
            out[(tax.name, f"harm:{cat}")] = ("harm_rate", np.isin(predicted, members), np.ones(n, bool))
    if "accuracy" in metric_set:
        for task, lab in tax.labels.items():
            if lab.column not in frame.columns:
                raise ValueError(f"taxonomy {tax.name!r} label task {task!r}: column {lab.column!r} is not in the "
                                 f"data; valid columns: {[c for c in frame.columns if c not in (KEY, ROW)]}")
            correct = lab.correct_classes()
            values = frame[lab.column].to_numpy(dtype=object)
            y = np.zeros(n, bool)
            valid = np.zeros(n, bool)
            unmapped: dict[str, int] = {}
            missing = 0
            for i, v in enumerate(values):
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
                issues.append({"model": model_name, "taxonomy": tax.name, "task": task, "column": lab.column,
                               "reason": "missing label value", "value": None, "count": missing})
            for v, c in unmapped.items():
                issues.append({"model": model_name, "taxonomy": tax.name, "task": task, "column": lab.column,
                               "reason": "label value has no correct class in this taxonomy", "value": v, "count": c})
            out[(tax.name, f"accuracy:{task}")] = ("accuracy", y, valid)
    return out


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed, then create and remove a probe file in it.

    Raises :class:`~clipscope.io.OutputError` naming the folder and the cause (a parent that is a
    file, a read-only file system, no permission, a full disk) so an audit fails before it encodes.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".clipscope-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(folder, exc) from exc


def run_audit(spec_or_path: str | os.PathLike | AuditSpec | dict, *, out: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, models: Sequence[Any] | None = None,
              write: bool = True, progress: bool | None = None) -> AuditResult:
    """Run the audit a spec describes and return an :class:`~clipscope.audit.AuditResult`.

    ``spec_or_path``: a YAML path, YAML text, a dict or an :class:`AuditSpec` (see :func:`load_spec`
    for how paths in it resolve). ``out`` overrides the spec's output folder; ``cache_dir`` its
    embedding cache (default: the spec's ``cache_dir``, else ``$CLIPSCOPE_AUDIT_CACHE``, else
    ``OUTPUT/cache``). ``models`` replaces the spec's models (names, :class:`ModelSpec` or loaded
    :class:`~clipscope.ClipModel` objects). ``write=False`` skips writing the report.

    The output folder (when writing) and the cache folder are checked for writing before the data
    are read or any image is encoded: :class:`~clipscope.io.OutputError` names the folder and the cause.
    """
    from tqdm.auto import tqdm

    spec = load_spec(spec_or_path)
    t_start = time.perf_counter()
    out_dir = Path(expand_path(str(out) if out is not None else spec.output))
    cache = _cache_folder(cache_dir, spec, out_dir)
    for folder in ([out_dir] if write else []) + [cache]:
        check_writable(folder)
    metric_set = spec.metric_set()
    data = _load_data(spec)
    for t in spec.taxonomies:  # label columns must exist before any encoding starts
        for task, lab in t.labels.items():
            if "accuracy" in metric_set and lab.column not in data.columns:
                raise ValueError(f"taxonomy {t.name!r} label task {task!r}: column {lab.column!r} is not in the "
                                 f"data; valid columns: {data.columns}")
    groupings = spec.groupings()
    model_list = list(models) if models is not None else list(spec.models)
    boot = spec.bootstrap

    all_groups, all_summary, all_changes, all_shares, all_retr = [], [], [], [], []
    skipped_parts, issues, model_prov = [], [], []
    predictions = None
    skipped_pre = data.skipped.assign(stage="before encoding", model=None)
    skipped_parts.append(skipped_pre)

    for m in model_list:
        model = _load_model(m, spec.device)
        mname = model.name
        t0 = time.perf_counter()
        cached = embed_cached(model, data, cache, chunk_size=spec.chunk_size, batch_size=spec.batch_size,
                              progress=progress)
        t_embed = time.perf_counter() - t0
        frame = data.frame.iloc[cached.rows].reset_index(drop=True)
        if cached.unreadable:
            bad_rows = [r for r, _ in cached.unreadable]
            bad = data.frame.iloc[bad_rows][[KEY, ROW, *data.group_columns]].copy()
            bad["reason"] = [r for _, r in cached.unreadable]
            bad["stage"] = "encoding"
            bad["model"] = mname
            skipped_parts.append(bad)
        emb = cached.embeddings
        if predictions is None:
            predictions = frame.copy()
        taxonomy_outcomes: dict = {}
        timings = {}
        for tax in tqdm(spec.taxonomies, desc="audit: taxonomies", leave=False,
                        disable=not (progress if progress is not None else len(spec.taxonomies) > 2)):
            t1 = time.perf_counter()
            templates = prompts.resolve_templates(tax.templates, model.default_templates)
            with torch.no_grad():
                cls = model.class_embeddings(tax.classes, templates).float().cpu()
            pred = (emb @ cls.T).argmax(dim=1).numpy() if len(emb) else np.zeros(0, int)
            col = f"{mname} / {tax.name}" if len(model_list) > 1 else tax.name
            if len(predictions) == len(frame):
                predictions[f"prediction: {col}"] = np.asarray(tax.classes)[pred]
            for grouping in groupings:
                if len(grouping) > 1:
                    continue
                labels = group_labels(frame, grouping)
                for g in sorted(set(labels.tolist())):
                    sel = pred[labels == g]
                    counts = np.bincount(sel, minlength=len(tax.classes))
                    for ci, c in enumerate(tax.classes):
                        all_shares.append({"model": mname, "taxonomy": tax.name, "grouping": grouping[0], "group": g,
                                           "class": c, "count": int(counts[ci]),
                                           "share": float(counts[ci] / max(1, len(sel)))})
            taxonomy_outcomes.update(_outcomes_for(spec, tax, pred, frame, metric_set, issues, mname))
            timings[tax.name] = time.perf_counter() - t1

        # metrics: one bootstrap per grouping covers every taxonomy and outcome (paired resamples)
        t2 = time.perf_counter()
        names = {f"{t}\x1f{o}": (y, v) for (t, o), (_, y, v) in taxonomy_outcomes.items()}
        metric_of = {o: mk for (t, o), (mk, _, _) in taxonomy_outcomes.items()}
        for grouping in groupings:
            gname = " × ".join(grouping)
            labels = group_labels(frame, grouping)
            groups_df, summary_df, samples = disaggregate(names, labels, grouping=gname, n_boot=boot.n,
                                                          seed=boot.seed, confidence=boot.confidence)
            for df in (groups_df, summary_df):
                if df.empty:
                    continue
                split = df["outcome"].str.split("\x1f", n=1, expand=True)
                df.insert(0, "taxonomy", split[0])
                df["outcome"] = split[1]
                df.insert(0, "model", mname)
                df.insert(2, "metric", df["outcome"].map(metric_of))
            all_groups.append(groups_df)
            all_summary.append(summary_df)
            outcomes = {(t, o): (y, v) for (t, o), (_, y, v) in taxonomy_outcomes.items()}
            pair_samples = {(tuple(k.split("\x1f", 1)), g): s for (k, g), s in samples.items()}
            all_changes += paired_changes(mname, gname, labels, outcomes, pair_samples,
                                          [t.name for t in spec.taxonomies], boot.confidence)
        t_metrics = time.perf_counter() - t2

        if "retrieval" in metric_set and spec.retrieval is not None and len(emb):
            r = spec.retrieval
            with torch.no_grad():
                q = model.encode_text(list(r.queries)).float().cpu()
            sim = (q @ emb.T).numpy()
            for col in (r.group_columns or data.group_columns):
                df = retrieval_metrics(sim, group_labels(frame, [col]), r.queries, r.k, grouping=col,
                                       desired=r.desired, n_random=r.n_random, seed=boot.seed)
                df.insert(0, "model", mname)
                all_retr.append(df)
        model_prov.append({"name": mname, "id": model.id, "pretrained": model.pretrained,
                           "images_embedded": len(emb), "unreadable": len(cached.unreadable),
                           "cache": cached.stats, "embed_seconds": round(t_embed, 3),
                           "taxonomy_seconds": {k: round(v, 4) for k, v in timings.items()},
                           "metrics_seconds": round(t_metrics, 3)})

    def cat(parts, columns=None):
        parts = [p for p in parts if p is not None and len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    skipped = cat(skipped_parts, [KEY, ROW, "reason", "stage", "model", *data.group_columns])
    skipped = skipped.rename(columns={KEY: "key", ROW: "row"})
    provenance = {"spec_name": spec.name, "data": data.provenance, "models": model_prov,
                  "rows_audited": int(model_prov[0]["images_embedded"]) if model_prov else 0,
                  "rows_skipped": len(skipped), "groupings": [" × ".join(g) for g in groupings],
                  "metrics": list(metric_set), "bootstrap": boot.model_dump(),
                  "seconds": round(time.perf_counter() - t_start, 3), "cache_dir": str(cache)}
    preds = predictions if predictions is not None else data.frame.iloc[:0]
    result = AuditResult(
        spec=spec, groups=cat(all_groups), summary=cat(all_summary), changes=pd.DataFrame(all_changes),
        class_shares=pd.DataFrame(all_shares), retrieval=cat(all_retr), skipped=skipped,
        label_issues=pd.DataFrame(issues, columns=["model", "taxonomy", "task", "column", "reason", "value", "count"]),
        predictions=preds.rename(columns={KEY: "key", ROW: "row"}), provenance=provenance, output_dir=out_dir)
    if write:
        result.write_report(out_dir)
    return result


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

    Returns the process exit code: 0 on success, 2 for an invalid spec or data set or a resource fault
    (an ``OSError``: a missing file, an unwritable output or cache folder); the message goes to stderr.
    """
    from ..hub import UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
    try:
        result = run_audit(spec_path, out=out)
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
