"""Data adapters: turn a data set in its own layout into one :class:`AuditData` table.

Kinds (the ``kind`` of a spec's ``data`` section):

``fairface``
    FairFace as distributed: ``ROOT/fairface_label_{train,val}.csv`` (columns ``file, age, gender,
    race, service_test``) with ``file`` relative to ``ROOT`` (``val/1.jpg``). See ``data_cards/fairface.md``.
``hf``
    A ``datasets`` data set: a hub id (``HuggingFaceM4/FairFace`` with ``config: "0.25"``) or a folder
    written by ``Dataset.save_to_disk``. ``ClassLabel`` columns are mapped to their names, so specs and
    joins use names (``"Male"``), never indices.
``imagefolder``
    A folder of images plus ``metadata.csv`` or ``metadata.jsonl`` with a ``file_name`` column
    (the ``datasets`` imagefolder convention) and the group / label columns.
``organism_figures``
    Figures drawn by the model organism's generator (offline): ``n`` figures cycling through the
    organism's groups, a ``child_rate`` share drawn as children, seeded.

Rows that cannot be audited are skipped, counted and reported (never dropped silently): a missing
image file (or file name), a file name that points outside the data set's folder (``..``, an absolute
path, a symlink leading out; reason ``outside the data set: ...``, the file is never read), or a
missing value in a group column. Unreadable images are found while encoding (see
:mod:`clipscope.audit.cache`). Missing label values only remove the row from that accuracy metric.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..data import NO_SUCH_FILE, DataPathError, image_file_problem, resolve_inside
from ..io import safe_text
from .spec import DataSpec, expand_path

KEY, ROW = "_key", "_row"


@dataclass
class AuditData:
    """A data set ready to audit.

    ``frame`` has one row per usable item: ``_key`` (file name or row id), ``_row`` (position in the
    source) and every metadata column as strings (missing label values are NaN). ``fetch(rows)``
    returns image-like items (paths, PIL images, ``datasets`` image dicts) for source positions.
    ``skipped`` lists the rows skipped before encoding, with a reason and their group values.
    """

    kind: str
    frame: pd.DataFrame
    fetch: Callable[[list[int]], list[Any]]
    fingerprint: str
    group_columns: list[str]
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=[KEY, "reason"]))
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def columns(self) -> list[str]:
        return [c for c in self.frame.columns if c not in (KEY, ROW)]


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _finish(kind: str, frame: pd.DataFrame, fetch, fingerprint: str, spec: DataSpec, provenance: dict,
            pre_skipped: list[dict]) -> AuditData:
    """Check the group columns, skip rows missing a group value, apply ``limit``."""
    columns = [c for c in frame.columns if c not in (KEY, ROW)]
    for c in spec.group_columns:
        if c not in columns:
            raise ValueError(f"group column {c!r} is not in the {kind} data; valid columns: {columns}")
    if spec.limit is not None:  # the first `limit` rows of the source
        frame = frame[frame[ROW] < spec.limit]
        pre_skipped = [s for s in pre_skipped if s[ROW] < spec.limit]
    keep = pd.Series(True, index=frame.index)
    skipped = list(pre_skipped)
    for c in spec.group_columns:
        bad = frame[c].map(_missing) & keep
        for _, row in frame[bad].iterrows():
            rec = {KEY: row[KEY], ROW: row[ROW], "reason": f"missing value for group column {c!r}"}
            rec.update({g: row[g] for g in spec.group_columns})
            skipped.append(rec)
        keep &= ~bad
    frame = frame[keep].reset_index(drop=True)
    skipped_frame = pd.DataFrame(skipped, columns=[KEY, ROW, "reason", *spec.group_columns])
    provenance = {"kind": kind, **provenance, "rows_listed": int(len(frame) + len(skipped_frame)),
                  "rows_usable": len(frame), "rows_skipped_before_encoding": len(skipped_frame),
                  "fingerprint": fingerprint, "data_card": spec.data_card}
    fp = _sha(fingerprint, spec.limit, list(spec.group_columns))
    return AuditData(kind, frame, fetch, fp, list(spec.group_columns), skipped_frame, provenance)


def _files_layout(kind: str, root: Path, table: pd.DataFrame, file_col: str, spec: DataSpec,
                  extra_fp: Any, provenance: dict) -> AuditData:
    """Shared by fairface and imagefolder: a table with a file column relative to ``root``."""
    if file_col not in table.columns:
        raise ValueError(f"the {kind} metadata has no {file_col!r} column; columns: {list(table.columns)}")
    table = table.reset_index(drop=True)
    names = table[file_col].tolist()  # as read: undecodable bytes stay surrogate escapes, so files open
    frame = _as_text(table.drop(columns=[file_col]))
    frame.insert(0, ROW, range(len(table)))
    frame.insert(0, KEY, [safe_text(n) if isinstance(n, str) else str(n) for n in names])
    paths: list[Path | None] = []
    stats, pre_skipped = [], []
    for i, name in enumerate(names):
        path, reason, st = _locate(root, name)
        paths.append(path)
        stats.append((str(frame[KEY].iat[i]), st and st.st_size, st and st.st_mtime_ns))
        if reason is not None:
            rec = {KEY: frame[KEY].iat[i], ROW: i, "reason": reason}
            rec.update({g: frame[g].iat[i] if g in frame.columns else None for g in spec.group_columns})
            pre_skipped.append(rec)
    frame = frame[[p is not None for p in paths]].reset_index(drop=True)
    fingerprint = _sha(kind, str(root.resolve()), extra_fp, stats)

    def fetch(rows: list[int]) -> list[Any]:
        return [str(paths[r]) for r in rows]

    return _finish(kind, frame, fetch, fingerprint, spec, provenance, pre_skipped)


def _locate(root: Path, name: Any) -> tuple[Path | None, str | None, os.stat_result | None]:
    """``(real path, None, stat)`` for a usable entry of a file column, ``(None, reason, None)`` otherwise.

    Entries outside ``root`` (``..``, absolute names, escaping symlinks) are refused unread.
    """
    try:
        path = resolve_inside(root, name)
    except DataPathError as exc:
        return None, exc.reason, None
    problem = image_file_problem(root / name)
    if problem is not None:
        return None, "missing image file" if problem == NO_SUCH_FILE else problem, None
    return path, None, path.stat()


def _read_csv(path: Path) -> pd.DataFrame:
    """A metadata CSV as Python strings (empty cells NaN); bytes that are not UTF-8 survive as surrogate
    escapes (object columns: pandas' own string columns cannot hold them)."""
    return pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""], encoding_errors="surrogateescape")


