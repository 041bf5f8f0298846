"""Batch scoring in the zero-shot endpoint format, as a function and on the command line."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from clipscope.cli import main
from clipscope.scoring import RequestError, score

from .conftest import make_images


def _b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def request_with_bad_rows(tmp_path):
    images = make_images(3)
    path = tmp_path / "on-disk.png"
    images[2].save(path)
    return {"input_data": {"columns": ["image", "text"], "index": [0, 1, 2, 3, 4],
                           "data": [[_b64(images[0]), "cat, dog , red square"],
                                    [_b64(images[1])],
                                    ["%%% not base64 %%%"],
                                    [str(path)],
                                    [str(tmp_path / "missing.png")]]}}


def test_round_trip_scores_good_rows_and_reports_bad_rows(tiny_vit, request_with_bad_rows):
    results = score(request_with_bad_rows, tiny_vit)
    assert len(results) == 5
    assert all(r["labels"] == ["cat", "dog", "red square"] for r in results)
    good = [results[i] for i in (0, 1, 3)]
    assert all("error" not in r and abs(sum(r["probs"]) - 1) < 1e-5 for r in good)
    assert results[2]["probs"] is None and "base64" in results[2]["error"]
    assert results[4]["probs"] is None and "row 4" in results[4]["error"]
    # the good rows get the same probabilities as scoring those images directly
    direct = tiny_vit.zero_shot(make_images(3), ["cat", "dog", "red square"]).probs
    assert torch.allclose(torch.tensor([results[0]["probs"], results[1]["probs"], results[3]["probs"]]), direct,
                          atol=1e-5)


def test_json_text_and_files_are_accepted(tiny_vit, request_with_bad_rows, tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(request_with_bad_rows))
    assert score(str(path), tiny_vit) == score(json.dumps(request_with_bad_rows), tiny_vit)


@pytest.mark.parametrize("request_body,message", [
    ({"data": []}, "input_data"),
    ({"input_data": {"columns": ["image", "text"], "data": []}}, "non-empty"),
    ({"input_data": {"columns": ["image", "text"], "data": [["x"]]}}, "first row must carry the labels"),
    ("{not json", "not valid JSON"),
])
def test_malformed_requests_fail_as_a_whole_with_a_reason(tiny_vit, request_body, message):
    with pytest.raises(RequestError, match=message):
        score(request_body, tiny_vit)


def test_the_cli_writes_the_response_file(request_with_bad_rows, tmp_path, capsys):
    req, out = tmp_path / "req.json", tmp_path / "out.json"
    req.write_text(json.dumps(request_with_bad_rows))
    assert main(["score", str(req), "-o", str(out), "--model", "clipscope-tiny-vit"]) == 0
    assert len(json.loads(out.read_text())) == 5
    assert "3 row(s), 2 bad row(s)" in capsys.readouterr().out


def test_the_cli_reports_unknown_models_in_one_line(tmp_path, capsys):
    req = tmp_path / "req.json"
    req.write_text("{}")
    assert main(["score", str(req), "--model", "ViT-B-33"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipscope: error: Unknown model 'ViT-B-33'") and "Traceback" not in err


def test_the_cli_lists_layers(capsys):
    assert main(["layers", "--model", "clipscope-tiny-vit", "--tower", "visual"]) == 0
    out = capsys.readouterr().out
    assert "visual.transformer.resblocks.1.mlp.c_fc" in out and "text." not in out
