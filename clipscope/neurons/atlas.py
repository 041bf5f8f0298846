"""The neuron atlas: for each unit, the four views of OpenAI Microscope and the Multimodal Neurons
article (a feature visualization, the dataset examples that drive it most, the rendered words that
drive it most, and a concept label), computed once per site and shared by the HTML export and the
explorer widget.

    atlas = Atlas(model, images, words=default_words(1000))
    atlas.view("visual.layer4", 17)               # a UnitView: shows as a card in a notebook
    atlas.save_html("atlas", {"visual.layer4": range(16)})

Per site, the first view of any unit computes the whole site at once: one pass over ``images``
for the dataset examples of every unit (:func:`~clipscope.neurons.dataset_examples`), one
scan of the rendered words (:func:`~clipscope.neurons.word_responses`), and one CLIP-Dissect
labelling of every unit over the same images (:func:`~clipscope.neurons.label_units`).
Feature visualizations are rendered on demand, many units in one batch
(:meth:`Atlas.visualize`), at the site's :func:`~clipscope.optvis.optimization_site`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..io import write_text_atomic
from ..pages import BLANK, esc, image_uri, page
from ..validate import InvalidArgumentError
from .examples import DatasetExamples, Example, dataset_examples, peak_cell
from .labels import UnitLabels, label_units
from .words import WordResponses, default_words, word_responses

__all__ = ["Atlas", "UnitView"]


@dataclass
class UnitView:
    """What the atlas knows of one unit.

    - ``visualization``: the rendered image (``PIL.Image``), ``None`` until rendered;
    - ``examples`` / ``example_images``: the top dataset examples, highest first, and the images
      as the model saw them with the cell where the unit peaked outlined;
    - ``words``: the top rendered words as ``(word, mean activation)``;
    - ``labels``: the top concepts as ``(concept, score)`` (the label is ``labels[0][0]``).
    """

    site: str
    unit: int
    visualization: Image.Image | None
    examples: list[Example]
    example_images: list[Image.Image]
    words: list[tuple[str, float]]
    labels: list[tuple[str, float]]
    label_method: str = ""

    @property
    def label(self) -> str:
        """The best concept."""
        return self.labels[0][0] if self.labels else ""

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "unit": self.unit, "label": self.label,
                "labels": [[c, round(s, 4)] for c, s in self.labels],
                "words": [[w, round(v, 4)] for w, v in self.words],
                "examples": [{"key": str(e.key), "value": round(e.value, 4), "position": e.position}
                             for e in self.examples],
                "rendered": self.visualization is not None}

    def plot(self, n_examples: int = 6):
        """One row: visualization, top examples, top words; titled with the label. Returns the figure."""
        import matplotlib.pyplot as plt
        n = min(n_examples, len(self.example_images))
        fig, axes = plt.subplots(1, n + 2, figsize=(1.8 * (n + 2), 2.3),
                                 gridspec_kw={"width_ratios": [1] * (n + 1) + [1.4]})
        for ax in axes:
            ax.axis("off")
        if self.visualization is not None:
            axes[0].imshow(self.visualization)
        axes[0].set_title("visualization" if self.visualization is not None else "(not rendered)", fontsize=8)
        for ax, ex, img in zip(axes[1:], self.examples, self.example_images[:n]):
            ax.imshow(img)
            ax.set_title(f"{ex.value:.3g}", fontsize=8)
        axes[-1].text(0, 1, "top words\n" + "\n".join(f"{w}  {v:.3g}" for w, v in self.words[:8]),
                      va="top", fontsize=8, family="monospace", transform=axes[-1].transAxes)
        fig.suptitle(f"{self.site} unit {self.unit}: {self.label}", fontsize=10)
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        return unit_card_html(self)


def bars_html(items: Sequence[tuple[str, float]], colour: str) -> str:
    """Ranked items as HTML rows with bars proportional to their score (relative to the range shown)."""
    if not items:
        return "<p><i>none</i></p>"
    values = [v for _, v in items]
    lo, hi = min(values + [0.0]), max(values)
    span = (hi - lo) or 1.0
    rows = "".join(
        f'<div style="display:flex;align-items:center;gap:4px;font:11px monospace">'
        f'<span style="width:7.5em;overflow:hidden;white-space:nowrap">{esc(name)}</span>'
        f'<span style="display:inline-block;height:9px;width:{4 + 80 * (v - lo) / span:.0f}px;background:{colour}"></span>'
        f"<span>{v:.3g}</span></div>" for name, v in items)
    return rows


def unit_card_html(view: UnitView, *, vis_size: int = 128, example_size: int = 72) -> str:
    """One unit's four views as a self-contained HTML block (images embedded)."""
    if view.visualization is not None:
        vis = f'<img src="{image_uri(view.visualization, vis_size)}" width="{vis_size}" title="visualization"/>'
    else:
        vis = (f'<div style="width:{vis_size}px;height:{vis_size}px;background:rgb{BLANK};display:flex;'
               f'align-items:center;justify-content:center;font:11px sans-serif;color:#777">not rendered</div>')
    examples = "".join(
        f'<img src="{image_uri(img, example_size, "JPEG")}" width="{example_size}" '
        f'title="{esc(ex.key)}: {ex.value:.3g}"/>' for ex, img in zip(view.examples, view.example_images))
    label = (f"<b>{esc(view.label)}</b> <small>({view.labels[0][1]:.3g}; also "
             + ", ".join(esc(c) for c, _ in view.labels[1:4]) + ")</small>") if view.labels else "<i>none</i>"
    return (f'<div class="clipscope-unit-card" style="border:1px solid #ddd;padding:6px;margin:6px 0;font:12px sans-serif">'
            f'<div style="font-weight:bold">{esc(view.site)} · unit {view.unit} · label: {label}</div>'
            f'<div style="display:flex;gap:10px;align-items:flex-start;margin-top:4px">'
            f'<div>{vis}</div>'
            f'<div style="max-width:{4 * (example_size + 4)}px"><div style="color:#555">dataset examples</div>{examples}</div>'
            f'<div><div style="color:#555">top rendered words</div>{bars_html(view.words, "#4a7fc1")}</div>'
            f'<div><div style="color:#555">concept scores ({esc(view.label_method)})</div>'
            f'{bars_html(view.labels, "#4a9a5a")}</div>'
            f"</div></div>")


