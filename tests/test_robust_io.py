"""Outputs: written whole or not at all, readable like any file the user writes, one clear error on failure,
and file names that are not UTF-8 survive every table and report.

The tests run as root, for whom a chmod-ed folder is still writable, so a read-only or full disk is
simulated: a parent that is a regular file, or ``os.replace`` / a write raising the OS error.
"""
from __future__ import annotations

import errno
import html
import json
import os
import stat

import pandas as pd
import pytest

import clipscope.io
from clipscope.data import display_path, list_image_files, load_image
from clipscope.io import OutputError, check_writable, ensure_folder, safe_text, write_bytes_atomic, write_text_atomic
from clipscope.typographic import export_attack_set, load_label_text_folder, load_materzynska
from clipscope.typographic.attack import Attack

from .conftest import make_images

NON_UTF8 = os.fsdecode(b"caf\xe9")          # "caf\udce9": a Latin-1 name on a UTF-8 system


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


class TestPermissions:
    @pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
    def test_written_files_get_the_mode_of_any_file_the_user_writes(self, tmp_path, umask, mask):
        umask(mask)
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        written = write_text_atomic(tmp_path / "report.csv", "a,b\n")
        image = write_bytes_atomic(tmp_path / "image.png", b"\x89PNG")
        expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
        assert expected == 0o666 & ~mask
        assert stat.S_IMODE(written.stat().st_mode) == expected == stat.S_IMODE(image.stat().st_mode)


