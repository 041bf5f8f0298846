"""Rendered-word responses: which written words drive a unit (the "text neuron" scan).

:func:`default_words` gives a list of common English words taken from the CLIP
tokenizer's own vocabulary (no extra download). :func:`word_responses` renders each
word as text on a white image (several fonts, sizes and positions, seeded), encodes
the images while capturing activation sites and averages, per word, every unit's mean
activation (over positions, tokens pooled as ``model.token_pool`` says: :meth:`clipscope.ClipModel.unit_values`).
"""
from __future__ import annotations

import collections
import gzip
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..hooks import Unit, site_names
from ..progress import progress_bar

#: Common English suffixes / word-final fragments. Word-final BPE tokens include these
#: ("ing</w>", "tion</w>"), which are not words on their own, so they are dropped.
_SUFFIXES = frozenset("""
ing ings ers ent ents ght ghts tion tions ation ations ity ities ment ments ally ure ures ard ards ood ther
ack ons ine ver ter ters ting ning ted ded ked sed ame ays ding der ite ace les ong ound ary ful ould ars ous
ster ance ans ase ight ving ying ton onal ool als ture ated ence ies ach ile ough ner ves sion sions ort ily
ats mber ins ley ick sts ating ved ition ited ical kes sic ening cial ates ason den tting int tor ich ket ast
iting dent sting ely vel ness ens ics ale ends uring sted ling oud dge ina ned ses ana ining ral mas tive
ore des ney ching ire iness tball ise ours ger est ber dents ience ils tic rence cess val stic ction inst
ants ween ces ell less ish ble ors able ible ism ist ists ship hood ward wards ies ied ier iest ency ancy
ize ized ise ised ery ory ical ically ously ously eous ious ive ives ful fully ness lessly ple ital atest
versity tain cer ade ath lar ven ston gan dom
""".split())


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Alphabetic word-final tokens of the CLIP BPE, in rank order, with a fragment filter.

    A word-final token ``w</w>`` is kept when it is ASCII letters only, at least 3 long,
    has a vowel, is not a listed suffix, and is not mostly used as the tail of longer
    words: merges that end in ``w</w>`` (``k ing</w>``) against merges that start with
    ``w`` (``photo graphy``); tokens with ratio >= 4.5 and fewer than 8 word-initial uses
    are fragments.
    """
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    encoder = SimpleTokenizer().encoder
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [m.split() for m in lines]
    tail = collections.Counter(p[1] for p in pairs if len(p) == 2)
    head = collections.Counter(p[0] for p in pairs if len(p) == 2)
    out = []
    for token, _rank in sorted(encoder.items(), key=lambda kv: kv[1]):
        if not token.endswith("</w>"):
            continue
        w = token[:-4]
        if not (w.isascii() and w.isalpha() and len(w) >= 3 and any(c in "aeiouy" for c in w)):
            continue
        if w in _SUFFIXES:
            continue
        if tail[token] / (head[w] + 1) >= 4.5 and head[w] < 8:
            continue
        out.append(w.lower())
    return tuple(dict.fromkeys(out))


def default_words(n: int = 5000) -> list[str]:
    """The first ``n`` common English words of the CLIP tokenizer's vocabulary.

    Built from open_clip's ``SimpleTokenizer`` BPE (installed with the dependencies):
    whole-word tokens, alphabetic, length >= 3, lowercase, in BPE rank order (which
    roughly follows frequency in CLIP's training text). Word-final fragments such as
    "ing" or "tion" are filtered out heuristically (see ``_vocabulary``); a few rare
    fragments can remain.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    vocab = _vocabulary()
    if n > len(vocab):
        raise ValueError(f"n={n} is more than the {len(vocab)} words available")
    return list(vocab[:n])


def default_fonts() -> list[str]:
    """DejaVu Sans Bold (the project's default font), DejaVu Sans and DejaVu Serif, from matplotlib."""
    from ..typographic.render import default_font
    bold = Path(default_font())
    fonts = [bold, bold.with_name("DejaVuSans.ttf"), bold.with_name("DejaVuSerif.ttf")]
    return [str(f) for f in fonts if f.exists()]


def render_word_variants(word: str, n_variants: int, image_size: tuple[int, int], *, fonts: Sequence[str],
                         sizes: Sequence[float], seed: int = 0) -> list[Image.Image]:
    """``n_variants`` images of ``word`` in black on white: font, size and position drawn per variant (seeded)."""
    from ..typographic.render import TextStyle, render_text
    out = []
    for i in range(n_variants):
        rng = random.Random(f"{seed}:{word}:{i}")
        style = TextStyle(font=fonts[i % len(fonts)], size=sizes[(i // len(fonts)) % len(sizes)],
                          colour="black", box=None)
        position = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        canvas = Image.new("RGB", tuple(image_size), "white")
        out.append(render_text(canvas, word, style, position=position, seed=rng.randrange(2**31)).image)
    return out


@dataclass
class WordResponses:
    """Mean activation of every unit of ``sites`` to each rendered word.

    ``responses[site]`` is a float32 ``(n_words, n_units)`` array: per word, the unit's
    mean activation (over positions/tokens) averaged over ``n_variants`` renderings.
    """

    words: list[str]
    responses: dict[str, np.ndarray]
    n_variants: int
    fonts: list[str]
    sizes: tuple[float, ...]
    seed: int
    model: str = ""

    def _column(self, site: str, unit: int | Unit) -> np.ndarray:
        if site not in self.responses:
            raise ValueError(f"site {site!r} was not scanned; scanned sites: {list(self.responses)}")
        index = unit.index if isinstance(unit, Unit) else unit
        n_units = self.responses[site].shape[1]
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n_units:
            raise ValueError(f"unit {unit!r} is out of range for {site!r} with {n_units} units "
                             f"(valid: 0..{n_units - 1})")
        return self.responses[site][:, int(index)]

    def top(self, site: str, unit: int | Unit, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` words that drive ``unit`` of ``site`` most, as ``(word, mean activation)``, best first."""
        col = self._column(site, unit)
        order = np.argsort(-col, kind="stable")[:n]
        return [(self.words[i], float(col[i])) for i in order]

    def rank(self, site: str, unit: int | Unit, word: str) -> int:
        """0-based rank of ``word`` among all words for ``unit`` (0 = drives it most)."""
        if word not in self.words:
            raise ValueError(f"{word!r} is not among the {len(self.words)} scanned words")
        col = self._column(site, unit)
        return int((col > col[self.words.index(word)]).sum())

    def to_frame(self, site: str | None = None):
        """DataFrame indexed by word with one column per ``(site, unit)`` (only ``site`` if given)."""
        import pandas as pd
        sites = [site] if site is not None else list(self.responses)
        frames = []
        for s in sites:
            if s not in self.responses:
                raise ValueError(f"site {s!r} was not scanned; scanned sites: {list(self.responses)}")
            arr = self.responses[s]
            frames.append(pd.DataFrame(arr, index=pd.Index(self.words, name="word"),
                                       columns=pd.MultiIndex.from_product([[s], range(arr.shape[1])],
                                                                          names=["site", "unit"])))
        return pd.concat(frames, axis=1)

    def plot(self, site: str, unit: int | Unit, n: int = 20, ax=None):
        """Horizontal bar chart of the ``n`` top words of ``unit``; returns the figure."""
        from .plots import ranked_bars
        index = unit.index if isinstance(unit, Unit) else unit
        return ranked_bars(self.top(site, unit, n), xlabel="mean activation", title=f"{site} unit {index}",
                           color="tab:blue", ax=ax)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{s}</td><td>{a.shape[1]}</td></tr>" for s, a in self.responses.items())
        return (f"<p>WordResponses: {len(self.words)} words x {self.n_variants} renderings, "
                f"model {self.model or '?'}, seed {self.seed}</p>"
                f"<table><tr><th>site</th><th>units</th></tr>{rows}</table>")


def word_responses(model, sites: str | Sequence[str], words: Sequence[str] | None = None, *,
                   fonts: Sequence[str] | None = None, sizes: Sequence[float] = (0.2, 0.3),
                   n_variants: int = 6, seed: int = 0, batch_size: int = 64,
                   progress: bool | None = None) -> WordResponses:
    """Render each word ``n_variants`` times and average every unit's response per word.

    ``words`` defaults to :func:`default_words` (5000). ``fonts`` defaults to
    :func:`default_fonts`; variants cycle through fonts, then ``sizes`` (fractions of
    the image's shorter side, shrunk to fit), each at a seeded position near the centre.
    Images are the model's input size, black text on white.
    """
    names = site_names(sites)
    if not names:
        raise ValueError("sites must name at least one site (see model.layers())")
    resolved = [model.site(s) for s in names]  # unknown names raise with close matches
    bad = [s.name for s in resolved if s.tower != "visual"]
    if bad:
        raise ValueError(f"word_responses scans image-tower sites; {bad} belong to the text tower")
    words = default_words() if words is None else list(words)
    if not words or isinstance(words, str):
        raise ValueError("words must be a non-empty list of strings")
    empty = [w for w in words if not isinstance(w, str) or not w.strip()]
    if empty:
        raise ValueError(f"words must be non-empty strings; got {empty[:5]}")
    if len(set(words)) != len(words):
        dupes = sorted({w for w in words if words.count(w) > 1})
        raise ValueError(f"duplicate words: {dupes[:10]}")
    fonts = default_fonts() if fonts is None else list(fonts)
    if not fonts:
        raise ValueError("fonts must list at least one TrueType font path")
    if n_variants < 1:
        raise ValueError(f"n_variants must be >= 1; got {n_variants}")
    sizes = tuple(float(s) for s in sizes)
    image_size = tuple(getattr(model, "image_size", (224, 224)))[::-1]  # (H, W) -> PIL (W, H)

    sums = {s.name: torch.zeros(len(words), s.n_units, dtype=torch.float64) for s in resolved}
    per_batch = max(1, batch_size // n_variants)
    chunks = range(0, len(words), per_batch)
    for start in progress_bar(chunks, progress, len(words) > per_batch, "render words", total=len(chunks)):
        chunk = words[start:start + per_batch]
        images = [img for w in chunk for img in
                  render_word_variants(w, n_variants, image_size, fonts=fonts, sizes=sizes, seed=seed)]
        with torch.no_grad(), model.capture(names) as acts:
            model.encode_image(images, batch_size=len(images), progress=False)
        for s in resolved:
            means = model.unit_values(s.name, acts).double().cpu()
            sums[s.name][start:start + len(chunk)] = means.view(len(chunk), n_variants, -1).mean(dim=1)
    return WordResponses(words, {k: v.float().numpy() for k, v in sums.items()}, n_variants, fonts, sizes, seed,
                         model=getattr(model, "id", ""))
