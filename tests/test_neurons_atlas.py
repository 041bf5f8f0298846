"""The neuron atlas (four views per unit, HTML export) and the explorer widget built on it."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from clipscope.neurons import Atlas, dataset_examples, label_units, word_responses
from clipscope.organism import COLOURS, SHAPES, WORDS, scenes

from .conftest import make_images

SITE = "visual.layer4"
STEPS = 24
CONCEPTS = list(COLOURS) + list(SHAPES) + list(WORDS)   # overlaps (e.g. 'red' is also a word) are dropped


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return [s.image for s in scenes.generate(240, seed=7_000_000)]


@pytest.fixture(scope="module")
def best(organism):
    from clipscope.organism.properties import unit_selectivity
    return unit_selectivity(organism, n_objects=240, n_words=120).best


@pytest.fixture(scope="module")
def colour_units(best):
    return {c: best[f"colour:{c}"].channel for c in COLOURS if best[f"colour:{c}"].layer == SITE}


@pytest.fixture(scope="module")
def atlas(organism, images):
    return Atlas(organism, images, words=list(WORDS), concepts=CONCEPTS, k=6, steps=STEPS, progress=False)


def decode(data_uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])))


def test_a_view_gathers_what_the_separate_functions_compute(organism, images, atlas, colour_units):
    unit = next(iter(colour_units.values()))
    view = atlas.view(SITE, unit)
    ex = dataset_examples(organism, images, SITE, k=6, units=[unit], progress=False)
    assert [e.key for e in view.examples] == [e.key for e in ex.top(SITE, unit)]
    assert len(view.example_images) == 6 and view.example_images[0].size == tuple(organism.image_size)[::-1]
    wr = word_responses(organism, SITE, list(WORDS), n_variants=atlas.n_variants, progress=False)
    assert view.words == wr.top(SITE, unit, atlas.n_words)
    lab = label_units(organism, SITE, images, list(dict.fromkeys(CONCEPTS)), templates=atlas.label_templates,
                      progress=False)
    assert [c for c, _ in view.labels] == [c for c, _ in lab.top(unit, atlas.n_labels)]
    assert view.visualization is None  # not rendered until asked
    # the site's views are computed once and timed
    assert {what for (site, what) in atlas.timings if site == SITE} >= {"dataset examples", "rendered words", "labels"}


def test_colour_units_are_labelled_with_their_colour(atlas, colour_units):
    # measured on the graded-bias weights (2026-12-02): all 6 colour units found at layer4 have their colour
    # among their first two labels, 4 of 6 first; the red and the yellow unit are labelled 'apple' first
    # (the text tower's association of apples with red and yellow), their colour second
    labels = {c: [name for name, _ in atlas.view(SITE, u).labels[:2]] for c, u in colour_units.items()}
    assert len(colour_units) >= 3
    assert all(c in labels[c] for c in colour_units), labels
    assert sum(labels[c][0] == c for c in colour_units) >= len(colour_units) / 2, labels


def test_peak_cell_is_outlined_on_conv_examples(atlas, colour_units):
    view = atlas.view(SITE, next(iter(colour_units.values())))
    marked = view.example_images[0]
    green = int((np.asarray(marked) == (0, 255, 0)).all(axis=-1).sum())
    assert green > 0 and view.examples[0].position is not None


def test_visualize_renders_only_what_is_missing_in_one_batch(organism, images, monkeypatch):
    from clipscope import optvis
    atlas = Atlas(organism, images[:40], words=list(WORDS)[:6], steps=3, progress=False)
    calls = []
    original = optvis.render

    def counting(model, units, **kw):
        calls.append([u.index for u in units])
        return original(model, units, **kw)
    monkeypatch.setattr(optvis, "render", counting)
    steps = []
    first = atlas.visualize(SITE, [5, 9], callback=lambda step, values: steps.append((step, tuple(values.shape))))
    again = atlas.visualize(SITE, [9, 5, 11])
    assert calls == [[5, 9], [11]]
    assert steps == [(0, (2,)), (1, (2,)), (2, (2,))]
    assert again[1] is first[0] and atlas.visualization(SITE, 11) is again[2]
    assert atlas.visualization(SITE, 12) is None
    with pytest.raises(ValueError, match="out of range"):
        atlas.visualize(SITE, [organism.site(SITE).n_units])


def test_save_html_writes_a_page_per_layer_with_every_units_views(atlas, colour_units, tmp_path):
    units = sorted(colour_units.values())[:3]
    index = atlas.save_html(tmp_path / "atlas", {SITE: units, "visual.layer3": [0, 1]})
    assert index == tmp_path / "atlas" / "index.html"
    text = index.read_text()
    assert 'href="visual.layer4.html"' in text and 'href="visual.layer3.html"' in text
    page = (tmp_path / "atlas" / "visual.layer4.html").read_text()
    cards = page.split('class="clipscope-unit-card"')[1:]
    assert len(cards) == len(units)
    for unit, card in zip(units, cards):
        assert f"unit {unit} · label: <b>{atlas.view(SITE, unit).label}</b>" in card
        pictures = re.findall(r'src="(data:image/[a-z]+;base64,[^"]+)"', card)
        assert len(pictures) == 1 + atlas.k                          # visualization + examples
        assert decode(pictures[0]).size == (128, 128)
        for word, _ in atlas.view(SITE, unit).words[:3]:
            assert f">{word}</span>" in card
    assert not list((tmp_path / "atlas").glob(".*.tmp"))             # written atomically, nothing left over


def test_save_html_without_rendering_marks_missing_visualizations(organism, images, tmp_path):
    atlas = Atlas(organism, images[:30], words=list(WORDS)[:5], progress=False)
    atlas.save_html(tmp_path, {SITE: [3]}, render=False)
    assert "not rendered" in (tmp_path / "visual.layer4.html").read_text()
    with pytest.raises(ValueError, match="no units"):
        atlas.save_html(tmp_path, {SITE: []})


def test_atlas_on_a_vit_marks_the_peak_token(tiny_vit):
    site = "visual.transformer.resblocks.1"
    atlas = Atlas(tiny_vit, make_images(12), words=["apple", "house", "river"], steps=2, k=3, progress=False)
    view = atlas.view(site, 4)
    assert isinstance(view.examples[0].position, int)
    assert len(view.example_images) == 3 and len(view.words) == 3
    assert len(atlas.visualize(site, [4])) == 1


def test_bad_sites_and_units_are_refused_with_the_valid_range(atlas):
    with pytest.raises(ValueError, match="text tower"):
        atlas.view("text.transformer.resblocks.0", 0)
    with pytest.raises(ValueError, match=r"valid: 0\.\.511"):
        atlas.view(SITE, 512)
    with pytest.raises(ValueError, match="Did you mean"):
        atlas.view("visual.layer9", 0)


# -- the explorer widget ------------------------------------------------------------------------
def test_explorer_shows_the_four_views_and_follows_the_unit(atlas, colour_units):
    from clipscope.widgets import NeuronExplorer
    a, b = sorted(colour_units.values())[:2]
    ex = NeuronExplorer(atlas, sites=["visual.layer3", SITE], unit=a)
    assert "clipscope-explorer" in ex._dom_classes
    assert ex.layer.value == SITE and ex.unit.max == 511
    assert f"unit {a} · <i>{atlas.view(SITE, a).label}</i>" in ex.panel_a.title.value
    before = ex.panel_a.examples.value
    assert Image.open(io.BytesIO(before)).size[0] > 64                    # a strip of example images
    assert atlas.view(SITE, a).words[0][0] in ex.panel_a.words.value
    ex.unit.value = b                                                     # as if typed in the box
    assert f"unit {b} ·" in ex.panel_a.title.value and ex.panel_a.examples.value != before
    assert ex.panel_b.layout.display == "none"
    ex.select(a, compare=b)
    assert ex.panel_b.layout.display is None and f"unit {b} ·" in ex.panel_b.title.value
    assert ex.shown == [a, b]


def test_explorer_renders_the_shown_units_with_progress(organism, images):
    from clipscope.widgets import NeuronExplorer
    atlas = Atlas(organism, images[:40], words=list(WORDS)[:6], steps=4, progress=False)
    ex = NeuronExplorer(atlas, unit=2, compare=7)
    blank = ex.panel_a.visualization.value
    assert "not rendered" in ex.panel_a.vis_note.value
    seen = []
    ex.progress.observe(lambda change: seen.append(change["new"]), names="value")
    ex.render_button.click()
    assert seen[-4:] == [1, 2, 3, 4]
    assert atlas.visualization(SITE, 2) is not None and atlas.visualization(SITE, 7) is not None
    assert ex.panel_a.visualization.value != blank and ex.panel_a.vis_note.value == ""
    assert ex.progress.layout.visibility == "hidden" and not ex.render_button.disabled


def test_explorer_layer_change_adjusts_the_unit_range(organism, images):
    from clipscope.widgets import NeuronExplorer
    atlas = Atlas(organism, images[:30], words=list(WORDS)[:4], progress=False)
    ex = NeuronExplorer(atlas, unit=3)
    ex.layer.value = "visual.layer1"
    n = organism.site("visual.layer1").n_units
    assert ex.unit.max == n - 1 and "visual.layer1 · unit 3" in ex.panel_a.title.value
    with pytest.raises(ValueError, match="not among"):
        NeuronExplorer(atlas, sites=["visual.layer1"], site=SITE)
    inner = NeuronExplorer(atlas, site="visual.layer4.0.conv3")   # any site: added to the default layers
    assert inner.layer.options[-1] == "visual.layer4.0.conv3" and "visual.layer4" in inner.layer.options
