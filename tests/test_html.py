"""Every report page has one shell (escaped title, the shared style sheet, a footer naming the version) and
escapes the user's strings; images tile into one grid and embed as data URIs by one set of helpers."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import clipscope
from clipscope.hooks import Unit
from clipscope.neurons import Atlas
from clipscope.optvis.render import RenderResult
from clipscope.pages import BLANK, CSS, esc, fit_square, image_grid, image_uri, page, png_uri
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

RED, GREEN, BLUE, YELLOW, CYAN, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), \
    (255, 255, 255)
HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
FOOTER = f"Written by clipscope {clipscope.__version__}."


def solid(colour: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)}


def decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def assert_shared_shell(doc: str) -> None:
    """``doc`` is one whole document with the shared style sheet and footer, and no script."""
    assert doc.startswith("<!doctype html>") and doc.rstrip().endswith("</html>")
    assert doc.count("<body>") == 1 and f"<style>{CSS}</style>" in doc and FOOTER in doc
    assert "<script" not in doc.lower()


# -- the page shell ------------------------------------------------------------------------------
def test_a_page_has_the_shared_shell_and_an_escaped_title_and_heading():
    doc = page('Cats & <dogs> "quoted"', "<p>body</p>")
    assert_shared_shell(doc)
    assert "<title>Cats &amp; &lt;dogs&gt; &quot;quoted&quot;</title>" in doc
    assert "<h1>Cats &amp; &lt;dogs&gt; &quot;quoted&quot;</h1>" in doc
    assert "<p>body</p>" in doc


def test_without_heading_the_body_brings_its_own():
    doc = page("window title", "<h1>Own heading</h1>", heading=False)
    assert doc.count("<h1>") == 1 and "<title>window title</title>" in doc


def test_esc_makes_any_value_safe_in_text_and_in_quoted_attributes():
    assert esc("<a href='x'>&\"") == "&lt;a href=&#x27;x&#x27;&gt;&amp;&quot;"
    assert esc(2.5) == "2.5" and esc(None) == "None"


# -- images -------------------------------------------------------------------------------------
def test_a_grid_tiles_in_reading_order_with_white_gaps():
    colours = [RED, GREEN, BLUE, YELLOW, CYAN]
    grid = image_grid([solid(c) for c in colours], columns=2, tile=10, gap=3)
    assert grid.size == (2 * 10 + 3, 3 * 10 + 2 * 3)
    for i, colour in enumerate(colours):
        assert grid.getpixel(((i % 2) * 13 + 5, (i // 2) * 13 + 5)) == colour
    assert grid.getpixel((11, 5)) == WHITE                       # the gap between the first two tiles
    assert grid.getpixel((13 + 5, 26 + 5)) == WHITE              # the empty slot after the fifth tile


def test_fewer_images_than_columns_make_one_row_as_wide_as_the_images():
    assert image_grid([solid(RED)] * 3, columns=8, tile=4, gap=1).size == (3 * 4 + 2, 4)


def test_no_images_make_one_blank_tile():
    grid = image_grid([], tile=6)
    assert grid.size == (6, 6) and colours(grid) == {BLANK}


@pytest.mark.parametrize(("parameter", "value"), [("columns", 0), ("tile", 0), ("gap", -1), ("columns", 2.5)])
def test_bad_grid_settings_are_refused_naming_the_parameter(parameter, value):
    with pytest.raises(InvalidArgumentError, match=rf"^{parameter}={value} is not valid"):
        image_grid([solid(RED)], **{parameter: value})


def test_fit_square_enlarges_crisply_and_does_not_resample_the_right_size():
    checker = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]], [[255, 255, 255], [0, 0, 0]]], np.uint8))
    big = fit_square(checker, 8)
    assert big.size == (8, 8) and colours(big) == {(0, 0, 0), WHITE}     # no blended greys
    assert big.getpixel((0, 0)) == (0, 0, 0) and big.getpixel((7, 0)) == WHITE
    grey = fit_square(Image.new("L", (5, 5), 100), 5)
    assert grey.mode == "RGB" and colours(grey) == {(100, 100, 100)}
    with pytest.raises(InvalidArgumentError, match=r"^size=0 "):
        fit_square(checker, 0)


def test_image_uris_decode_to_the_image_at_the_asked_size():
    uri = image_uri(solid(RED), size=16)
    assert uri.startswith("data:image/png;base64,")
    back = decode(uri)
    assert back.size == (16, 16) and back.convert("RGB").getpixel((3, 3)) == RED
    assert image_uri(solid(RED), fmt="JPEG").startswith("data:image/jpeg;base64,")
    with pytest.raises(InvalidArgumentError, match=r"^fmt='GIF' .*'PNG', 'JPEG'"):
        image_uri(solid(RED), fmt="GIF")
    assert png_uri(b"\x89PNG") == "data:image/png;base64,iVBORw=="


def test_a_render_results_grid_is_the_shared_grid():
    images = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    result = RenderResult(images, torch.zeros(1, 3), [Unit.channel("visual", i) for i in range(3)], seed=0)
    expected = image_grid(result.pil_images(), columns=2, tile=20, gap=1)
    assert np.array_equal(np.asarray(result.grid(columns=2, tile=20, gap=1)), np.asarray(expected))
    assert f'src="{image_uri(result.grid())}"' in result._repr_html_()


# -- the reports use the shell and escape the user's strings ----------------------------------
def test_atlas_pages_escape_the_title_and_use_the_shared_shell(tiny_rn, tmp_path):
    site = tiny_rn.layers().blocks().names()[-1]
    atlas = Atlas(tiny_rn, make_images(6), words=["cat", "dog"], k=2, progress=False)
    index = atlas.save_html(tmp_path, {site: [0, 1]}, render=False, title=HOSTILE)
    for doc in (index.read_text(), (tmp_path / f"{site}.html").read_text()):
        assert_shared_shell(doc)
        assert f"<h1>{ESCAPED}" in doc
    assert doc.count('class="clipscope-unit-card"') == 2


def test_the_attack_report_escapes_the_data_path_and_uses_the_shared_shell(tiny_rn, tmp_path):
    from clipscope.typographic.run import run_attack_config
    data = tmp_path / "<b>photos"
    for label, seed in (("cat", 0), ("dog", 1)):
        (data / label).mkdir(parents=True)
        for i, image in enumerate(make_images(2, seed=seed, size=32)):
            image.save(data / label / f"{i}.png")
    index = run_attack_config({"data": {"path": str(data)}, "out": str(tmp_path / "report")}, model=tiny_rn,
                              progress=False)
    doc = index.read_text()
    assert_shared_shell(doc)
    assert "<h1>Typographic attack report</h1>" in doc and "&lt;b&gt;photos" in doc and "<b>photos" not in doc


def test_the_audit_report_uses_the_shared_shell_with_the_spec_name_as_title(tiny_vit, tmp_path):
    from clipscope.audit import run_audit
    spec = {"name": HOSTILE, "models": [{"name": "clipscope-tiny-vit"}],
            "data": {"kind": "organism_figures", "n": 12, "seed": 1, "group_columns": ["group"]},
            "taxonomies": [{"name": "roles", "classes": ["doctor", "thief"], "harm": {"crime": ["thief"]}}],
            "bootstrap": {"n": 20, "seed": 0}, "output": str(tmp_path / "audit")}
    run_audit(spec, models=[tiny_vit], cache_dir=tmp_path / "cache", progress=False)
    doc = (tmp_path / "audit" / "report.html").read_text()
    assert_shared_shell(doc)
    assert f"<title>clipscope audit: {ESCAPED}</title>" in doc and doc.count("<h1>") == 1
