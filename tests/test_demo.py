"""The main job writes one report folder with timings, linked from index.html."""
from __future__ import annotations

import pandas as pd

from clipscope.cli import main


def test_demo_writes_the_report_folder(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--model", "clipscope-tiny-vit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot on generated scenes:" in printed and str(out.resolve()) in printed
    index = (out / "index.html").read_text()
    assert "zero_shot.png" in index and "layers.csv" in index
    table = pd.read_csv(out / "zero_shot.csv")
    assert len(table) == 64 and {"true_shape", "prediction", "predicted_colour"} <= set(table.columns)
    assert "visual.transformer.resblocks.1" in set(pd.read_csv(out / "layers.csv")["name"])
    assert (out / "zero_shot.png").stat().st_size > 10_000
