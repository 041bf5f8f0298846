"""TextSpan: label a ViT's attention heads with the texts that span their direct effect.

Method: Gandelsman, Efros & Steinhardt, "Interpreting CLIP's Image Representation via Text-Based
Decomposition" (ICLR 2024), section 4 and Algorithm 1 (TextSpan). For each head ``(l, h)`` the image
set gives a matrix ``C`` ``(n, d)``: each image's direct contribution of the head to the image embedding
(:func:`clipscope.decompose.decompose`, in embedding units, summed over source tokens). The text pool
gives ``R`` ``(M, d)``, the unit text embeddings of ``M`` descriptions. Then:

1. ``R`` is projected onto the span of the head's outputs: the top ``span_dim`` right singular vectors
   of ``C`` (uncentred; the paper uses the rank of the head's value-output map, its head width), so a
   text only counts through the part of it the head can write;
2. ``C`` is centred over the images;
3. ``basis_size`` times: pick the text ``j`` whose projection ``C r_j`` has the largest variance over the
   images, then remove the picked direction ``r_j`` from ``C`` and from every remaining text embedding
   (``x <- x - (x . r_j) r_j / |r_j|^2``).

The picked (projected, then deflated) directions are orthogonal, so the variance each step removes is the
variance of ``C`` along its direction, and the shares add up: step ``i``'s ``variance_explained`` is that
variance as a fraction of the head's total variance ``trace(cov(C))``, and ``cumulative`` is the fraction
of the total variance that lies in the span of the first ``i`` picked texts (projected as in step 1). As in
the paper (and its code), step 3 scores the projected texts without normalizing them, so a text counts by
how much of it lies in the head's span: a later pick can explain more variance than an earlier one.

Entry point: :func:`textspan`, returning :class:`HeadLabels`; :func:`greedy_text_basis` is the algorithm on
plain matrices and :func:`default_texts` the default text pool (:func:`default_descriptions`, a generated
description pool, plus :func:`clipscope.neurons.default_words`).
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import ImageLoadError, batched, iter_images, source_length
from .decompose import decompose
from .io import figure_png
from .model import ClipModel
from .pages import esc, png_uri
from .progress import manual_bar, progress_bar
from .validate import InvalidArgumentError, check_int, check_names

__all__ = ["HeadLabels", "TextBasis", "default_descriptions", "default_texts", "greedy_text_basis", "textspan"]

#: Layers analysed by default: the last ones, whose heads carry most of the direct effect (the paper
#: applies TextSpan to the last 4 layers of ViT-B/L/H).
DEFAULT_LAST_LAYERS = 4
#: Words of :func:`clipscope.neurons.default_words` in the default pool (the paper's pool has 3,498
#: descriptions; the descriptions of :func:`default_descriptions` come first).
DEFAULT_WORD_COUNT = 2000
#: Relative size below which a singular value of a head's outputs (relative to the largest), or a deflated
#: text direction (relative to the longest projected text), counts as zero: above the float32 rounding of
#: :func:`~clipscope.decompose.decompose`'s parts (about 1e-7), far below any direction that carries variance.
RELATIVE_TOLERANCE = 1e-6

# -- the generated description pool -------------------------------------------------------------
_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
            "gold", "silver", "teal", "beige", "turquoise", "maroon", "navy blue", "lime green", "olive green")
_SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "rectangle", "oval", "heart", "diamond",
           "spiral", "arrow", "line", "ring", "crescent")
_TEXTURES = ("striped", "dotted", "checkered", "furry", "wooden", "metallic", "glossy", "rough", "smooth", "woven",
             "grainy", "blurry", "noisy", "shiny", "wrinkled", "scaly", "marbled", "rusty", "plain", "patterned")
_OBJECTS = ("dog", "cat", "car", "tree", "house", "apple", "pizza", "bird", "flower", "chair", "phone", "bicycle",
            "boat", "airplane", "horse", "fish", "cup", "book", "clock", "shoe", "guitar", "lamp", "bottle", "ball",
            "bag", "hat", "cake", "banana", "computer", "train")
_PLACES = ("beach", "forest", "city street", "kitchen", "mountain", "desert", "office", "park", "bedroom", "river",
           "farm", "stadium", "classroom", "snowy field", "underwater scene", "night sky", "garden", "highway",
           "supermarket", "museum")
_PEOPLE = ("a person", "a child", "an adult", "a crowd of people", "a man", "a woman", "a face", "a group of friends",
           "a doctor", "a teacher", "a farmer", "a person carrying a bag", "a small figure", "a tall figure",
           "a person standing", "hands")
_WRITING = ("text", "words", "letters", "a word", "written text", "the written word", "handwriting", "printed text",
            "a sign with text", "a label with writing", "a page of text", "a caption", "a logo",
            "a poster with writing",
            "bold black letters", "white letters", "capital letters", "a typed word", "a street sign", "a name tag",
            "numbers", "a license plate", "graffiti", "a headline", "a book cover with a title", "a word on a card",
            "text written over a picture", "a word written on an object", "a spelled word", "an inscription")
_STYLES = ("a photo", "a drawing", "a painting", "a cartoon", "a sketch", "a close-up photo", "a blurry photo",
           "a black and white photo", "a pixelated image", "a low resolution image", "a diagram", "an icon",
           "clip art", "a pattern", "an abstract image", "a dark photo", "a bright photo", "a noisy image")
_COUNTS = ("one object", "two objects", "three objects", "many objects", "a single object in the middle",
           "an object in the corner", "a large object", "a small object", "an empty background", "a plain background",
           "a striped background", "a noisy background", "a cluttered scene", "a symmetric image")


def default_descriptions() -> list[str]:
    """The generated description pool: short image descriptions over colours, shapes, textures, objects,
    places, people, writing ("text", "letters", "a sign with text", ...), image styles and layouts, in that
    order; 368 unique strings (no randomness, no download). Each description names one property (no
    "a red circle"), so the texts picked for a head say which property it carries."""
    out = [f"a {c} object" for c in _COLOURS] + [f"the colour {c}" for c in _COLOURS]
    out += [f"a {c} background" for c in _COLOURS]
    out += [f"a {s}" for s in _SHAPES] + [f"a {s} shape" for s in _SHAPES]
    out += [f"a {t} texture" for t in _TEXTURES] + [f"a {t} surface" for t in _TEXTURES]
    out += [f"a photo of a {o}" for o in _OBJECTS] + [f"a drawing of a {o}" for o in _OBJECTS]
    out += [f"a photo taken at a {p}" for p in _PLACES] + [f"an image of a {p}" for p in _PLACES]
    out += [f"a photo of {p}" for p in _PEOPLE]
    out += list(_WRITING) + [f"the word {o}" for o in _OBJECTS] + [f'a sign that says "{o}"' for o in _OBJECTS]
    out += list(_STYLES) + list(_COUNTS)
    return list(dict.fromkeys(_with_articles(t) for t in out))


def _with_articles(text: str) -> str:
    """``text`` with "a" before a vowel written "an" ("an orange object")."""
    words = text.split(" ")
    return " ".join("an" if w == "a" and i + 1 < len(words) and words[i + 1][:1] in "aeiou" else w
                    for i, w in enumerate(words))


def default_texts(n_words: int = DEFAULT_WORD_COUNT) -> list[str]:
    """The default text pool of :func:`textspan`: :func:`default_descriptions`, then the first ``n_words``
    words of :func:`clipscope.neurons.default_words` not already in it; unique strings."""
    from .neurons import default_words
    n_words = check_int("n_words", n_words, low=0)
    return list(dict.fromkeys(default_descriptions() + (default_words(n_words) if n_words else [])))


# -- the algorithm on matrices ------------------------------------------------------------------
@dataclass
class TextBasis:
    """TextSpan's result for one head: ``indices`` of the picked texts in the pool, in picking order;
    ``explained``, the fraction of the head's total variance each pick removed; ``total_variance``,
    ``trace(cov(C))`` in squared embedding units; ``directions`` ``(k, d)``, the picked text embeddings
    as they were picked (projected on the head's span; before deflation)."""

    indices: list[int]
    explained: np.ndarray
    total_variance: float
    directions: np.ndarray

    @property
    def cumulative(self) -> np.ndarray:
        """Running sum of :attr:`explained`: the share of the variance in the span of the first picks."""
        return np.cumsum(self.explained)


def greedy_text_basis(contributions: Any, text_embeddings: Any, basis_size: int, *,
                      span_dim: int | None = None) -> TextBasis:
    """TextSpan (Gandelsman et al., ICLR 2024, Algorithm 1) on one head; returns a :class:`TextBasis`.

    ``contributions``: ``(n, d)``, the head's direct contribution to each of ``n >= 2`` image embeddings;
    ``text_embeddings``: ``(M, d)`` text embeddings (the pool); ``basis_size`` texts are picked. The texts
    are first projected onto the top ``span_dim`` right singular vectors of the uncentred contributions
    (default: all directions with a non-zero singular value), then the algorithm of the module docstring
    runs in float64. Picking stops early, with fewer than ``basis_size`` texts, once every remaining text
    is (numerically) in the span of the picked ones. Raises
    :class:`~clipscope.validate.InvalidArgumentError` for bad shapes, non-finite values or sizes.
    """
    data = _matrix("contributions", contributions, min_rows=2)
    texts = _matrix("text_embeddings", text_embeddings, min_rows=1)
    if texts.shape[1] != data.shape[1]:
        raise InvalidArgumentError("text_embeddings", f"<shape {tuple(texts.shape)}>",
                                   f"an (M, {data.shape[1]}) matrix: as wide as the contributions")
    basis_size = check_int("basis_size", basis_size, low=1, high=len(texts))
    span_dim = data.shape[1] if span_dim is None else check_int("span_dim", span_dim, low=1, high=data.shape[1])
    gram_values, gram_vectors = torch.linalg.eigh(data.T @ data)       # right singular vectors of data, ascending
    keep = gram_values > gram_values[-1].clamp_min(0) * RELATIVE_TOLERANCE ** 2
    span = gram_vectors[:, keep].flip(1)[:, :span_dim]                  # (d, r), strongest first
    coords = texts @ span                                               # texts projected, in span coordinates
    centred = data - data.mean(dim=0, keepdim=True)
    total = float(centred.square().sum()) / (len(data) - 1)
    cov = span.T @ (centred.T @ centred) @ span / (len(data) - 1)        # (r, r): the part of cov(C) in the span
    norms0 = coords.norm(dim=1)
    floor = float(norms0.max()) * RELATIVE_TOLERANCE
    indices, explained, directions = [], [], []
    for _ in range(min(basis_size, span.shape[1])):
        norms = coords.norm(dim=1)
        variances = ((coords @ cov) * coords).sum(dim=1)                # Var(C r_j) for every candidate
        variances[norms <= floor] = -1.0                                # texts already in the picked span
        if indices:
            variances[indices] = -1.0
        best = int(variances.argmax())
        if variances[best] < 0:
            break
        unit = coords[best] / norms[best]
        indices.append(best)
        explained.append(float(unit @ cov @ unit) / total if total > 0 else 0.0)
        directions.append((span @ (texts[best] @ span)).numpy())
        cov = cov - torch.outer(cov @ unit, unit) - torch.outer(unit, unit @ cov) \
            + torch.outer(unit, unit) * float(unit @ cov @ unit)       # (I - uu') cov (I - uu')
        coords = coords - torch.outer(coords @ unit, unit)
    return TextBasis(indices, np.asarray(explained), total,
                     np.stack(directions) if directions else np.zeros((0, data.shape[1])))


def _matrix(parameter: str, value: Any, *, min_rows: int) -> torch.Tensor:
    """``value`` as a finite float64 CPU matrix with at least ``min_rows`` rows, or an error naming it."""
    try:
        matrix = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                            dtype=np.float64))
    except (TypeError, ValueError):
        raise InvalidArgumentError(parameter, value, "a 2-D matrix of finite numbers") from None
    if matrix.ndim != 2 or matrix.shape[0] < min_rows or matrix.shape[1] < 1 or not torch.isfinite(matrix).all():
        raise InvalidArgumentError(parameter, f"<shape {tuple(matrix.shape)}>",
                                   f"a 2-D matrix of finite numbers with at least {min_rows} row(s)")
    return matrix