def _read_jsonl(path: Path) -> pd.DataFrame:
    """A JSON-lines metadata file (one object per line) as a table of Python values, like :func:`_read_csv`.

    Raises ValueError naming the first line that is not a JSON object.
    """
    records = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", "surrogateescape").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{safe_text(str(path))} line {n} is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{safe_text(str(path))} line {n} is not a JSON object; got {type(record).__name__}")
        records.append(record)
    return pd.DataFrame(records, dtype=object)


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    """Every present cell as printable text (:func:`~clipscope.io.safe_text`); missing cells unchanged."""
    table = table.copy()
    for c in table.columns:
        table[c] = table[c].map(lambda v: v if _missing(v) else safe_text(str(v)))
    return table


def load_fairface(spec: DataSpec) -> AuditData:
    """FairFace as distributed (see the module docstring)."""
    root = Path(expand_path(spec.path))
    split = spec.split or "val"
    csv = root / f"fairface_label_{split}.csv"
    if not root.is_dir():
        raise FileNotFoundError(
            f"FairFace folder {str(root)!r} does not exist. Download FairFace (see data_cards/fairface.md), "
            f"unzip the images and put fairface_label_{split}.csv next to the train/ and val/ folders, then "
            "point data.path (or $FAIRFACE_ROOT) at that folder.")
    if not csv.is_file():
        have = sorted(p.name for p in root.glob("fairface_label_*.csv"))
        raise FileNotFoundError(f"no {csv.name} in {str(root)!r}; found: {have or 'no label files'}")
    raw = csv.read_bytes()
    table = _read_csv(csv)
    provenance = {"path": str(root), "split": split, "labels_file": csv.name, "padding": spec.padding,
                  "source": "FairFace (Kärkkäinen & Joo, 2021)"}
    return _files_layout("fairface", root, table, "file", spec, (split, hashlib.sha256(raw).hexdigest()), provenance)


def load_imagefolder(spec: DataSpec) -> AuditData:
    """A folder of images plus ``metadata.csv`` / ``metadata.jsonl`` (``file_name`` column)."""
    root = Path(expand_path(spec.path))
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    meta_csv, meta_jsonl = root / "metadata.csv", root / "metadata.jsonl"
    if meta_csv.is_file():
        meta, table = meta_csv, _read_csv(meta_csv)
    elif meta_jsonl.is_file():
        meta = meta_jsonl
        table = _read_jsonl(meta_jsonl)
    else:
        raise FileNotFoundError(f"no metadata.csv or metadata.jsonl in {str(root)!r} "
                                "(one row per image: a file_name column plus the group columns)")
    file_col = spec.image_column or "file_name"
    provenance = {"path": str(root), "metadata": meta.name}
    return _files_layout("imagefolder", root, table, file_col, spec,
                         hashlib.sha256(meta.read_bytes()).hexdigest(), provenance)