class TestResourceFaults:
    def test_a_parent_that_is_a_file_is_one_error_naming_the_path(self, tmp_path):
        (tmp_path / "blocker").write_text("a file, not a folder")
        target = tmp_path / "blocker" / "out" / "summary.csv"
        with pytest.raises(OutputError) as info:
            write_text_atomic(target, "a,b\n")
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOTDIR
        assert str(info.value).startswith(f"cannot write {target}: Not a directory")
        assert leftovers(tmp_path) == []

    def test_ensure_folder_reports_the_same_way(self, tmp_path):
        (tmp_path / "blocker").write_text("")
        with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'blocker' / 'cache'}: "):
            ensure_folder(tmp_path / "blocker" / "cache")
        assert ensure_folder(tmp_path / "a" / "b").is_dir()

    def test_a_full_disk_leaves_the_old_file_and_no_temporary(self, tmp_path, monkeypatch):
        target = tmp_path / "report.html"
        target.write_text("old report")
        real_fdopen = os.fdopen

        class FullDisk:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(clipscope.io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
        with pytest.raises(OutputError) as info:
            write_text_atomic(target, "new report")
        assert str(info.value) == f"cannot write {target}: No space left on device"
        assert info.value.errno == errno.ENOSPC and info.value.path == target
        assert target.read_text() == "old report" and leftovers(tmp_path) == []

    def test_a_read_only_disk_at_the_rename(self, tmp_path, monkeypatch):
        def read_only(src, dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
        monkeypatch.setattr(clipscope.io.os, "replace", read_only)
        with pytest.raises(OutputError) as info:
            write_bytes_atomic(tmp_path / "grid.png", b"png")
        assert str(info.value).startswith(f"cannot write {tmp_path / 'grid.png'}: Read-only file system")
        assert not (tmp_path / "grid.png").exists() and leftovers(tmp_path) == []

    def test_a_folder_in_the_way_of_the_file(self, tmp_path):
        (tmp_path / "index.html").mkdir()
        with pytest.raises(OutputError, match="cannot write .*index.html: Is a directory"):
            write_text_atomic(tmp_path / "index.html", "<html>")
        assert leftovers(tmp_path) == []

    def test_an_interrupt_is_not_converted_but_still_cleans_up(self, tmp_path, monkeypatch):
        def interrupted(src, dst):
            raise KeyboardInterrupt
        monkeypatch.setattr(clipscope.io.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_text_atomic(tmp_path / "a.csv", "x")
        assert leftovers(tmp_path) == []

    def test_exporting_an_attack_set_into_a_file_is_one_output_error(self, tmp_path):
        (tmp_path / "set").write_text("")
        with pytest.raises(OutputError, match="cannot write .*set/images: "):
            export_attack_set(tmp_path / "set", make_images(1), ["cat"], ["cat", "dog"], Attack.untargeted())


class TestNonUtf8Names:
    def test_safe_text_shows_the_bytes_and_leaves_other_text_alone(self):
        assert safe_text(NON_UTF8 + ".png") == "caf\\xe9.png"
        assert safe_text("a\ud800b") == "a\\ud800b"            # a lone surrogate that is not an escaped byte
        assert safe_text("naïve 猫.png") == "naïve 猫.png"
        assert display_path(os.fsencode(NON_UTF8)) == "caf\\xe9"

    def test_such_a_file_loads_and_survives_a_csv_and_an_html_report(self, tmp_path):
        make_images(1)[0].save(tmp_path / f"{NON_UTF8}.png")
        [path] = list_image_files(tmp_path)
        assert load_image(path).size == (48, 48)

        table = pd.DataFrame({"file": pd.Series([str(path)], dtype=object)})   # pandas' str dtype refuses surrogates
        csv = write_text_atomic(tmp_path / "out" / "files.csv", table.to_csv(index=False))
        assert csv.read_bytes().decode("utf-8").splitlines()[1] == str(tmp_path / "caf\\xe9.png")
        page = write_text_atomic(tmp_path / "out" / "index.html", f"<li>{html.escape(str(path))}</li>")
        assert "caf\\xe9.png</li>" in page.read_bytes().decode("utf-8")

    def test_a_paint_set_with_such_a_name_is_loaded_and_its_skip_list_written(self, tmp_path):
        make_images(1)[0].save(tmp_path / f"label={NON_UTF8}_text=dog.png")
        make_images(1)[0].save(tmp_path / f"{NON_UTF8}.png")                       # malformed name: skipped
        tset = load_label_text_folder(tmp_path)
        assert tset.frame["label"].tolist() == ["caf\\xe9"] and len(tset.skipped) == 1
        assert load_image(tset.frame["image"].iloc[0]).size == (48, 48)                  # the path is exact
        out = write_text_atomic(tmp_path / "skipped.csv", pd.DataFrame(tset.skipped).to_csv(index=False))
        assert out.read_bytes().decode("utf-8").splitlines()[1] == \
            f"{tmp_path}/caf\\xe9.png,file name does not follow label=<class>_text=<text>"

    def test_metadata_csv_with_raw_non_utf8_bytes_opens_the_file(self, tmp_path):
        from clipscope.audit import load_data
        from clipscope.audit.spec import DataSpec
        make_images(1)[0].save(tmp_path / f"{NON_UTF8}.png")
        (tmp_path / "metadata.csv").write_bytes(b"file_name,group\ncaf\xe9.png,a\n")
        data = load_data(DataSpec(kind="imagefolder", path=str(tmp_path), group_columns=["group"]))
        assert len(data) == 1 and data.skipped.empty and data.frame["_key"].tolist() == ["caf\\xe9.png"]
        assert load_image(data.fetch([0])[0]).size == (48, 48)

    def test_metadata_jsonl_with_escaped_surrogates_opens_the_file(self, tmp_path):
        from clipscope.audit import load_data
        from clipscope.audit.spec import DataSpec
        make_images(1)[0].save(tmp_path / f"{NON_UTF8}.png")
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": f"{NON_UTF8}.png", "group": "a"}) + "\n")
        data = load_data(DataSpec(kind="imagefolder", path=str(tmp_path), group_columns=["group"]))
        assert len(data) == 1 and load_image(data.fetch([0])[0]).size == (48, 48)

    def test_a_materzynska_annotation_with_raw_non_utf8_bytes(self, tmp_path):
        make_images(1)[0].save(tmp_path / f"{NON_UTF8}.png")
        (tmp_path / "annotation.json").write_bytes(b'{"caf\xe9.png": {"true object": "caf\xe9"}, '
                                                   b'"gone\xff.png": {"true object": "cup"}}')
        tset = load_materzynska(tmp_path)
        assert tset.frame["label"].tolist() == ["caf\\xe9"] and load_image(tset.frame["image"].iloc[0])
        assert tset.skipped == [("gone\\xff.png", "file is missing")]


class TestCheckWritable:
    def test_a_missing_folder_under_a_writable_one_passes_and_is_not_created(self, tmp_path):
        assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
        assert list(tmp_path.iterdir()) == []

    def test_an_existing_folder_is_probed_and_left_as_it_was(self, tmp_path):
        (tmp_path / "keep.txt").write_text("x")
        check_writable(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

    def test_a_parent_that_is_a_file_is_one_error_naming_the_folder_and_the_cause(self, tmp_path):
        (tmp_path / "afile").write_text("x")
        with pytest.raises(OutputError) as info:
            check_writable(tmp_path / "afile" / "out")
        assert str(info.value).startswith(f"cannot write {tmp_path / 'afile' / 'out'}: Not a directory")