# -- the result ---------------------------------------------------------------------------------
@dataclass
class HeadLabels:
    """TextSpan labels of attention heads; one entry per analysed ``(layer, head)``.

    - ``labels[(layer, head)]``: the picked texts, best first, as ``(text, variance_explained)`` pairs
      (each a fraction of the head's total variance; their running sum is the ``cumulative`` share);
    - ``head_variance[(layer, head)]``: the head's total variance over the images, ``trace(cov(C))``, in
      squared embedding units (``C`` the head's contributions to the embedding before L2 normalization):
      which heads vary most, i.e. whose labels matter most for the embedding;
    - ``layers``, ``heads``: the analysed block and head indices; ``layer_names`` the image tower's blocks;
    - ``pool_size``: texts in the pool; ``span_dim``: the dimension texts were projected onto;
      ``n_images``: images read; ``skipped``: ``(key, reason)`` of unreadable images.
    """

    labels: dict[tuple[int, int], list[tuple[str, float]]]
    head_variance: dict[tuple[int, int], float]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    layer_names: tuple[str, ...]
    pool_size: int
    span_dim: int
    n_images: int
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    def top(self, layer: int, head: int) -> list[tuple[str, float, float]]:
        """Head ``(layer, head)``'s picked texts, best first: ``(text, variance_explained, cumulative)``."""
        labels = self.labels[self._key(layer, head)]
        shares = np.cumsum([v for _, v in labels])
        return [(text, share, float(total)) for (text, share), total in zip(labels, shares)]

    def to_frame(self):
        """One row per head and picked text: ``layer``, ``head``, ``rank`` (1 = picked first), ``text``,
        ``variance_explained`` and ``cumulative`` (fractions of the head's total variance) and
        ``head_variance`` (squared embedding units)."""
        import pandas as pd
        rows = [{"layer": layer, "head": head, "rank": rank, "text": text, "variance_explained": share,
                 "cumulative": total, "head_variance": self.head_variance[(layer, head)]}
                for (layer, head) in self.labels for rank, (text, share, total) in enumerate(self.top(layer, head), 1)]
        columns = ["layer", "head", "rank", "text", "variance_explained", "cumulative", "head_variance"]
        return pd.DataFrame(rows, columns=columns)

    def plot(self, top: int = 2, ax=None):
        """A layers x heads grid coloured by each head's total variance over the images (which heads move the
        embedding most), each cell annotated with the head's first ``top`` texts, the share of its variance they
        span and the share all its picked texts span; returns the figure."""
        import matplotlib.pyplot as plt
        top = check_int("top", top, low=1)
        grid = np.array([[self.head_variance[(l, h)] for h in self.heads] for l in self.layers])
        width, height = 1.9 * len(self.heads) + 1.6, (0.28 * top + 0.5) * len(self.layers) + 1.2
        fig, ax = plt.subplots(figsize=(width, height)) if ax is None else (ax.figure, ax)
        shown = ax.imshow(grid, cmap="Blues", vmin=0, vmax=float(grid.max()) or 1.0, aspect="auto")
        for i, layer in enumerate(self.layers):
            for j, head in enumerate(self.heads):
                picked = self.top(layer, head)
                lines = [textwrap.shorten(t, 24, placeholder="...") for t, _, _ in picked[:top]]
                if picked:
                    lines.append(f"{picked[min(top, len(picked)) - 1][2]:.0%} (all {len(picked)}: {picked[-1][2]:.0%})")
                ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=6.5,
                        color="white" if grid[i, j] > 0.6 * grid.max() else "black")
        ax.set_xticks(range(len(self.heads)), [str(h) for h in self.heads])
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"TextSpan: each head's first {top} text(s) and the share of its variance they span", fontsize=9)
        fig.colorbar(shown, ax=ax, label="head variance over the images\n(squared embedding units)")
        return fig

    def _basis_size(self) -> int:
        return max((len(v) for v in self.labels.values()), default=0)

    def _key(self, layer: int, head: int) -> tuple[int, int]:
        key = (layer, head)
        if key not in self.labels:
            raise InvalidArgumentError("layer, head", key, f"an analysed head: layer in {list(self.layers)}, "
                                                           f"head in {list(self.heads)}")
        return key

    def _repr_html_(self) -> str:
        text = (f"<p>TextSpan head labels: {len(self.layers)} layer(s) x {len(self.heads)} head(s), "
                f"{self._basis_size()} texts per head from a pool of {self.pool_size}, over {self.n_images} "
                f"image(s)" + (f" ({len(self.skipped)} unreadable skipped)" if self.skipped else "") + ".</p>")
        rows = "".join(
            f"<tr><td>{layer}</td><td>{head}</td><td>{self.head_variance[(layer, head)]:.3g}</td><td>"
            + esc("; ".join(f"{t} ({s:.0%})" for t, s, _ in self.top(layer, head)))
            + f"</td><td>{(self.top(layer, head) or [('', 0.0, 0.0)])[-1][2]:.0%}</td></tr>"
            for layer, head in self.labels)
        table = ("<table><tr><th>layer</th><th>head</th><th>head variance</th><th>texts (variance explained)</th>"
                 f"<th>cumulative</th></tr>{rows}</table>")
        return text + f'<img src="{png_uri(figure_png(self.plot(), dpi=80))}"/>' + table


