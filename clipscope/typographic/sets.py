"""Typographic attack data sets: export generated attacks, load the public sets into one harness.

Layouts read (fixtures in the tests are generated in each layout):

- **PAINT** (Ilharco et al. 2022) and **RTA-100** (Azuma & Matsui 2023): image files named
  ``label=<true class>_text=<written text>.<ext>`` anywhere under a folder;
- **SCAM** (Westerhoff et al. 2025): a ``datasets`` table or a folder of images with
  ``metadata.csv`` holding ``file_name, type, object_label, attack_word`` (``type`` is
  ``SCAM``, ``SynthSCAM`` or ``NoSCAM``; NoSCAM images had their attack removed);
- **Materzynska et al. 2022**: a folder of images with ``annotation.json`` mapping each
  file name to ``{"true object": ..., "typographic attack label": ...}``.

Each loader returns a :class:`TypographicSet`; entries whose name or annotation is
malformed, whose file is missing or unreadable (a dangling symlink, a symlink loop), or whose
file lies outside the set's folder (``..``, an absolute name, a symlink leading out; reason
``outside the data set: ...``) are skipped and listed, never silently dropped and never read.
File names that are not valid UTF-8 are kept as Python's surrogate escapes, so they still open.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import (IMAGE_SUFFIXES, NO_SUCH_FILE, DataPathError, display_path, image_file_problem,
                    list_image_files, resolve_inside)
from ..io import ensure_folder, safe_text, write_bytes_atomic, write_text_atomic
from .attack import Attack, generate

_LABEL_TEXT = re.compile(r"^label=(?P<label>.+?)_text=(?P<text>.+?)(?:__\d+)?$")


@dataclass
class TypographicSet:
    """Already-attacked images with their true labels and written texts.

    ``frame`` has columns ``image`` (a path or an image object), ``label``,
    ``text`` (``None`` where no attack is present) and ``attacked`` (bool), plus
    any layout-specific columns; ``skipped`` lists ``(entry, reason)``. Names in ``skipped`` and text
    columns are printable (undecodable bytes shown as ``\\xNN``); ``image`` paths are exact.
    """

    name: str
    frame: Any
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def classes(self) -> list[str]:
        """Sorted union of the labels and the written texts: the default class list for evaluation."""
        names = set(self.frame["label"]) | {t for t in self.frame["text"] if t is not None}
        return sorted(names)

    def evaluate(self, model, classes: Sequence[str] | None = None, *, templates=None, batch_size: int = 32,
                 progress: bool | None = None):
        """Zero-shot predictions on the attacked images; returns a DataFrame with one row per image
        (``prediction``, ``correct``, ``fooled``: the prediction is the written text) and a metrics dict.

        Unreadable images are skipped and counted (``metrics["n_skipped"]``).
        """
        classes = list(classes or self.classes)
        result = model.zero_shot(list(self.frame["image"]), classes, templates=templates, batch_size=batch_size,
                                 progress=progress)
        frame = self.frame.iloc[list(result.positions)].copy()
        frame["prediction"] = result.predictions
        frame["correct"] = frame["prediction"] == frame["label"]
        frame["fooled"] = [t is not None and p == t for p, t in zip(frame["prediction"], frame["text"])]
        attacked = frame[frame["attacked"]]
        metrics = {"n": len(frame), "n_skipped": len(result.skipped), "accuracy": float(frame["correct"].mean()),
                   "attacked_accuracy": float(attacked["correct"].mean()) if len(attacked) else float("nan"),
                   "attack_success_rate": float(attacked["fooled"].mean()) if len(attacked) else float("nan")}
        return frame, metrics


def _frame(rows: list[dict]):
    """The set's table from row dicts: ``image`` kept as given, in an object column (a path may hold
    undecodable bytes as surrogate escapes, which pandas' string columns refuse, and must still open);
    other text made printable (:func:`~clipscope.io.safe_text`); ``text`` None, not NaN, where none was written."""
    import pandas as pd
    columns = [c for c in (list(rows[0]) if rows else ["image", "label", "text", "attacked"]) if c != "image"]
    frame = pd.DataFrame([{c: safe_text(r[c]) if isinstance(r[c], str) else r[c] for c in columns} for r in rows],
                         columns=columns)
    frame.insert(0, "image", pd.Series([r["image"] for r in rows], dtype=object))
    frame["text"] = pd.Series([t if isinstance(t, str) and t else None for t in frame["text"]], dtype=object,
                              index=frame.index)
    return frame


def _entry(folder: Path, name: Any) -> tuple[Path | None, str | None]:
    """``(real path, None)`` for a usable file ``name`` of the set in ``folder``, ``(None, reason)`` otherwise."""
    try:
        path = resolve_inside(folder, name)
    except DataPathError as exc:
        return None, exc.reason
    problem = image_file_problem(folder / name)
    if problem is not None:
        return None, "file is missing" if problem == NO_SUCH_FILE else problem
    return path, None


def load_label_text_folder(folder: str | Path, name: str = "label_text") -> TypographicSet:
    """Load images named ``label=X_text=Y.<ext>`` (the PAINT / RTA-100 convention) under ``folder``."""
    rows, skipped = [], []
    for path in list_image_files(folder):
        match = _LABEL_TEXT.match(path.stem)
        _, reason = _entry(Path(folder), path.relative_to(folder))
        if reason is None and not match:
            reason = "file name does not follow label=<class>_text=<text>"
        if reason is not None:
            skipped.append((display_path(path), reason))
            continue
        label = match["label"].replace("_", " ").strip()
        text = match["text"].replace("_", " ").strip()
        rows.append({"image": str(path), "label": label, "text": text, "attacked": True})
    return TypographicSet(name, _frame(rows), skipped)


def load_paint(folder: str | Path) -> TypographicSet:
    """PAINT's typographic attack set (Ilharco et al. 2022)."""
    return load_label_text_folder(folder, "PAINT")