def load_hf(spec: DataSpec) -> AuditData:
    """A ``datasets`` data set from the hub or a ``save_to_disk`` folder; ClassLabel ints become names."""
    import datasets
    path = expand_path(spec.path)
    split = spec.split
    if Path(path).is_dir() and ((Path(path) / "dataset_info.json").is_file() or (Path(path) / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(path)
        source = "save_to_disk folder"
    else:
        ds = datasets.load_dataset(path, spec.config, split=split or "validation")
        source = "datasets.load_dataset"
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("validation" if "validation" in ds else next(iter(ds)))
        if split not in ds:
            raise ValueError(f"split {split!r} is not in {path!r}; valid splits: {list(ds)}")
        ds = ds[split]
    features = ds.features
    image_col = spec.image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None or image_col not in features:
        raise ValueError(f"cannot find the image column of {path!r}; columns: {list(features)} "
                         "(set data.image_column)")
    if isinstance(features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: bad bytes are skipped
    meta_cols = [c for c in features if c != image_col]
    columns: dict[str, list] = {}
    for c in meta_cols:
        values = ds[c]
        feat = features[c]
        if isinstance(feat, datasets.ClassLabel):
            columns[c] = [None if v is None or v < 0 else feat.int2str(int(v)) for v in values]
        else:
            columns[c] = [None if _missing(v) else str(v) for v in values]
    frame = pd.DataFrame(columns, dtype=object)
    frame.insert(0, ROW, range(len(ds)))
    frame.insert(0, KEY, [str(i) for i in range(len(ds))])
    fp = _sha("hf", path, spec.config, split, getattr(ds, "_fingerprint", None), len(ds))
    provenance = {"path": path, "config": spec.config, "split": split, "source": source,
                  "class_label_columns": [c for c in meta_cols if isinstance(features[c], datasets.ClassLabel)]}

    def fetch(rows: list[int]) -> list[Any]:
        if not rows:
            return []
        return list(ds.select(rows)[image_col])

    return _finish("hf", frame, fetch, fp, spec, provenance, [])


def load_organism_figures(spec: DataSpec) -> AuditData:
    """``n`` organism figures: group ``GROUPS[i % len(GROUPS)]``, children spread evenly at ``child_rate``, the
    planted trait drawn at ``trait_rates`` per group when given."""
    from ..organism import GROUPS, scenes

    n, seed, rate = int(spec.n), int(spec.seed), float(spec.child_rate)
    config = scenes.SceneConfig(trait_rates=None if spec.trait_rates is None else tuple(spec.trait_rates))
    rows = []
    for i in range(n):
        j = i // len(GROUPS)
        child = math.floor((j + 1) * rate + 1e-9) > math.floor(j * rate + 1e-9)
        rows.append({KEY: str(i), ROW: i, "group": GROUPS[i % len(GROUPS)], "age": "child" if child else "adult"})
    frame = pd.DataFrame(rows)
    generator_src = Path(scenes.__file__).read_bytes()
    fp = _sha("organism_figures", n, seed, rate, config.to_dict(),
              hashlib.sha256(generator_src).hexdigest())

    def fetch(idx: list[int]) -> list[Any]:
        out = []
        for r in idx:
            row = rows[r]
            s = int.from_bytes(hashlib.sha256(f"audit:{seed}:{r}".encode()).digest()[:6], "little")
            out.append(scenes.figure_scene(group=row["group"], age=row["age"], role="person", seed=s,
                                           config=config).image)
        return out

    provenance = {"source": "clipscope.organism.scenes.figure_scene", "n": n, "seed": seed, "child_rate": rate,
                  "trait_rates": spec.trait_rates, "groups": list(GROUPS)}
    return _finish("organism_figures", frame, fetch, fp, spec, provenance, [])


ADAPTERS: dict[str, Callable[[DataSpec], AuditData]] = {
    "fairface": load_fairface,
    "hf": load_hf,
    "imagefolder": load_imagefolder,
    "organism_figures": load_organism_figures,
}


def load_data(spec: DataSpec) -> AuditData:
    """Read the data set a spec's ``data`` section names."""
    try:
        adapter = ADAPTERS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown data kind {spec.kind!r}; valid: {sorted(ADAPTERS)}") from None
    return adapter(spec)
