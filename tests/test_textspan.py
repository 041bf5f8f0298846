"""TextSpan head labels (Gandelsman, Efros & Steinhardt, ICLR 2024; clipscope.textspan).

Known answers:
- a synthetic head with planted text directions: the greedy basis recovers them in order of their variance,
  and the reported shares equal the variance of the projection onto the picked span computed independently
  (numpy SVD for the head's span, QR for the picked span); a low-rank head's texts count only through the
  part of them inside the head's span;
- the plumbing: each head's total variance equals the one computed from ``decompose`` directly;
- the ViT organism: heads whose direct effect carries an object's colour (found with ``decompose`` on coloured
  object scenes) get colour descriptions, heads that carry the written word (``decompose`` on word scenes) get
  word-like descriptions. Thresholds from measurement, in the comments.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import clipscope
from clipscope.decompose import decompose
from clipscope.organism import COLOUR_TEMPLATES, READING_TEMPLATES
from clipscope.organism.scenes import COLOURS, OBJECT_WORDS, WORDS, generate, object_scene, scene_rng, word_scene
from clipscope.textspan import HeadLabels, default_descriptions, default_texts, greedy_text_basis, textspan
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# The algorithm on a planted problem

def planted_problem(seed: int = 0, d: int = 24, n: int = 400):
    """A head whose centred outputs are 6 a1 t0 + 3 a2 t1 + 1.5 a3 t2 plus noise (t0..t2 unit text
    embeddings, t1 at 60 degrees from t0), around a mean offset; the pool holds them among 40 random
    distractors, a near-copy of t0 and a mixture of t0 and t1."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    t0 = unit(torch.randn(d, generator=g))
    t1 = unit(0.5 * t0 + 0.866 * unit(torch.randn(d, generator=g) - (torch.randn(d, generator=g) @ t0) * t0))
    t2 = unit(torch.randn(d, generator=g))
    distractors = unit(torch.randn(40, d, generator=g))
    copy, mix = unit(t0 + 0.02 * torch.randn(d, generator=g)), unit(t0 + t1)
    pool = torch.cat([torch.stack([t0, t1, t2]), distractors, torch.stack([copy, mix])])
    a = torch.randn(n, 3, generator=g) * torch.tensor([6.0, 3.0, 1.5])
    data = a @ torch.stack([t0, t1, t2]) + 0.05 * torch.randn(n, d, generator=g) + 2 * torch.randn(d, generator=g)
    return data.double(), pool.double()


def projected_share(data: np.ndarray, directions: np.ndarray) -> float:
    """Share of the variance of ``data`` (rows) in the span of ``directions`` (rows), by QR."""
    centred = data - data.mean(0)
    q, _ = np.linalg.qr(directions.T)
    return float(np.square(centred @ q).sum() / np.square(centred).sum())


def test_the_greedy_basis_recovers_planted_text_directions_and_its_shares_add_up():
    """Recovery of the planted directions, and cumulative shares equal to an independent QR projection."""
    data, pool = planted_problem()
    basis = greedy_text_basis(data, pool, 5)
    assert basis.indices[:3] == [0, 1, 2]                      # in order of variance, not the near-copy or the mix
    shares = [projected_share(data.numpy(), pool[basis.indices[:k]].numpy()) for k in range(1, 6)]
    np.testing.assert_allclose(basis.cumulative, shares, rtol=1e-9, atol=1e-12)
    assert np.all(np.diff(basis.cumulative) >= 0) and basis.cumulative[-1] <= 1 + 1e-12
    assert basis.cumulative[2] > 0.998  # all but the noise off the 3 planted directions: 1 - 21 x 0.05^2 / 47.3
    centred = data - data.mean(0)
    assert basis.total_variance == pytest.approx(float(np.trace(np.cov(centred.numpy().T))), rel=1e-12)


