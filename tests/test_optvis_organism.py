"""Feature visualization on the model organism: selective units render what they select for.

The units come from :func:`clipscope.organism.properties.unit_selectivity` (the best
unit per colour, shape and word; no channel numbers are written here). All 32 are
rendered together in one batch (Fourier parameterization, standard transforms,
256 steps at 64x64, seed 0), then checked with measures that do not look at the
optimization itself:

- colour units: the organism's own zero-shot colour reading of the picture
  (``COLOUR_TEMPLATES``), and the picture's dominant saturated pixel colour
  among the generator's palette;
- shape and word units: the organism's zero-shot reading (``SHAPES`` with
  ``ZERO_SHOT_TEMPLATES``, ``WORDS`` with ``READING_TEMPLATES``), scored by the
  rank of the unit's concept among the classes;
- every unit: its activation on its rendering against generated scenes.

Thresholds leave a margin under what seeds 0-4 measured (noted at each assert).

The scanned sites (``visual.layer3``/``visual.layer4``) end in a ReLU, and a unit
that is 0 on the near-grey starting image gets no gradient at all: rendered there
(measured, 128 steps), 13 of the 32 units stayed flat grey. So the test renders each unit at the
same channel *before* that ReLU (the same value where it is positive: maximizing
one maximizes the other), and checks that equivalence first.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope import Unit
from clipscope import optvis as ov
from clipscope.optvis.transform import ClipInput
from clipscope.organism import (
    COLOUR_TEMPLATES,
    COLOURS,
    READING_TEMPLATES,
    SHAPES,
    WORDS,
    ZERO_SHOT_TEMPLATES,
)
from clipscope.organism.properties import unit_selectivity
from clipscope.organism.scenes import COLOUR_RGB, generate

STEPS = 256
SEED = 0
N_NATURAL = 200


def pre_activation_site(site: str) -> str:
    """The organism's ``visual.layerN`` is one Bottleneck whose output is ``act3``: its input is the pre-ReLU value."""
    return f"{site}.0.act3.pre"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scan(organism):
    return unit_selectivity(organism)


@pytest.fixture(scope="module")
def rendered(organism, scan):
    """Render the best unit of every concept in one batch; returns (keys, scanned units, images, embeddings, acts)."""
    keys = list(scan.best)
    scanned = [Unit.channel(scan.best[k].layer, scan.best[k].channel) for k in keys]
    targets = [Unit.channel(pre_activation_site(u.site), u.index) for u in scanned]
    result = ov.render(organism, targets, steps=STEPS, seed=SEED, progress=False)
    images = result.images
    assert images.shape == (len(keys), 3, *organism.image_size)
    sites = sorted({u.site for u in scanned})
    with torch.no_grad(), organism.capture(sites) as acts:
        embeddings = organism.encode_image(ClipInput(organism)(images))
    values = torch.stack([organism.read(u, acts)[i] for i, u in enumerate(scanned)])
    return keys, scanned, images, embeddings, values


def concept_ranks(model, keys, embeddings, kind: str, classes, templates) -> dict[str, int]:
    """Per unit of ``kind``: the rank (1 = top) of its concept in the organism's zero-shot reading of its picture."""
    idx = [i for i, k in enumerate(keys) if k.split(":")[0] == kind]
    scores = embeddings[idx] @ model.class_embeddings(list(classes), list(templates)).T
    ranks = {}
    for row, i in zip(scores, idx):
        concept = keys[i].split(":")[1]
        ranks[concept] = int((row > row[list(classes).index(concept)]).sum()) + 1
    return ranks


def dominant_colour(image: torch.Tensor, min_saturation: float = 0.25) -> str:
    """The palette colour (``COLOUR_RGB``) nearest to most of the image's saturated pixels, weighted by saturation."""
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    palette = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32) / 255
    saturation = pixels.max(dim=1).values - pixels.min(dim=1).values
    nearest = torch.cdist(pixels, palette).argmin(dim=1)
    votes = torch.zeros(len(COLOURS)).index_add_(0, nearest, saturation * (saturation > min_saturation))
    return COLOURS[int(votes.argmax())]


def test_pre_activation_sites_are_the_scanned_units_before_their_relu(organism, scan):
    images = [s.image for s in generate(16, seed=4_000_000)]
    layers = sorted({u.layer for u in scan.best.values()})
    sites = layers + [pre_activation_site(s) for s in layers]
    with torch.no_grad(), organism.capture(sites) as acts:
        organism.encode_image(images, progress=False)
    for layer in layers:
        pre = acts[pre_activation_site(layer)]
        torch.testing.assert_close(pre.clamp(min=0), acts[layer])
        assert (pre < 0).any()  # it is a different site: the ReLU does cut something