# -- the entry point ----------------------------------------------------------------------------
def textspan(model: ClipModel, images: Any, *, layers: int | Sequence[int] | None = None,
             heads: Sequence[int] | None = None, texts: Sequence[str] | None = None, basis_size: int = 5,
             span_dim: int | None = None, batch_size: int = 8, progress: bool | None = None) -> HeadLabels:
    """Label attention heads of a ViT image tower by TextSpan (Gandelsman et al., ICLR 2024); returns
    :class:`HeadLabels`.

    ``images``: anything :func:`clipscope.decompose.decompose` reads (a preprocessed tensor, PIL images,
    paths, a folder, a ``datasets`` table); unreadable images are skipped and listed in ``skipped``; at
    least two must be readable. Each head's direct contribution to each image embedding (before L2
    normalization, summed over source tokens) comes from :func:`~clipscope.decompose.decompose`, ``batch_size``
    images at a time. ``layers``: block indices of the image tower (negative ones count from the end; default
    the last :data:`DEFAULT_LAST_LAYERS`); ``heads``: head indices analysed in each layer (default all).
    ``texts``: the pool of descriptions (unique, non-empty strings; default :func:`default_texts`), embedded
    as written with ``model.encode_text``. ``basis_size``: texts picked per head. ``span_dim``: the head-output
    dimensions texts are projected onto (default the head width, the rank of a head's output map, as in
    the paper's code). Progress bars over image batches and heads (``progress``). Memory: one batch's full
    decomposition (``batch_size`` x 58 MB for ViT-B/16, see ``decompose``), then ``n`` x analysed heads x
    ``embed_dim`` floats for the kept contributions (about 100 KB per image for 48 heads of ViT-B/16).

    Raises :class:`~clipscope.validate.InvalidArgumentError` for a model that ``decompose`` cannot split
    (not a ViT), bad layers, heads, texts or sizes, and fewer than two readable images.
    """
    if not isinstance(model, ClipModel):
        raise InvalidArgumentError("model", model, "a ClipModel (clipscope.load(...))")
    blocks, count = model.blocks("visual"), model.head_count("visual")
    if model.readout is None or not count or not blocks:
        raise InvalidArgumentError("model", model.name, "a model with a transformer (ViT) image tower: TextSpan "
                                   "labels its attention heads, and this model's image tower has none")
    layer_list = _layers(layers, len(blocks))
    head_list = _heads(heads, count)
    pool = default_texts() if texts is None else check_names("texts", texts)
    basis_size = check_int("basis_size", basis_size, low=1, high=len(pool))
    width = int(model.output_projection(model.attention_sites("visual")[0])[0].shape[1])
    span_dim = width if span_dim is None else check_int("span_dim", span_dim, low=1, high=model.embed_dim)
    if basis_size > span_dim:
        raise InvalidArgumentError("basis_size", basis_size, f"at most span_dim={span_dim}: the picked texts are "
                                   "orthogonal directions in a span_dim-dimensional span")
    batch_size = check_int("batch_size", batch_size, low=1)

    contributions, skipped = _head_contributions(model, images, layer_list, head_list, batch_size, progress)
    if len(contributions) < 2:
        raise InvalidArgumentError("images", images, f"at least two readable images ({len(contributions)} read, "
                                   f"{len(skipped)} unreadable)")
    with torch.no_grad():
        embedded = model.encode_text(pool, progress=progress)
    labels, variance = {}, {}
    pairs = [(i, j) for i in range(len(layer_list)) for j in range(len(head_list))]
    for i, j in progress_bar(pairs, progress, len(pairs) > 1, "textspan heads"):
        basis = greedy_text_basis(contributions[:, i, j], embedded, basis_size, span_dim=span_dim)
        key = (layer_list[i], head_list[j])
        labels[key] = [(pool[k], float(v)) for k, v in zip(basis.indices, basis.explained)]
        variance[key] = basis.total_variance
    return HeadLabels(labels, variance, tuple(layer_list), tuple(head_list), tuple(blocks), len(pool), span_dim,
                      len(contributions), skipped)