def mark_peak(image: Image.Image, cell: tuple[tuple[int, int], tuple[int, int]] | None) -> Image.Image:
    """A copy of ``image`` with the ``((y, x), (grid_h, grid_w))`` cell outlined in green (unchanged if ``None``)."""
    image = image.convert("RGB")
    if cell is None:
        return image
    (y, x), (gh, gw) = cell
    out = image.copy()
    ch, cw = out.height / gh, out.width / gw
    width = max(1, round(min(out.size) / 64))
    ImageDraw.Draw(out).rectangle([x * cw, y * ch, (x + 1) * cw - 1, (y + 1) * ch - 1], outline=(0, 255, 0),
                                  width=width)
    return out


@dataclass
class Atlas:
    """Per-unit views of image-tower sites of ``model``, computed lazily per site and kept.

    - ``images``: the data set the dataset examples come from and the probe set of the concept
      labels: anything :func:`~clipscope.neurons.dataset_examples` reads (a folder, a list of
      paths or PIL images, a ``datasets`` table);
    - ``words``: the words rendered as images (default: :func:`default_words` ``(1000)``);
    - ``concepts``: the concept list for labels (default: ``words``);
    - ``k``: dataset examples kept per unit; ``n_words`` / ``n_labels``: how many top words and
      concepts a :class:`UnitView` lists;
    - ``steps``, ``param``, ``seed``: feature-visualization settings (:func:`~clipscope.optvis.render`);
    - ``label_method`` / ``label_templates``: CLIP-Dissect score and prompt templates (default ``None``:
      the model's prompt templates, so a concept means the thing rather than its written word; on the
      organism, bare words, the default of :func:`~clipscope.neurons.label_units` as in CLIP-Dissect,
      label 2 of 6 colour units correctly against 6 of 6 with prompts; ``"{}"`` for bare words);
    - ``cache_dir``: where dataset-example mining keeps its resumable state (``clipscope mine`` fills it
      ahead of time, on many processes);
    - ``distributed``: how dataset examples are mined (:func:`~clipscope.neurons.dataset_examples`):
      ``None`` in parallel under ``torchrun`` / ``accelerate launch``, ``True`` requires a launcher,
      ``False`` in this process only. The rendered words and labels are computed on every rank;
    - ``timings``: seconds spent per (site, view), filled as views are computed.
    """

    model: Any
    images: Any
    words: Sequence[str] | None = None
    concepts: Sequence[str] | None = None
    k: int = 8
    n_words: int = 8
    n_labels: int = 5
    steps: int = 256
    param: str = "fourier"
    seed: int = 0
    n_variants: int = 4
    label_method: str = "soft_wpmi"
    label_templates: str | Sequence[str] | None = None
    batch_size: int = 64
    cache_dir: str | None = None
    progress: bool | None = None
    distributed: bool | None = None
    timings: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # repeats are dropped, first occurrence kept (e.g. a colour that is also one of the words)
        self.words = default_words(1000) if self.words is None else list(dict.fromkeys(self.words))
        self.concepts = list(self.words) if self.concepts is None else list(dict.fromkeys(self.concepts))
        self._examples: dict[str, DatasetExamples] = {}
        self._words: dict[str, WordResponses] = {}
        self._labels: dict[str, UnitLabels] = {}
        self._visualizations: dict[tuple[str, int], Image.Image] = {}
        self._example_images: dict[Any, Image.Image] = {}

    # -- per-site views (computed on first use) ----------------------------------------------
    def check_site(self, site: str) -> None:
        """Raise unless ``site`` is a site of the image tower (unknown names raise with close matches)."""
        s = self.model.site(site)
        if s.tower != "visual":
            raise InvalidArgumentError("site", site, f"an image-tower site; it is in the {s.tower} tower")

    def _timed(self, site: str, what: str, compute: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = compute()
        self.timings[(site, what)] = time.perf_counter() - start
        return value

    def has_views(self, site: str) -> bool:
        """Whether the per-site views of ``site`` (dataset examples, rendered words, labels) are computed,
        i.e. whether :meth:`view` of one of its units returns without a pass over the data."""
        return site in self._examples and site in self._words and site in self._labels

    def examples(self, site: str) -> DatasetExamples:
        """Top-``k`` dataset examples of every unit of ``site`` (one pass over ``images``)."""
        if site not in self._examples:
            self.check_site(site)
            self._examples[site] = self._timed(site, "dataset examples", lambda: dataset_examples(
                self.model, self.images, site, k=self.k, batch_size=self.batch_size, cache_dir=self.cache_dir,
                progress=self.progress, distributed=self.distributed))
        return self._examples[site]

    def word_responses(self, site: str) -> WordResponses:
        """Every unit's response to each of ``words`` rendered as images."""
        if site not in self._words:
            self.check_site(site)
            self._words[site] = self._timed(site, "rendered words", lambda: word_responses(
                self.model, site, self.words, n_variants=self.n_variants, seed=self.seed,
                batch_size=self.batch_size, progress=self.progress))
        return self._words[site]

    def labels(self, site: str) -> UnitLabels:
        """CLIP-Dissect concept scores of every unit of ``site`` over ``images``."""
        if site not in self._labels:
            self.check_site(site)
            self._labels[site] = self._timed(site, "labels", lambda: label_units(
                self.model, site, self.images, self.concepts, top=self.n_labels, method=self.label_method,
                templates=self.label_templates, batch_size=self.batch_size, progress=self.progress))
        return self._labels[site]

    # -- feature visualization (on demand) ------------------------------------------------------
    def visualization(self, site: str, unit: int) -> Image.Image | None:
        """The rendered image of ``unit``, or ``None`` if it has not been rendered."""
        return self._visualizations.get((site, int(unit)))

    def visualize(self, site: str, units: Iterable[int], *,
                  callback: Callable[[int, torch.Tensor], None] | None = None) -> list[Image.Image]:
        """Render the ``units`` of ``site`` that are not rendered yet, in one batch; returns all their images.

        ``render`` optimizes units at :func:`~clipscope.optvis.optimization_site` (before the block's
        final ReLU). ``callback(step, values)`` is called after every optimization step.
        """
        from ..hooks import Unit
        from ..optvis import render
        self.check_site(site)
        units = [int(u) for u in units]
        n = self.model.site(site).n_units
        bad = [u for u in units if not 0 <= u < n]
        if bad:
            raise ValueError(f"units {bad[:10]} are out of range for {site!r} with {n} units (valid: 0..{n - 1})")
        todo = [u for u in dict.fromkeys(units) if (site, u) not in self._visualizations]
        if todo:
            start = time.perf_counter()
            result = render(self.model, [Unit.channel(site, u) for u in todo], steps=self.steps,
                            param=self.param, seed=self.seed, progress=bool(self.progress), callback=callback)
            self.timings[(site, "visualization")] = (self.timings.get((site, "visualization"), 0.0)
                                                      + time.perf_counter() - start)
            for u, img in zip(todo, result.pil_images()):
                self._visualizations[(site, u)] = img
        return [self._visualizations[(site, u)] for u in units]

    # -- one unit -----------------------------------------------------------------------------
    def view(self, site: str, unit: int) -> UnitView:
        """The four views of ``unit`` (computing its site's views on first use)."""
        unit = int(unit)
        n = self.model.site(site).n_units
        if not 0 <= unit < n:
            raise ValueError(f"unit {unit} is out of range for {site!r} with {n} units (valid: 0..{n - 1})")
        ex = self.examples(site)
        top = ex.top(site, unit)
        missing = [e.key for e in top if e.key not in self._example_images]
        if missing:
            self._example_images.update(zip(missing, ex.load(missing)))
        se = ex.sites[site]
        images = [mark_peak(_as_pil(self._example_images[e.key]), peak_cell(se, e.position)) for e in top]
        return UnitView(site, unit, self.visualization(site, unit), top, images,
                        self.word_responses(site).top(site, unit, self.n_words),
                        self.labels(site).top(unit, self.n_labels), self.label_method)

    # -- export ---------------------------------------------------------------------------------
    def save_html(self, folder: str | Path, units: Mapping[str, Iterable[int]], *, render: bool = True,
                  title: str | None = None) -> Path:
        """Write one HTML page per site (``<site>.html``, every unit's card, images embedded) and an
        ``index.html`` linking them; returns the index's path.

        ``units`` maps each site to the units to show. With ``render`` the units' feature
        visualizations are rendered first (one batch per site); otherwise only those already
        rendered are shown. Each file is written atomically.
        """
        folder = Path(folder)
        title = title or f"Neuron atlas of {getattr(self.model, 'name', self.model.id)}"
        links = []
        for site, chosen in units.items():
            chosen = [int(u) for u in chosen]
            if not chosen:
                raise ValueError(f"no units given for {site!r}")
            if render:
                self.visualize(site, chosen)
            views = [self.view(site, u) for u in chosen]
            file_name = f"{page_name(site)}.html"
            write_text_atomic(folder / file_name, self.site_page(site, views, title))
            summary = ", ".join(f"{v.unit}: {esc(v.label)}" for v in views[:12])
            links.append(f'<li><a href="{file_name}">{esc(site)}</a> ({len(views)} units) '
                         f"<small>{summary}{' ...' if len(views) > 12 else ''}</small></li>")
        index = write_text_atomic(folder / "index.html", page(title, (
            f"<p>Model <code>{esc(self.model.id)}</code>. For each unit: its feature visualization "
            "(rendered to maximize it), the dataset images that drive it most (the cell where it peaks outlined), "
            "the words that drive it most when rendered as images, and its best concept labels "
            "(CLIP-Dissect).</p><ul>" + "".join(links) + "</ul>")))
        return index

    def site_page(self, site: str, views: Sequence[UnitView], title: str) -> str:
        """The HTML page of ``site`` titled ``"<title>: <site>"``: what it was computed from, then one card per view."""
        ex = self.examples(site)
        skipped = f" ({ex.n_skipped} unreadable skipped)" if ex.n_skipped else ""
        timing = ", ".join(f"{what} {s:.1f} s" for (st, what), s in self.timings.items() if st == site)
        return page(f"{title}: {site}",
                    f'<p><a href="index.html">&larr; all layers</a> · {len(views)} units · '
                    f"dataset examples from {ex.n_seen} images{skipped} · {len(self.words)} rendered words · "
                    f"{len(self.concepts)} concepts ({esc(self.label_method)}) · {timing}</p>"
                    + "".join(unit_card_html(v) for v in views))


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.dtype != "uint8":
        array = (array.clip(0, 1) * 255).round().astype("uint8")
    return Image.fromarray(array)


def page_name(site: str) -> str:
    """The file name stem of ``site``'s atlas page (``<stem>.html``)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in site)