def load_rta100(folder: str | Path) -> TypographicSet:
    """RTA-100 (Azuma & Matsui 2023)."""
    return load_label_text_folder(folder, "RTA-100")


def load_scam(source: Any, variants: Sequence[str] = ("SCAM", "SynthSCAM", "NoSCAM")) -> TypographicSet:
    """SCAM from a ``datasets`` table or a folder with ``metadata.csv``; keeps the given ``variants``."""
    rows, skipped = [], []
    if hasattr(source, "features"):
        for i, rec in enumerate(source):
            if rec.get("type") not in variants:
                continue
            if not rec.get("object_label"):
                skipped.append((str(rec.get("id", i)), "missing object_label"))
                continue
            rows.append({"image": rec["image"], "label": rec["object_label"], "text": rec.get("attack_word") or None,
                         "attacked": rec["type"] != "NoSCAM", "variant": rec["type"], "id": rec.get("id", i)})
        return TypographicSet("SCAM", _frame(rows), skipped)
    import pandas as pd
    folder = Path(source)
    meta = folder / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"no metadata.csv in {str(folder)!r} (expected columns file_name, type, "
                                "object_label, attack_word)")
    table = pd.read_csv(meta, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
    missing_cols = {"file_name", "type", "object_label", "attack_word"} - set(table.columns)
    if missing_cols:
        raise ValueError(f"metadata.csv lacks column(s) {sorted(missing_cols)}")
    for rec in table.to_dict("records"):
        if rec["type"] not in variants:
            continue
        path, reason = _entry(folder, rec["file_name"])
        if reason is not None:
            skipped.append((safe_text(rec["file_name"]), reason))
        elif not rec["object_label"]:
            skipped.append((safe_text(rec["file_name"]), "missing object_label"))
        else:
            rows.append({"image": str(path), "label": rec["object_label"], "text": rec["attack_word"] or None,
                         "attacked": rec["type"] != "NoSCAM", "variant": rec["type"]})
    return TypographicSet("SCAM", _frame(rows), skipped)


def load_materzynska(folder: str | Path, annotation: str = "annotation.json") -> TypographicSet:
    """Materzynska et al. (2022): images plus ``annotation.json`` (file -> true object, attack label)."""
    folder = Path(folder)
    path = folder / annotation
    if not path.is_file():
        raise FileNotFoundError(f"no {annotation} in {str(folder)!r}")
    try:
        entries = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    rows, skipped = [], []
    if isinstance(entries, list):  # "a list of files": one {file: {...}} object per item
        merged: dict = {}
        for i, item in enumerate(entries):
            if isinstance(item, dict):
                merged.update(item)
            else:
                skipped.append((f"item {i}", "annotation item is not a {file: {...}} object"))
        entries = merged
    if not isinstance(entries, dict):
        raise ValueError(f"{path} must hold an object or a list of objects (file -> annotation); "
                         f"got a JSON {type(entries).__name__}")
    for file_name, info in entries.items():
        image, reason = _entry(folder, file_name)
        if not isinstance(info, dict) or not info.get("true object"):
            skipped.append((safe_text(file_name), "annotation lacks 'true object'"))
        elif reason is not None:
            skipped.append((safe_text(file_name), reason))
        else:
            text = info.get("typographic attack label") or None
            rows.append({"image": str(image), "label": info["true object"], "text": text, "attacked": text is not None})
    return TypographicSet("Materzynska", _frame(rows), skipped)


def export_attack_set(folder: str | Path, images: Any, labels: Sequence[str | None], classes: Sequence[str],
                      attack: Attack, *, seed: int = 0, source: str = "unspecified", fmt: str = "png") -> Path:
    """Write attacked images as ``label=X_text=Y__NNNNN.<fmt>`` plus ``attack_set.csv`` and ``data_card.md``.

    The ``__NNNNN`` suffix keeps names unique; the loaders above accept names with or
    without it. Files are written atomically, one image at a time (nothing is held in
    memory). Returns the folder.
    """
    import io

    import pandas as pd
    if fmt.lower() not in {s.lstrip(".") for s in IMAGE_SUFFIXES}:
        raise ValueError(f"unknown image format {fmt!r}")
    folder = Path(folder)
    ensure_folder(folder / "images")
    rows, skipped = [], []
    for item in generate(attack, images, labels, classes, seed=seed, skipped=skipped):
        label = (item.label or "unknown").replace("/", "-")
        name = f"label={label}_text={item.text.replace('/', '-')}__{item.index:05d}.{fmt}"
        buf = io.BytesIO()
        item.attacked.convert("RGB").save(buf, format="JPEG" if fmt.lower() in ("jpg", "jpeg") else fmt.upper())
        write_bytes_atomic(folder / "images" / name, buf.getvalue())
        rows.append({"file": f"images/{name}", "label": item.label, "text": item.text, "cover": item.cover,
                     "source_key": str(item.key)})
    write_text_atomic(folder / "attack_set.csv", pd.DataFrame(rows).to_csv(index=False))
    card = f"""# Data card: typographic attack set

- **Generated by**: clipscope.typographic.export_attack_set (seed {seed})
- **Source images**: {source}
- **Attack**: {attack.describe()}
- **Images**: {len(rows)} written; {len(skipped)} unreadable source image(s) skipped
- **Classes**: {', '.join(classes)}
- **Mean pixel cover**: {(sum(r['cover'] for r in rows) / len(rows)) if rows else float('nan'):.4f}
- **Layout**: `images/label=<true class>_text=<written text>__<index>.{fmt}` (the PAINT / RTA-100
  convention; load with `clipscope.typographic.load_label_text_folder`), `attack_set.csv` with
  file, label, text, cover (fraction of pixels changed) and the source key.
- **Intended use**: evaluating the typographic robustness of vision-language models.
- **Caveats**: the attack is synthetic (rendered text), not a photographed real-world attack.
"""
    if skipped:
        card += "\n## Skipped source images\n\n" + "\n".join(f"- {k}: {r}" for k, r in skipped) + "\n"
    write_text_atomic(folder / "data_card.md", card)
    return folder