def test_a_low_rank_heads_texts_count_only_inside_its_span():
    """Outputs of rank 4 in 24 dimensions (a head of width 4): texts are projected onto the top span_dim right
    singular vectors of the outputs (independent numpy SVD) before picking, and the shares are those of the
    span of the projected picks."""
    g = torch.Generator().manual_seed(1)
    coefficients = torch.randn(300, 4, generator=g) * torch.tensor([5.0, 3, 2, 1]) + torch.randn(4, generator=g)
    data = (coefficients @ torch.randn(4, 24, generator=g)).double()    # a head's mean lies in its span too
    pool = torch.nn.functional.normalize(torch.randn(60, 24, generator=g), dim=1).double()
    for span_dim in (4, 2):
        basis = greedy_text_basis(data, pool, min(3, span_dim), span_dim=span_dim)
        v = np.linalg.svd(data.numpy(), full_matrices=False)[2][:span_dim]
        projected = pool.numpy() @ v.T @ v
        np.testing.assert_allclose(basis.directions, projected[basis.indices], atol=1e-9)
        best = np.argmax(np.var(data.numpy() @ projected.T, axis=0))
        assert basis.indices[0] == best
        shares = [projected_share(data.numpy(), projected[basis.indices[:k]]) for k in range(1, len(basis.indices) + 1)]
        np.testing.assert_allclose(basis.cumulative, shares, rtol=1e-9, atol=1e-12)
    assert basis.cumulative[-1] < 1                             # 2 of 4 dimensions
    full = greedy_text_basis(data, pool, 4, span_dim=4)
    assert full.cumulative[-1] == pytest.approx(1.0, abs=1e-9)  # 4 texts span a rank-4 head


# ---------------------------------------------------------------------------------------
# The entry point on a tiny random ViT: plumbing, result views, bad input

TINY_POOL = ["a red square", "a cat", "text", "a dog", "<b>bold</b>"]


@pytest.fixture(scope="module")
def tiny_labels(tiny_vit):
    images = make_images(6, seed=2) + ["/no/such/image.png"]
    return textspan(tiny_vit, images, layers=[-1], heads=[1, 0], texts=TINY_POOL, basis_size=3, batch_size=4,
                    progress=False), images


def test_textspan_reads_each_heads_variance_from_the_decomposition_and_skips_bad_images(tiny_vit, tiny_labels):
    labels, images = tiny_labels
    last = len(tiny_vit.blocks("visual")) - 1
    assert labels.layers == (last,) and labels.heads == (0, 1) and labels.n_images == 6
    assert len(labels.skipped) == 1 and labels.skipped[0][0] == 6
    heads = decompose(tiny_vit, images[:6], progress=False).heads.sum(3)
    for head in (0, 1):
        own = heads[:, last, head].double()
        assert labels.head_variance[(last, head)] == pytest.approx(float(own.var(0).sum()), rel=1e-4)
        texts = [t for t, _, _ in labels.top(last, head)]
        expected = greedy_text_basis(own, tiny_vit.encode_text(TINY_POOL), 3, span_dim=labels.span_dim)
        assert texts == [TINY_POOL[i] for i in expected.indices]


def test_head_labels_frame_top_plot_and_html(tiny_vit, tiny_labels):
    labels, _ = tiny_labels
    frame = labels.to_frame()
    assert list(frame.columns) == ["layer", "head", "rank", "text", "variance_explained", "cumulative",
                                   "head_variance"]
    assert len(frame) == 6 and frame["rank"].tolist() == [1, 2, 3] * 2
    for _, rows in frame.groupby(["layer", "head"]):
        assert np.allclose(rows["cumulative"], rows["variance_explained"].cumsum())
        assert (rows["cumulative"].diff().dropna() >= 0).all() and rows["cumulative"].max() <= 1 + 1e-9
    layer, head = labels.layers[0], 1
    assert [t for t, _, _ in labels.top(layer, head)] == frame[frame["head"] == head]["text"].tolist()
    assert labels.plot().axes
    assert "<img" in labels._repr_html_()
    # a pool as large as the basis: every text is picked, the markup one included, and shown escaped
    marked = textspan(tiny_vit, make_images(4, seed=3), layers=[-1], heads=[0], texts=["<b>bold</b>", "a cat", "a dog"],
                      basis_size=3, progress=False)
    assert "<b>bold</b>" in marked.to_frame()["text"].tolist()
    html = marked._repr_html_()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold" not in html
    with pytest.raises(InvalidArgumentError, match="layer, head"):
        labels.top(labels.layers[0] + 1, 0)


