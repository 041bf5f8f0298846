"""Data adapters on generated fixtures in each layout: FairFace CSV, ``datasets`` with ClassLabel, imagefolder.

Rows that cannot be audited (missing file, unreadable image, missing group value) are skipped,
counted and reported per group; they never crash a run.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from clipscope.audit import load_data, run_audit
from clipscope.audit.spec import DataSpec

from .conftest import make_images

RACES = ["White", "Black", "Indian"]


def write_fairface(root, n=12, split="val"):
    """A FairFace-layout folder: ROOT/fairface_label_val.csv + ROOT/val/N.jpg, with three bad rows."""
    (root / split).mkdir(parents=True)
    rows = []
    for i, im in enumerate(make_images(n, seed=1)):
        f = f"{split}/{i + 1}.jpg"
        if i == 0:
            (root / f).write_bytes(b"this is not a jpeg")          # unreadable image
        elif i != 1:                                               # row 1: file missing on disk
            im.save(root / f, quality=90)
        rows.append({"file": f, "age": ["3-9", "20-29", "50-59"][i % 3], "gender": ["Male", "Female"][i % 2],
                     "race": "" if i == 2 else RACES[i % 3], "service_test": "True"})
    pd.DataFrame(rows).to_csv(root / f"fairface_label_{split}.csv", index=False)
    return rows


def spec_for(data: dict, out, taxonomies=None) -> dict:
    return {"name": "fixture", "models": [{"name": "clipscope-tiny-vit"}], "data": data,
            "taxonomies": taxonomies or [{"name": "t", "classes": ["man", "woman", "thief"],
                                          "harm": {"crime": ["thief"]},
                                          "labels": {"gender": {"column": "gender",
                                                                "correct": {"Male": "man", "Female": "woman"}}}}],
            "bootstrap": {"n": 50, "seed": 0}, "output": str(out), "chunk_size": 4}


def test_fairface_layout_reads_labels_and_skips_bad_rows_per_group(tmp_path, tiny_vit):
    write_fairface(tmp_path / "ff")
    data = load_data(DataSpec(kind="fairface", path=str(tmp_path / "ff"), group_columns=["race", "gender"]))
    assert len(data) == 10                                      # 12 rows - missing file - missing race
    assert set(data.skipped["reason"]) == {"missing image file", "missing value for group column 'race'"}
    assert data.frame["_key"].iloc[0] == "val/1.jpg"

    result = run_audit(spec_for({"kind": "fairface", "path": str(tmp_path / "ff"), "group_columns": ["race", "gender"]},
                                tmp_path / "out"), models=[tiny_vit], progress=False)
    assert result.provenance["rows_audited"] == 9               # the unreadable jpeg is skipped while encoding
    by_stage = result.skipped.groupby("stage").size().to_dict()
    assert by_stage == {"before encoding": 2, "encoding": 1}
    per_group = result.skipped_by_group()
    white = per_group[(per_group["column"] == "race") & (per_group["group"] == "White")]
    assert white[["stage", "count"]].values.tolist() == [["encoding", 1]]      # row 0 is White, unreadable
    assert (per_group[(per_group["column"] == "race")]["group"] == "(missing)").any()
    assert result.groups.set_index(["grouping", "group"]).loc[("race", "White"), "n"].iloc[0] == 3


def test_fairface_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="FAIRFACE_ROOT"):
        load_data(DataSpec(kind="fairface", path=str(tmp_path / "nowhere"), group_columns=["race"]))
    write_fairface(tmp_path / "ff")
    with pytest.raises(FileNotFoundError, match="fairface_label_train.csv"):
        load_data(DataSpec(kind="fairface", path=str(tmp_path / "ff"), split="train", group_columns=["race"]))
    with pytest.raises(ValueError, match=r"group column 'ethnicity'.*valid columns: \['age', 'gender', 'race'"):
        load_data(DataSpec(kind="fairface", path=str(tmp_path / "ff"), group_columns=["ethnicity"]))


def make_hf_dataset(path, n=10):
    """A saved ``datasets`` table shaped like HuggingFaceM4/FairFace: Image + ClassLabel columns."""
    import datasets
    ims = []
    for i, im in enumerate(make_images(n, seed=2)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        ims.append({"bytes": b"\x89PNG broken" if i == 3 else buf.getvalue(), "path": None})
    features = datasets.Features({
        "image": datasets.Image(),
        # names deliberately not in the order a naive 0 = Male reading would assume
        "gender": datasets.ClassLabel(names=["Female", "Male"]),
        "race": datasets.ClassLabel(names=RACES),
        "service_test": datasets.Value("bool"),
    })
    ds = datasets.Dataset.from_dict({
        "image": ims, "gender": [i % 2 for i in range(n)],
        "race": [-1 if i == 5 else i % 3 for i in range(n)], "service_test": [True] * n}, features=features)
    ds.save_to_disk(str(path))
    return ds


def test_hf_dataset_maps_class_labels_to_names(tmp_path, tiny_vit):
    make_hf_dataset(tmp_path / "hf")
    data = load_data(DataSpec(kind="hf", path=str(tmp_path / "hf"), group_columns=["race", "gender"]))
    assert set(data.frame["gender"]) == {"Female", "Male"}       # names, not 0 / 1
    assert data.frame.set_index("_key").loc["0", "gender"] == "Female"
    assert data.skipped["reason"].tolist() == ["missing value for group column 'race'"]   # ClassLabel -1
    assert "gender" in data.provenance["class_label_columns"]

    result = run_audit(spec_for({"kind": "hf", "path": str(tmp_path / "hf"), "group_columns": ["race", "gender"]},
                                tmp_path / "out"), models=[tiny_vit], progress=False)
    assert result.provenance["rows_audited"] == 8                # the broken PNG is skipped, counted
    assert (result.skipped["stage"] == "encoding").sum() == 1
    # accuracy joins on names: "Male" rows are correct exactly when predicted "man"
    p = result.predictions
    correct = ((p["gender"] == "Male") & (p["prediction: t"] == "man")) | \
              ((p["gender"] == "Female") & (p["prediction: t"] == "woman"))
    acc = result.rates("accuracy:gender", "gender", taxonomy="t").set_index("group")
    for g in ("Male", "Female"):
        assert acc.loc[g, "rate"] == pytest.approx(correct[p["gender"] == g].mean())


def test_imagefolder_with_metadata_csv_and_jsonl(tmp_path):
    for fmt in ("csv", "jsonl"):
        root = tmp_path / fmt
        (root / "imgs").mkdir(parents=True)
        rows = []
        for i, im in enumerate(make_images(6, seed=3)):
            im.save(root / "imgs" / f"{i}.png")
            rows.append({"file_name": f"imgs/{i}.png", "skin": ["light", "dark"][i % 2],
                         "label": None if i == 4 else ["a", "b"][i % 2]})
        rows.append({"file_name": "imgs/gone.png", "skin": "dark", "label": "a"})
        if fmt == "csv":
            pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
        else:
            (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        data = load_data(DataSpec(kind="imagefolder", path=str(root), group_columns=["skin"]))
        assert len(data) == 6 and data.skipped["reason"].tolist() == ["missing image file"]
        assert data.skipped["skin"].tolist() == ["dark"]
        assert pd.isna(data.frame.set_index("_key").loc["imgs/4.png", "label"])   # missing label kept as NaN
        assert data.fetch([0])[0].endswith("imgs/0.png")


def test_missing_label_values_leave_only_the_accuracy_metric(tmp_path, tiny_vit):
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for i, im in enumerate(make_images(8, seed=4)):
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "group": "g1" if i < 4 else "g2",
                     "gender": None if i in (0, 5) else ("Male" if i % 2 else "Female")})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    result = run_audit(spec_for({"kind": "imagefolder", "path": str(root), "group_columns": ["group"]},
                                tmp_path / "out"), models=[tiny_vit], progress=False)
    harm = result.rates("harm:crime", "group", taxonomy="t").set_index("group")
    acc = result.rates("accuracy:gender", "group", taxonomy="t").set_index("group")
    assert harm["n"].to_dict() == {"g1": 4, "g2": 4}
    assert acc["n"].to_dict() == {"g1": 3, "g2": 3}
    assert result.label_issues[["reason", "count"]].values.tolist() == [["missing label value", 2]]


def test_organism_figures_are_balanced_and_deterministic():
    spec = DataSpec(kind="organism_figures", n=60, seed=5, child_rate=0.3, group_columns=["group", "age"])
    a, b = load_data(spec), load_data(spec)
    counts = a.frame.groupby(["group", "age"]).size().to_dict()
    assert counts == {(g, "adult"): 14 for g in "ABC"} | {(g, "child"): 6 for g in "ABC"}
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(np.asarray(a.fetch([7])[0]), np.asarray(b.fetch([7])[0]))
    other = load_data(DataSpec(kind="organism_figures", n=60, seed=6, group_columns=["group"]))
    assert other.fingerprint != a.fingerprint
