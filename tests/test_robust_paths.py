"""File names taken from a data set's own tables never reach outside the data set's folder.

Every loader that joins its folder with a name from data (imagefolder ``metadata.csv`` /
``metadata.jsonl``, the FairFace CSV, SCAM's ``metadata.csv``, Materzynska's ``annotation.json``,
PAINT / RTA-100 file names) refuses ``..``, absolute names and symlinks that lead out: the entry is
skipped, counted and listed with the reason "outside the data set: ...", and the file it points at (a
perfectly valid image) is never opened.
"""
from __future__ import annotations

import json
import os

import pandas as pd
import PIL.Image
import pytest

from clipscope.audit import load_data
from clipscope.audit.spec import DataSpec
from clipscope.data import OUTSIDE_DATA_SET, DataPathError, load_image, resolve_inside
from clipscope.typographic import load_label_text_folder, load_materzynska, load_scam

from .conftest import make_images


@pytest.fixture
def secret(tmp_path):
    """A valid image outside the data set's folder, and a folder of them: what an escape would read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    make_images(1)[0].save(outside / "secret.png")
    return outside / "secret.png"


@pytest.fixture
def opened(monkeypatch):
    """Every path PIL.Image.open is asked to open."""
    paths = []
    real_open = PIL.Image.open

    def recording_open(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            paths.append(os.path.realpath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    return paths


def escaping_names(root, secret) -> dict[str, str]:
    """Names that point at ``secret`` from inside ``root``, by every route, mapped to their reason."""
    (root / "link.png").symlink_to(secret)
    (root / "linked_folder").symlink_to(secret.parent, target_is_directory=True)
    return {
        "../outside/secret.png": f"{OUTSIDE_DATA_SET}: a '..' component",
        "imgs/../../outside/secret.png": f"{OUTSIDE_DATA_SET}: a '..' component",
        str(secret): f"{OUTSIDE_DATA_SET}: an absolute path",
        "link.png": f"{OUTSIDE_DATA_SET}: a symlink leads to {str(secret)!r}",
        "linked_folder/secret.png": f"{OUTSIDE_DATA_SET}: a symlink leads to {str(secret)!r}",
    }


def make_root(tmp_path, n=2):
    """A data set folder with ``n`` good images under ``imgs/`` and an inside symlink to the first."""
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    for i, im in enumerate(make_images(n)):
        im.save(root / "imgs" / f"{i}.png")
    (root / "alias.png").symlink_to(root / "imgs" / "0.png")     # inside -> inside: allowed
    return root


class TestResolveInside:
    def test_names_inside_resolve_to_their_real_path(self, tmp_path):
        root = make_root(tmp_path)
        assert resolve_inside(root, "imgs/0.png") == root / "imgs" / "0.png"
        assert resolve_inside(root, "alias.png") == root / "imgs" / "0.png"
        assert resolve_inside(root, "imgs/not_yet.png") == root / "imgs" / "not_yet.png"   # need not exist

    def test_every_escape_is_refused_with_its_reason(self, tmp_path, secret):
        root = make_root(tmp_path)
        for name, reason in escaping_names(root, secret).items():
            with pytest.raises(DataPathError) as info:
                resolve_inside(root, name)
            assert info.value.reason == reason and name in str(info.value)

    @pytest.mark.parametrize("name, reason", [("", "missing file name"), ("  ", "missing file name"),
                                              (None, "missing file name"), (float("nan"), "missing file name"),
                                              ("a\0.png", "invalid file name (NUL byte)")])
    def test_missing_and_invalid_names_are_refused(self, tmp_path, name, reason):
        with pytest.raises(DataPathError) as info:
            resolve_inside(tmp_path, name)
        assert info.value.reason == reason


class TestAuditAdapters:
    @pytest.mark.parametrize("fmt", ["csv", "jsonl"])
    def test_imagefolder_skips_escaping_rows_unread(self, tmp_path, secret, opened, fmt):
        root = make_root(tmp_path)
        escapes = escaping_names(root, secret)
        names = ["imgs/0.png", "imgs/1.png", "alias.png", *escapes]
        rows = [{"file_name": n, "group": "a"} for n in names]
        if fmt == "csv":
            pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
        else:
            (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        data = load_data(DataSpec(kind="imagefolder", path=str(root), group_columns=["group"]))

        assert data.frame["_key"].tolist() == ["imgs/0.png", "imgs/1.png", "alias.png"]
        assert dict(zip(data.skipped["_key"], data.skipped["reason"])) == escapes
        assert data.provenance["rows_skipped_before_encoding"] == len(escapes)
        for item in data.fetch(list(data.frame["_row"])):
            load_image(item)
        assert opened and str(secret) not in opened

    def test_fairface_csv_with_escaping_files(self, tmp_path, secret, opened):
        root = make_root(tmp_path)
        escapes = escaping_names(root, secret)
        pd.DataFrame({"file": ["imgs/0.png", *escapes], "race": "White"}).to_csv(
            root / "fairface_label_val.csv", index=False)
        data = load_data(DataSpec(kind="fairface", path=str(root), group_columns=["race"]))
        assert len(data) == 1 and sorted(data.skipped["reason"]) == sorted(escapes.values())
        load_image(data.fetch([0])[0])
        assert str(secret) not in opened

    def test_missing_file_names_are_skipped_with_their_own_reason(self, tmp_path):
        root = make_root(tmp_path)
        (root / "metadata.csv").write_text("file_name,group\nimgs/0.png,a\n,b\n")
        data = load_data(DataSpec(kind="imagefolder", path=str(root), group_columns=["group"]))
        assert len(data) == 1 and data.skipped["reason"].tolist() == ["missing file name"]


class TestTypographicSets:
    def test_scam_metadata_with_escaping_files(self, tmp_path, secret, opened):
        root = make_root(tmp_path)
        escapes = escaping_names(root, secret)
        names = ["imgs/0.png", *escapes]
        pd.DataFrame({"file_name": names, "type": "SCAM", "object_label": "ball", "attack_word": "car"}).to_csv(
            root / "metadata.csv", index=False)
        tset = load_scam(root)
        assert tset.frame["image"].tolist() == [str(root / "imgs" / "0.png")]
        assert dict(tset.skipped) == escapes
        for item in tset.frame["image"]:
            load_image(item)
        assert str(secret) not in opened

    def test_materzynska_annotation_with_escaping_files(self, tmp_path, secret, opened):
        root = make_root(tmp_path)
        escapes = escaping_names(root, secret)
        annotation = {n: {"true object": "cup", "typographic attack label": "pen"} for n in ["imgs/1.png", *escapes]}
        (root / "annotation.json").write_text(json.dumps(annotation))
        tset = load_materzynska(root)
        assert tset.frame["image"].tolist() == [str(root / "imgs" / "1.png")]
        assert dict(tset.skipped) == escapes
        assert str(secret) not in opened

    def test_materzynska_non_object_items_are_skipped_not_fatal(self, tmp_path):
        root = make_root(tmp_path)
        (root / "annotation.json").write_text(json.dumps([{"imgs/0.png": {"true object": "cup"}}, "junk", 3]))
        tset = load_materzynska(root)
        assert len(tset) == 1
        assert dict(tset.skipped) == {"item 1": "annotation item is not a {file: {...}} object",
                                      "item 2": "annotation item is not a {file: {...}} object"}

    def test_materzynska_annotation_that_is_not_a_mapping_is_one_clear_error(self, tmp_path):
        (tmp_path / "annotation.json").write_text("42")
        with pytest.raises(ValueError, match="must hold an object or a list of objects.*got a JSON int"):
            load_materzynska(tmp_path)

    def test_paint_folder_with_an_escaping_symlink(self, tmp_path, secret, opened):
        root = tmp_path / "paint"
        root.mkdir()
        make_images(1)[0].save(root / "label=cat_text=dog.png")
        (root / "label=pen_text=cup.png").symlink_to(secret)                     # leads out
        (root / "label=cup_text=pen.png").symlink_to(root / "label=cat_text=dog.png")   # stays inside
        tset = load_label_text_folder(root)
        assert sorted(tset.frame["label"]) == ["cat", "cup"]
        assert tset.skipped == [(str(root / "label=pen_text=cup.png"),
                                 f"{OUTSIDE_DATA_SET}: a symlink leads to {str(secret)!r}")]
        for item in tset.frame["image"]:
            load_image(item)
        assert str(secret) not in opened

    def test_dangling_links_and_loops_in_a_paint_folder_are_listed(self, tmp_path):
        root = tmp_path / "paint"
        root.mkdir()
        make_images(1)[0].save(root / "label=cat_text=dog.png")
        (root / "label=a_text=b.png").symlink_to(root / "gone.png")
        (root / "label=c_text=d.png").symlink_to(root / "label=c_text=d.png")
        tset = load_label_text_folder(root)
        assert len(tset) == 1
        assert dict(tset.skipped) == {str(root / "label=a_text=b.png"): "dangling symlink",
                                      str(root / "label=c_text=d.png"): "symlink loop"}