def test_bad_input_gets_one_clear_error(tiny_vit, tiny_rn):
    images = make_images(3, seed=4)
    texts = ["a red square", "a cat", "text", "a dog", "a blue circle", "letters"]
    bad = [  # (parameter named in the error, call)
        ("model", lambda: textspan(tiny_rn, images, texts=texts)),
        ("model", lambda: textspan("organism-vit", images, texts=texts)),
        ("texts", lambda: textspan(tiny_vit, images, texts="a cat")),
        ("texts", lambda: textspan(tiny_vit, images, texts=["a cat", "a cat"])),
        ("texts", lambda: textspan(tiny_vit, images, texts=["a cat", ""])),
        ("basis_size", lambda: textspan(tiny_vit, images, texts=texts, basis_size=0)),
        ("basis_size", lambda: textspan(tiny_vit, images, texts=texts, basis_size=7)),
        ("basis_size", lambda: textspan(tiny_vit, images, texts=texts, basis_size=3, span_dim=2)),
        ("span_dim", lambda: textspan(tiny_vit, images, texts=texts, span_dim=0)),
        ("layers", lambda: textspan(tiny_vit, images, texts=texts, layers=[99])),
        ("layers", lambda: textspan(tiny_vit, images, texts=texts, layers=[0, -len(tiny_vit.blocks())])),
        ("layers", lambda: textspan(tiny_vit, images, texts=texts, layers=[])),
        ("heads", lambda: textspan(tiny_vit, images, texts=texts, heads=[tiny_vit.head_count()])),
        ("heads", lambda: textspan(tiny_vit, images, texts=texts, heads="0")),
        ("batch_size", lambda: textspan(tiny_vit, images, texts=texts, batch_size=0)),
        ("images", lambda: textspan(tiny_vit, images[:1] + ["/no/such.png"], texts=texts)),
        ("contributions", lambda: greedy_text_basis(np.zeros((1, 4)), np.eye(4), 1)),
        ("contributions", lambda: greedy_text_basis(np.full((3, 4), np.nan), np.eye(4), 1)),
        ("text_embeddings", lambda: greedy_text_basis(np.ones((3, 4)), np.eye(5), 1)),
        ("n_words", lambda: default_texts(-1)),
    ]
    for parameter, call in bad:
        with pytest.raises(InvalidArgumentError) as error:
            call()
        assert error.value.parameter == parameter, (parameter, error.value)


def test_the_default_pool_has_descriptions_then_words_each_once():
    descriptions = default_descriptions()
    pool = default_texts(300)
    assert pool[:len(descriptions)] == descriptions and len(set(pool)) == len(pool) > len(descriptions) + 250
    assert "an orange object" in descriptions and "a orange object" not in descriptions
    assert any("letters" in t for t in descriptions) and "red" in pool


# ---------------------------------------------------------------------------------------
# Known answers on the ViT organism

COLOUR_NAMES = set("red orange yellow green blue purple pink brown black white grey gold silver teal beige turquoise "
                   "maroon navy lime olive".split())
WRITING = re.compile(r"\b(word|words|text|letters|sign|writing|written|caption|label|inscription|handwriting|headline|"
                     r"title|graffiti|logo|numbers|spelled|typed|says)\b")
#: The organism's own ways of describing a written word (its word-scene captions: 'the word "{w}"', 'the text "{w}"',
#: "a sign that says {w}"), added to the default pool for the reading check: its text tower learnt writing only
#: from such captions. Generic descriptions of writing ("text", "letters", "words") rank 300th to 1,700th of the
#: default pool for its reading heads (step-1000 weights of the longer run, 2026-12-02).
ORGANISM_WRITING = [form.format(w) for form in ('the word "{}"', 'the text "{}"', "a sign that says {}") for w in WORDS]


def names_a_colour(text: str) -> bool:
    """A description naming a colour that is not a description of writing ('the word "red"')."""
    return bool(COLOUR_NAMES & set(re.findall(r"[a-z]+", text))) and not WRITING.search(text)


def word_like(text: str) -> bool:
    """A bare word (the organism's captions of written words include the bare word), a description of writing,
    or a description naming one of the organism's object words, which it only ever saw written (no scene draws a
    dog or a house: they exist for it only as rendered words)."""
    return " " not in text or bool(WRITING.search(text)) or bool(set(OBJECT_WORDS) & set(re.findall(r"[a-z]+", text)))