def _layers(layers: Any, n_blocks: int) -> list[int]:
    """Validated, sorted, unique block indices (negative ones counted from the end)."""
    if layers is None:
        return list(range(max(0, n_blocks - DEFAULT_LAST_LAYERS), n_blocks))
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    valid = f"a block index or a list of them, in {-n_blocks}..{n_blocks - 1} (negative: from the end)"
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise InvalidArgumentError("layers", layers, valid)
    try:
        out = [check_int("layers", v, low=-n_blocks, high=n_blocks - 1) % n_blocks for v in items]
    except InvalidArgumentError:
        raise InvalidArgumentError("layers", layers, valid) from None
    if len(set(out)) != len(out):
        raise InvalidArgumentError("layers", layers, valid + ", each block once")
    return sorted(out)


def _heads(heads: Any, count: int) -> list[int]:
    """Validated, sorted, unique head indices."""
    if heads is None:
        return list(range(count))
    valid = f"a list of head indices in 0..{count - 1}, each once"
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads:
        raise InvalidArgumentError("heads", heads, valid)
    try:
        out = [check_int("heads", v, low=0, high=count - 1) for v in heads]
    except InvalidArgumentError:
        raise InvalidArgumentError("heads", heads, valid) from None
    if len(set(out)) != len(out):
        raise InvalidArgumentError("heads", heads, valid)
    return sorted(out)


def _head_contributions(model: ClipModel, images: Any, layers: list[int], heads: list[int], batch_size: int,
                        progress: bool | None) -> tuple[torch.Tensor, list[tuple[Any, str]]]:
    """``(n, layers, heads, embed_dim)`` float32 direct contributions of the selected heads (summed over
    source tokens, embedding units) for every readable image, and the ``(key, reason)`` of unreadable ones."""
    skipped, chunks = [], []
    total = source_length(images)
    with manual_bar(progress, total is None or total > batch_size, "textspan images", total) as bar:
        for batch in batched(iter_images(images), batch_size):
            tensors = []
            for key, item in batch:
                if isinstance(item, ImageLoadError):
                    skipped.append((key, str(item)))
                else:
                    tensors.append(item if isinstance(item, torch.Tensor) else model.preprocess(item))
            if tensors:
                parts = decompose(model, torch.stack(tensors), batch_size=len(tensors), progress=False)
                chunks.append(parts.heads[:, layers][:, :, heads].sum(dim=3))
            bar.update(len(batch))
    contributions = torch.cat(chunks) if chunks else torch.zeros(0, len(layers), len(heads), model.embed_dim)
    return contributions, skipped