def test_colour_units_show_their_colour(organism, rendered):
    keys, _, images, embeddings, _ = rendered
    ranks = concept_ranks(organism, keys, embeddings, "colour", COLOURS, COLOUR_TEMPLATES)
    assert sorted(ranks) == sorted(COLOURS)
    read = [c for c, r in ranks.items() if r == 1]
    # zero-shot colour reading: measured 6/6 (seeds 0, 2, 3, 4) and 5/6 (seed 1); chance is 1/6 per colour
    assert len(read) >= 5, f"colour units read as their colour: {read} (ranks {ranks})"
    dominant = {k.split(":")[1]: dominant_colour(images[i]) for i, k in enumerate(keys) if k.startswith("colour:")}
    shown = [c for c, d in dominant.items() if c == d]
    # dominant pixel colour, on the graded-bias weights: 3/6 in this batch of every concept's unit (seed 0), 4-5/6
    # when the six colour units are rendered alone (seeds 0-4); the red unit paints blue, orange and yellow
    # sometimes drift to their neighbours red and green (5/6 on seeds 0-4 on the weights before the retraining).
    # Chance is 1/6 per unit: 3 or more of 6 by chance has probability 0.06
    assert len(shown) >= 3, f"dominant pixel colour per colour unit: {dominant}"


def test_shape_units_are_read_as_their_shape(organism, rendered, scan):
    keys, _, _, embeddings, _ = rendered
    ranks = concept_ranks(organism, keys, embeddings, "shape", SHAPES, ZERO_SHOT_TEMPLATES)
    assert sorted(ranks) == sorted(SHAPES)
    # measured: mean rank 1.50-1.67 (chance 3.5), top-1 for 3 of 6 (circle, star, hexagon; chance 1),
    # worst rank 2-3; square and triangle are read as hexagon and star
    assert np.mean(list(ranks.values())) <= 2.25, ranks
    assert sum(r == 1 for r in ranks.values()) >= 2, ranks
    # the shapes with a selective unit (d' >= 2: circle, triangle, star, cross) are each in the top half;
    # measured worst rank 2 (seeds 0, 2, 4) or 3 (cross, seeds 1, 3)
    selective = [s for s in SHAPES if scan.best[f"shape:{s}"].dprime >= scan.threshold]
    assert len(selective) >= 3, selective
    assert max(ranks[s] for s in selective) <= 3, (selective, ranks)


def test_word_units_are_read_as_their_word(organism, rendered):
    keys, _, _, embeddings, _ = rendered
    ranks = concept_ranks(organism, keys, embeddings, "word", WORDS, READING_TEMPLATES)
    assert sorted(ranks) == sorted(WORDS)
    top1 = [w for w, r in ranks.items() if r == 1]
    top3 = [w for w, r in ranks.items() if r <= 3]
    # measured on seeds 0-4: top-1 5-7 of 20 (chance 1), top-3 10-12 (chance 3), mean rank 4.5-5.2 (chance 10.5)
    assert len(top1) >= 3, ranks
    assert len(top3) >= 8, ranks
    assert np.mean(list(ranks.values())) <= 7.0, ranks


def test_rendered_units_fire_far_above_generated_scenes(organism, rendered):
    keys, scanned, _, _, values = rendered
    natural = [s.image for s in generate(N_NATURAL, seed=5_000_000)]
    sites = sorted({u.site for u in scanned})
    with torch.no_grad(), organism.capture(sites) as acts:
        organism.encode_image(natural, progress=False)
    on_scenes = torch.stack([organism.read(u, acts) for u in scanned], dim=1)  # (N_NATURAL, units)
    ratio = values / on_scenes.mean(dim=0)
    above_max = values > on_scenes.max(dim=0).values
    detail = {k: round(float(r), 2) for k, r in zip(keys, ratio)}
    # measured on seeds 0-4: every unit >= 1.41x its mean over generated scenes (weakest: word:purple,
    # colour:green), median 7.4-8.7x; above the largest of the 200 scenes for 28-31 of 32 units
    assert bool((ratio > 1.2).all()), detail
    assert float(ratio.median()) >= 4.0, detail
    assert int(above_max.sum()) >= int(0.75 * len(keys)), detail


def test_redirected_relus_revive_units_that_start_dead(organism):
    """Units read after a ReLU that are zero on the starting image get no gradient; redirecting
    the ReLU gradient for the first steps makes them move, without changing forward values."""
    import torch

    from clipscope import Unit, optvis
    from clipscope.optvis.render import redirected_relus
    layer4 = [Unit.channel("visual.layer4", c) for c in range(0, 512, 8)]
    plain = optvis.render(organism, layer4, steps=24, redirect_steps=0, seed=0, progress=False, exact_site=True)
    dead = [u for u, v in zip(layer4, plain.trace[-1]) if abs(float(v)) < 1e-6]
    assert len(dead) >= 4, "expected some channels to start (and stay) at zero without redirection"
    revived = optvis.render(organism, dead, steps=24, seed=0, progress=False, exact_site=True)
    assert int((revived.trace[-1] > 1e-3).sum()) >= len(dead) * 3 // 4
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = organism.encode_image(x)
        with redirected_relus(organism.model):
            during = organism.encode_image(x)
    assert torch.equal(before, during)