def head_effects(model, scenes, classes, labels, templates) -> np.ndarray:
    """Each head's mean direct effect towards the scene's own class minus the mean towards the other classes,
    ``(layers, heads)``, from ``decompose``."""
    parts = decompose(model, [s.image for s in scenes], classes=list(classes), templates=list(templates),
                      progress=False).heads.sum(3)                          # (n, layers, heads, classes)
    own = parts[torch.arange(len(scenes)), :, :, torch.tensor(labels)]
    return (own - (parts.sum(-1) - own) / (len(classes) - 1)).mean(0).numpy()


@pytest.mark.slow
def test_organism_colour_heads_get_colour_descriptions_and_reading_heads_word_like_ones():
    """Colour heads: mean own-colour direct effect >= 0.4 x the largest, on 48 object scenes; reading heads: mean
    effect towards the written word >= 0.5 x the largest, on 60 word scenes; the others: < 0.2 x the largest.
    TextSpan (5 texts) over 160 mixed scenes (objects, objects with words, words, figures), pool: the default pool
    plus ORGANISM_WRITING.

    Measured (2026-12-02; image sets of 160, 200, 160, 300 scenes, seeds 11-14; the test uses the first) on the
    longer run's weights 9e192d087baa: colour heads (0,2) (0,3) (1,1) (1,2) (2,0) (3,0) all have a colour
    description first, colour share >= 0.42 each, mean gap to the other heads 0.42-0.45; reading heads (2,2) (2,3)
    (3,1) (3,3) all have a word-like text in their top 2 (first: 1-2 of 4), word share >= 0.17 each, mean gap
    0.34-0.44. On the earlier weights 72e32060cff1: colour top 2 in 6/6 heads (5/6 on seed 13), share >= 0.23 on the
    test's set (0.16 on seed 13), gap 0.43-0.46; reading heads (2,3) (3,1) (3,3) word-like first, share >= 0.62,
    gap 0.66-0.69. Thresholds: top 2, share >= 0.2 (colour) / 0.1 (words), mean gap >= 0.2.

    With the default pool alone the reading property does not hold for the longer run's weights: their reading
    heads' first direction separates images with writing from images without, and in the organism's text space
    that direction is nearly tied between many texts; "the colour lime green" wins it for (2,2) and (2,3) (0.32
    of the variance against 0.31 for 'the word "green"'), and only 1-2 of the 4 reading heads get a word-like text
    in their top 2 (word share 0.14-0.26 against 0.03-0.04 for the other heads).
    """
    model = clipscope.load("organism-vit", device="cpu")
    objects = [object_scene(colour=COLOURS[i % 6], rng=scene_rng(7, i, "textspan")) for i in range(48)]
    colour = head_effects(model, objects, COLOURS, [COLOURS.index(s.meta["colour"]) for s in objects],
                          COLOUR_TEMPLATES)
    words = [word_scene(word=WORDS[i % len(WORDS)], rng=scene_rng(8, i, "textspan")) for i in range(60)]
    reading = head_effects(model, words, WORDS, [i % len(WORDS) for i in range(60)], READING_TEMPLATES)
    pool = default_texts() + [t for t in ORGANISM_WRITING if t not in default_texts()]
    labels = textspan(model, [s.image for s in generate(160, seed=11)], texts=pool, basis_size=5, progress=False)
    assert isinstance(labels, HeadLabels) and labels.layers == (0, 1, 2, 3) and labels.span_dim == 32

    def share(key, predicate) -> float:
        return sum(v for t, v in labels.labels[key] if predicate(t))

    for effect, strong_share, predicate, least in ((colour, 0.4, names_a_colour, 0.2), (reading, 0.5, word_like, 0.1)):
        strong = [k for k in labels.labels if effect[k] >= strong_share * effect.max()]
        weak = [k for k in labels.labels if effect[k] < 0.2 * effect.max()]
        assert strong and weak, effect
        for key in strong:
            top = labels.top(*key)
            assert any(predicate(t) for t, _, _ in top[:2]), (key, top)
            assert share(key, predicate) >= least, (key, top)
        assert np.mean([share(k, predicate) for k in strong]) - np.mean([share(k, predicate) for k in weak]) >= 0.2
