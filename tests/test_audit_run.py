"""Running audits: the embedding cache is reused across taxonomies and re-runs, an interrupted run
resumes to the identical result, reports escape user strings, and the CLI entry reports errors."""
from __future__ import annotations

import pandas as pd
import pytest

from clipscope.audit import cli_audit, run_audit

T1 = {"name": "roles+thief", "classes": ["doctor", "teacher", "person", "thief"], "harm": {"crime": ["thief"]}}
T2 = {"name": "roles+thief+child", "classes": ["doctor", "teacher", "person", "thief", "child"],
      "harm": {"crime": ["thief"]}}


def organism_spec(out, taxonomies, n=36, chunk_size=8, **extra) -> dict:
    return {"name": "run-test", "models": [{"name": "clipscope-tiny-vit"}],
            "data": {"kind": "organism_figures", "n": n, "seed": 1, "group_columns": ["group", "age"]},
            "taxonomies": taxonomies, "bootstrap": {"n": 100, "seed": 0}, "output": str(out),
            "chunk_size": chunk_size, **extra}


class EncodeCounter:
    """Counts the images a model encodes by wrapping its image tower."""

    def __init__(self, model, monkeypatch):
        self.images = 0
        inner = model.model.encode_image

        def counting(x, *a, **k):
            self.images += x.shape[0]
            return inner(x, *a, **k)
        monkeypatch.setattr(model.model, "encode_image", counting)


def test_a_second_taxonomy_encodes_no_images(tmp_path, tiny_vit, monkeypatch):
    counter = EncodeCounter(tiny_vit, monkeypatch)
    cache = tmp_path / "cache"
    first = run_audit(organism_spec(tmp_path / "a", [T1]), models=[tiny_vit], cache_dir=cache, write=False,
                      progress=False)
    assert counter.images == 36 and first.provenance["models"][0]["cache"]["images_encoded"] == 36
    second = run_audit(organism_spec(tmp_path / "b", [T2]), models=[tiny_vit], cache_dir=cache, write=False,
                       progress=False)
    assert counter.images == 36                                   # not one image encoded again
    stats = second.provenance["models"][0]["cache"]
    assert stats["images_encoded"] == 0 and stats["chunks_reused"] == 5
    # both taxonomies in one run also encode each image once
    counter.images = 0
    run_audit(organism_spec(tmp_path / "c", [T1, T2]), models=[tiny_vit], cache_dir=tmp_path / "fresh",
              write=False, progress=False)
    assert counter.images == 36


def test_an_interrupted_run_resumes_from_its_cache_with_the_same_result(tmp_path, tiny_vit, monkeypatch):
    spec = organism_spec(tmp_path / "out", [T1, T2])
    reference = run_audit(spec, models=[tiny_vit], cache_dir=tmp_path / "ref-cache", write=False, progress=False)

    calls = {"n": 0}
    real_embed = tiny_vit.embed

    def embed_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption during the third chunk")
        return real_embed(*args, **kwargs)
    monkeypatch.setattr(tiny_vit, "embed", embed_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_audit(spec, models=[tiny_vit], cache_dir=tmp_path / "cache", write=False, progress=False)
    monkeypatch.setattr(tiny_vit, "embed", real_embed)
    chunks = sorted(p.name for p in (tmp_path / "cache").rglob("chunk_*.safetensors"))
    assert chunks == ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))          # no half-written files

    resumed = run_audit(spec, models=[tiny_vit], cache_dir=tmp_path / "cache", write=False, progress=False)
    stats = resumed.provenance["models"][0]["cache"]
    assert (stats["chunks_reused"], stats["chunks_computed"], stats["images_encoded"]) == (2, 3, 20)
    pd.testing.assert_frame_equal(resumed.groups, reference.groups)
    pd.testing.assert_frame_equal(resumed.changes, reference.changes)
    pd.testing.assert_frame_equal(resumed.predictions, reference.predictions)


def test_report_escapes_user_strings_and_is_self_contained(tmp_path, tiny_vit):
    evil = "<script>alert(1)</script>"
    tax = {"name": "<b>tax</b>", "classes": ["doctor", evil, "$5 & a half"], "harm": {"x<y": [evil]}}
    spec = organism_spec(tmp_path / "out", [tax], n=18, name="<img src=x onerror=alert(2)>",
                         description="desc with <iframe>", retrieval={"queries": [evil], "k": [5]})
    result = run_audit(spec, models=[tiny_vit], progress=False)
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    for raw in (evil, "<img src=x", "<iframe>", "<b>tax</b>"):
        assert raw not in html and raw not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;script&gt;" in md
    assert "data:image/png;base64," in html and "src='http" not in html and 'src="http' not in html
    assert "<script" not in html.lower()
    for name in ("groups.csv", "summary.csv", "changes.csv", "skipped.csv", "spec.yaml", "provenance.json"):
        assert (tmp_path / "out" / name).is_file()
    assert result.rates("harm:x<y", "group", taxonomy="<b>tax</b>")["n"].sum() == 18
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_results_have_frames_plots_and_html(tmp_path, tiny_vit):
    result = run_audit(organism_spec(tmp_path / "out", [T1, T2]), models=[tiny_vit], write=False, progress=False)
    frame = result.to_frame()
    assert {"rate", "ci_low", "ci_high", "diff_vs_rest", "p_fisher"} <= set(frame.columns)
    assert set(frame["grouping"]) == {"group", "age", "group × age"}
    comp = result.compare("roles+thief", "roles+thief+child")
    wide = comp.side_by_side("harm:crime", "group")
    assert list(wide["group"]) == ["A", "B", "C"] and "change roles+thief → roles+thief+child" in wide.columns
    assert len(result.compare("roles+thief+child", "roles+thief").changes) == len(comp.changes)
    fig = result.plot()
    assert fig.axes
    assert "run-test" in result._repr_html_()
    with pytest.raises(ValueError, match="unknown taxonomy 'T3'"):
        result.compare("T3")
    with pytest.raises(ValueError, match=r"no outcome 'harm:theft'.*harm:crime"):
        result.rates("harm:theft")


def test_cli_audit_writes_the_report_and_reports_bad_specs(tmp_path, capsys):
    import yaml
    spec = organism_spec(tmp_path / "out", [T1], n=12)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli_audit(str(path), out=str(tmp_path / "cli-out")) == 0
    assert (tmp_path / "cli-out" / "report.html").is_file()
    assert "12 images" in capsys.readouterr().out
    path.write_text(yaml.safe_dump(spec).replace("classes:", "clases:"))
    assert cli_audit(str(path)) == 2
    assert "unknown field 'clases'" in capsys.readouterr().err
