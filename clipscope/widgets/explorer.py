"""An interactive neuron explorer: pick a layer and a unit, see its four atlas views, render its
feature visualization on demand with a progress bar, and compare two units side by side.

    from clipscope.neurons import Atlas
    from clipscope.widgets import NeuronExplorer
    NeuronExplorer(Atlas(model, images), sites=["visual.layer3", "visual.layer4"])

Everything it shows comes from an :class:`~clipscope.neurons.Atlas`, so views computed here are
the ones :meth:`~clipscope.neurons.Atlas.save_html` exports, and vice versa.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import ipywidgets as widgets
from PIL import Image

from ..neurons.atlas import Atlas, UnitView, bars_html
from ..pages import BLANK, image_bytes, image_grid

__all__ = ["NeuronExplorer"]

_PLACEHOLDER_SIZE = 128


class _UnitPanel(widgets.VBox):
    """The four views of one unit: title, visualization, dataset examples, top words, label."""

    def __init__(self, *, vis_size: int, tile: int, suffix: str = "") -> None:
        self.vis_size, self.tile = vis_size, tile
        self.title = widgets.HTML()
        self.title.add_class("clipscope-title" + suffix)
        blank = Image.new("RGB", (vis_size, vis_size), BLANK)
        self.visualization = widgets.Image(value=image_bytes(blank, vis_size), format="png", width=vis_size,
                                           height=vis_size)
        self.visualization.add_class("clipscope-visualization" + suffix)
        self.vis_note = widgets.HTML()
        self.vis_note.add_class("clipscope-vis-note" + suffix)
        self.examples = widgets.Image(format="png")
        self.examples.add_class("clipscope-examples" + suffix)
        self.words = widgets.HTML()
        self.words.add_class("clipscope-words" + suffix)
        self.label = widgets.HTML()
        self.label.add_class("clipscope-label" + suffix)
        spaced = widgets.Layout(margin="0 14px 0 0")
        left = widgets.VBox([widgets.HTML("<b>feature visualization</b>"), self.visualization, self.vis_note],
                            layout=spaced)
        middle = widgets.VBox([widgets.HTML("<b>dataset examples</b> (peak cell outlined)"), self.examples],
                              layout=spaced)
        right = widgets.VBox([widgets.HTML("<b>top rendered words</b>"), self.words,
                              widgets.HTML("<b>concept label</b>"), self.label])
        super().__init__([self.title, widgets.HBox([left, middle, right],
                                                   layout=widgets.Layout(align_items="flex-start"))])

    def show(self, view: UnitView, n_images: int) -> None:
        self.title.value = (f"<h4 style='margin:4px 0'>{html.escape(view.site)} · unit {view.unit} · "
                            f"<i>{html.escape(view.label)}</i></h4>")
        if view.visualization is not None:
            self.visualization.value = image_bytes(view.visualization, self.vis_size)
            self.vis_note.value = ""
        else:
            blank = Image.new("RGB", (self.vis_size, self.vis_size), BLANK)
            self.visualization.value = image_bytes(blank, self.vis_size)
            self.vis_note.value = "<small>not rendered yet: press <i>render</i></small>"
        self.examples.value = self._strip_png(view)
        self.words.value = bars_html(view.words, "#4a7fc1")
        best = (f"<b>{html.escape(view.label)}</b> ({view.labels[0][1]:.3g})" if view.labels else "<i>none</i>")
        self.label.value = (f"<div style='font:12px sans-serif'>{best}</div>"
                            + bars_html(view.labels[1:], "#4a9a5a")
                            + f"<small>{html.escape(view.label_method)} over {n_images} images</small>")

    def _strip_png(self, view: UnitView) -> bytes:
        return image_bytes(image_grid(view.example_images, columns=4, tile=self.tile))


class NeuronExplorer(widgets.VBox):
    """Explore units of an :class:`~clipscope.neurons.Atlas` in a notebook.

    - ``sites``: the layers offered (default: the image tower's top-level blocks,
      :meth:`~clipscope.model.ClipModel.blocks`, plus ``site`` if it is another);
    - ``site`` / ``unit``: what is shown first (default: the last site, unit 0);
    - ``compare``: a second unit shown side by side (``None``: comparison off).

    Changing the layer computes that layer's views on first use (dataset examples, words,
    labels: seconds on the organism, minutes on a large model over a large data set). The
    *render* button renders the shown units' visualizations in one batch, with a progress bar.
    """

    def __init__(self, atlas: Atlas, sites: Sequence[str] | None = None, *, site: str | None = None,
                 unit: int = 0, compare: int | None = None, vis_size: int = 160, tile: int = 64) -> None:
        self.atlas = atlas
        if sites is None:
            sites = atlas.model.blocks("visual")
            if site is not None and site not in sites:   # e.g. a sub-block of one of them
                sites.append(site)
        sites = list(sites)
        if not sites:
            raise ValueError("no image-tower sites to explore; pass sites=[...] (see model.layers())")
        for s in sites:
            atlas.check_site(s)
        site = site or sites[-1]
        if site not in sites:
            raise ValueError(f"site {site!r} is not among the explorer's sites {sites}")
        n = atlas.model.site(site).n_units
        self.layer = widgets.Dropdown(options=sites, value=site, description="layer")
        self.layer.add_class("clipscope-layer")
        self.unit = widgets.BoundedIntText(value=unit, min=0, max=n - 1, description="unit")
        self.unit.add_class("clipscope-unit")
        self.compare_on = widgets.Checkbox(value=compare is not None, description="compare with", indent=False,
                                           layout=widgets.Layout(width="auto"))
        self.compare_on.add_class("clipscope-compare")
        self.unit_b = widgets.BoundedIntText(value=compare if compare is not None else min(1, n - 1), min=0,
                                             max=n - 1, layout=widgets.Layout(width="90px"))
        self.unit_b.add_class("clipscope-unit-b")
        self.render_button = widgets.Button(description="render", icon="paint-brush",
                                            tooltip="render the feature visualization of the shown unit(s)")
        self.render_button.add_class("clipscope-render")
        self.progress = widgets.IntProgress(value=0, min=0, max=atlas.steps, description="",
                                            layout=widgets.Layout(width="160px", visibility="hidden"))
        self.status = widgets.HTML()
        self.status.add_class("clipscope-status")
        self.panel_a = _UnitPanel(vis_size=vis_size, tile=tile)
        self.panel_b = _UnitPanel(vis_size=vis_size, tile=tile, suffix="-b")
        self.panel_b.layout.display = "none" if compare is None else None
        controls = widgets.HBox([self.layer, self.unit, self.compare_on, self.unit_b, self.render_button,
                                 self.progress], layout=widgets.Layout(align_items="center", flex_flow="row wrap"))
        super().__init__([controls, self.status, self.panel_a, self.panel_b])
        self.add_class("clipscope-explorer")
        self.layer.observe(self._on_layer, names="value")
        self.unit.observe(self._refresh, names="value")
        self.unit_b.observe(self._refresh, names="value")
        self.compare_on.observe(self._refresh, names="value")
        self.render_button.on_click(self._on_render)
        self._refresh()

    # -- what is shown ----------------------------------------------------------------------------
    @property
    def shown(self) -> list[int]:
        """The units on screen (one, or two when comparing)."""
        return [self.unit.value] + ([self.unit_b.value] if self.compare_on.value else [])

    def _refresh(self, _change=None) -> None:
        site = self.layer.value
        first_time = not self.atlas.has_views(site)
        if first_time:
            self.status.value = f"<i>computing the views of {html.escape(site)} (first use of this layer) ...</i>"
        try:
            views = [self.atlas.view(site, u) for u in self.shown]
        except Exception as exc:  # shown in the widget rather than lost in a callback's log
            self.status.value = f"<span style='color:#b00'>error: {html.escape(str(exc))}</span>"
            raise
        n_images = self.atlas.examples(site).n_seen
        self.panel_a.show(views[0], n_images)
        self.panel_b.layout.display = None if self.compare_on.value else "none"
        if len(views) > 1:
            self.panel_b.show(views[1], n_images)
        timing = ", ".join(f"{what} {s:.1f} s" for (st, what), s in self.atlas.timings.items() if st == site)
        self.status.value = (f"<small>{html.escape(site)}: {self.atlas.model.site(site).n_units} units; "
                             f"dataset examples from {n_images} images; {len(self.atlas.words)} words; "
                             f"{timing}</small>")

    def _on_layer(self, change) -> None:
        n = self.atlas.model.site(change["new"]).n_units
        for box in (self.unit, self.unit_b):
            box.max = n - 1
        self._refresh()

    def _on_render(self, _button=None) -> None:
        """Render the shown units that are not rendered yet (one batch), updating the progress bar."""
        site, units = self.layer.value, self.shown
        self.render_button.disabled = True
        self.progress.max, self.progress.value = self.atlas.steps, 0
        self.progress.layout.visibility = "visible"
        try:
            self.atlas.visualize(site, units, callback=lambda step, _values: setattr(self.progress, "value", step + 1))
        finally:
            self.render_button.disabled = False
            self.progress.layout.visibility = "hidden"
        self._refresh()

    def select(self, unit: int, site: str | None = None, compare: int | None = None) -> None:
        """Show ``unit`` (of ``site``; optionally compared with unit ``compare``) as if picked by hand."""
        if site is not None:
            self.layer.value = site
        if compare is not None:
            self.unit_b.value = compare
            self.compare_on.value = True
        self.unit.value = unit

    def render(self) -> None:
        """Render the shown units' visualizations (what the *render* button does)."""
        self._on_render()

