"""``zero_shot`` on a folder reads the folder's listing once: ``embed`` records each row's position in
it, so neither the length nor the positions need a listing of their own. The result is the one a
list of the same files (in the listing's order) gives."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from clipscope.data import list_image_files

from .conftest import make_images

CLASSES = ["cat", "dog"]


@pytest.fixture
def folder(tmp_path):
    """A folder of three readable images around one undecodable file (sorted: a, b, c, d)."""
    images = make_images(3)
    for name, image in zip(["a.png", "c.png", "d.png"], images):
        image.save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a PNG")
    return tmp_path


@pytest.fixture
def scandir_calls(monkeypatch):
    """The folders ``os.scandir`` is asked to list (pathlib's ``rglob`` lists through it)."""
    calls = []
    real = os.scandir

    def spy(path="."):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    return calls


def test_zero_shot_on_a_folder_lists_it_as_often_as_one_listing_does(tiny_rn, folder, scandir_calls):
    list_image_files(folder)
    one_listing = len(scandir_calls)
    assert one_listing > 0  # the spy sees listings at all
    scandir_calls.clear()
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 image\(s\)"):
        tiny_rn.zero_shot(str(folder), CLASSES, batch_size=2)
    assert len(scandir_calls) == one_listing


def test_zero_shot_on_a_folder_equals_zero_shot_on_its_files_in_order(tiny_rn, folder):
    files = [str(p) for p in sorted(folder.iterdir())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_folder = tiny_rn.zero_shot(str(folder), CLASSES, batch_size=2)
        from_list = tiny_rn.zero_shot(files, CLASSES, batch_size=2)
    assert from_folder.keys == from_list.keys == [files[0], files[2], files[3]]
    assert from_folder.positions == from_list.positions == [0, 2, 3]
    assert [k for k, _ in from_folder.skipped] == [k for k, _ in from_list.skipped] == [files[1]]
    assert torch.equal(from_folder.probs, from_list.probs)


def test_embed_records_each_rows_position_in_the_folder(tiny_rn, folder):
    embedded = tiny_rn.embed(str(folder), batch_size=2, progress=False)
    assert embedded.positions == [0, 2, 3]
    assert embedded.keys == [str(folder / name) for name in ("a.png", "c.png", "d.png")]
