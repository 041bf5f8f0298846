"""``clipscope attack`` end to end on the organism: the ablation defence from flags alone, unreadable
images skipped and listed with their reasons, per-image rows keyed by path, bad flags refused before
any work with one error naming the flag and the value."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from clipscope.cli import main
from clipscope.organism.scenes import object_scene
from clipscope.typographic.run import check_config
from clipscope.validate import InvalidArgumentError

SHAPES = ("circle", "square", "triangle")


@pytest.fixture
def folder(tmp_path) -> Path:
    """An imagefolder of organism scenes: 3 per shape, plus one corrupt file among the circles."""
    root = tmp_path / "photos"
    for j, shape in enumerate(SHAPES):
        (root / shape).mkdir(parents=True)
        for i in range(3):
            object_scene(shape=shape, seed=100 * j + i).image.save(root / shape / f"{i}.png")
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def _readable(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.png") if p.name != "broken.png"}


@pytest.mark.slow
def test_ablation_defence_runs_from_flags_alone_and_lists_the_corrupt_file(folder, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["attack", str(folder), "--defence", "ablation", "--ablation-units", "4", "--out", str(out),
               "--cache-dir", str(tmp_path / "blocks")])
    assert rc == 0
    assert any((tmp_path / "blocks").rglob("*.json")) and not (out / "cache").exists()   # per-block results there
    broken = str(folder / "circle" / "broken.png")
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["key"]) == [broken] and "cannot read image" in skipped["reason"][0]
    page = (out / "index.html").read_text()
    assert "1 image(s) skipped" in page and f"{broken}: cannot read image" in page
    assert "ablation of 4 unit(s): visual.layer4[" in page  # the default site: the organism's last block
    for name in ("none", "ablation"):
        rows = pd.read_csv(out / f"images_{name}.csv")
        assert list(rows.columns[:2]) == ["key", "index"]
        assert set(rows["key"]) == _readable(folder) and len(rows) == 9
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["n"]) == [9, 9] and list(summary["n_skipped"]) == [1, 1]
    printed = capsys.readouterr().out
    assert "report:" in printed and "skipped 1 unreadable image(s)" in printed


@pytest.mark.slow
def test_an_explicit_ablation_site_and_a_sweep(folder, tmp_path):
    out = tmp_path / "report"
    rc = main(["attack", str(folder), "--defence", "ablation", "--ablation-site", "visual.layer3",
               "--ablation-units", "2", "--target", "square", "--sweep", "size=0.2,0.3", "--out", str(out)])
    assert rc == 0
    assert "ablation of 2 unit(s): visual.layer3[" in (out / "index.html").read_text()
    assert list(pd.read_csv(out / "sweep.csv")["size"]) == [0.2, 0.3]


@pytest.mark.parametrize("flags,message", [
    (["--sweep", "size"], "--sweep='size' is not valid: NAME=V1,V2"),
    (["--sweep", "size=0.1,-1"], "vary['size']=-1 is not valid"),
    (["--sweep", "kerning=1,2"], "sweepable parameters"),
    (["--ablation-units", "0", "--defence", "ablation"], "ablation_units=0 is not valid: an integer >= 1"),
    (["--ablation-site", "visual.layer4.O", "--defence", "ablation"], "ablation_site='visual.layer4.O' is not "
                                                                      "valid: Unknown site"),
    (["--colour", "blurple"], "colour='blurple' is not valid: unknown colour"),
    (["--opacity", "2"], "opacity=2.0 is not valid"),
    (["--position", "middle"], "position='middle' is not valid"),
    (["--target", "toaster"], "Attack.free_text"),
    (["--classes", "circle,,square"], "classes=['circle', '', 'square'] is not valid"),
    (["--classes", "circle,square"], "not among the classes"),
])
def test_bad_flags_are_refused_before_any_image_is_attacked(folder, tmp_path, capsys, flags, message):
    out = tmp_path / "report"
    assert main(["attack", str(folder), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_config_file_that_is_not_a_mapping_is_refused(folder, tmp_path, capsys):
    config = tmp_path / "attack.yaml"
    config.write_text("- just\n- a list\n")
    assert main(["attack", str(folder), "--config", str(config)]) == 2
    assert "--config=" in capsys.readouterr().err


@pytest.mark.parametrize("config,parameter", [
    ({"data": {"path": "x"}, "ablation_unit": 3}, "ablation_unit"),
    ({"data": {"path": "x", "format": "zip"}}, "data.format"),
    ({"data": {"path": "x", "root": "y"}}, "data.root"),
    ({"data": "x"}, "data"),
    ({}, "data"),
    ({"data": {"path": "x"}, "defences": ["prompt", "blur"]}, "defences"),
    ({"data": {"path": "x"}, "seed": "1"}, "seed"),
    ({"data": {"path": "x"}, "classes": []}, "classes"),
    ({"data": {"path": "x"}, "sweep": [0.1, 0.2]}, "sweep"),
    ({"data": {"path": "x"}, "model": ""}, "model"),
])
def test_config_keys_are_checked_before_the_model_loads(config, parameter):
    with pytest.raises(InvalidArgumentError) as info:
        check_config(config)
    assert info.value.parameter == parameter


def test_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert main(["attack", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "data.path=" in capsys.readouterr().err


def test_a_text_tower_ablation_site_is_refused(folder, tmp_path, capsys):
    assert main(["attack", str(folder), "--defence", "ablation", "--ablation-site", "text.transformer.resblocks.0",
                 "--out", str(tmp_path / "r")]) == 2
    assert "ablation_site='text.transformer.resblocks.0' is not valid: an image-tower site" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_fails_before_the_model_loads(folder, tmp_path, capsys, monkeypatch):
    import clipscope
    loads = []
    monkeypatch.setattr(clipscope, "load", lambda *a, **k: loads.append(a))
    (tmp_path / "afile").write_text("a file, not a folder")
    assert main(["attack", str(folder), "--out", str(tmp_path / "afile" / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "afile" in err and "Not a directory" in err
    assert loads == []
