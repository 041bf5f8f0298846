"""The main job (``make demo`` / ``clipscope demo``): run the toolkit on a model and write one report folder.

Today it covers the model layer: the layer listing and a zero-shot evaluation on
freshly generated organism scenes (shapes, then colours). Each part is timed and
linked from ``index.html``.
"""
from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import figure_png, write_bytes_atomic, write_text_atomic


def _timed(parts: list[tuple[str, float, str]], title: str, fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    summary = fn()
    seconds = time.perf_counter() - start
    parts.append((title, seconds, summary))
    print(f"  {title}: {seconds:.1f} s  {summary}")


def zero_shot_section(model, out: Path, n: int = 64, seed: int = 12345) -> dict[str, Any]:
    """Classify ``n`` generated object scenes by shape and by colour; write CSVs and a figure.

    Returns ``{"shape_accuracy": float, "colour_accuracy": float, "n": int}`` (accuracies in [0, 1]).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .organism import COLOUR_TEMPLATES, COLOURS, SHAPES, ZERO_SHOT_TEMPLATES
    from .organism.scenes import object_scene

    scenes = [object_scene(seed=seed + i) for i in range(n)]
    images = [s.image for s in scenes]
    shapes = model.zero_shot(images, list(SHAPES), templates=ZERO_SHOT_TEMPLATES, progress=False)
    colours = model.zero_shot(images, list(COLOURS), templates=COLOUR_TEMPLATES, progress=False)
    frame = shapes.to_frame()
    frame.insert(0, "true_shape", [s.meta["shape"] for s in scenes])
    frame.insert(1, "true_colour", [s.meta["colour"] for s in scenes])
    frame.insert(2, "predicted_colour", colours.predictions)
    write_text_atomic(out / "zero_shot.csv", frame.to_csv())
    shape_acc = float((frame["prediction"] == frame["true_shape"]).mean())
    colour_acc = float((frame["predicted_colour"] == frame["true_colour"]).mean())

    fig, axes = plt.subplots(2, 8, figsize=(14, 4.2))
    for ax, sc, pred, p in zip(axes.flat, scenes, shapes.predictions, shapes.probs.max(1).values.tolist()):
        ax.imshow(sc.image)
        ok = pred == sc.meta["shape"]
        ax.set_title(f"{pred} {p:.0%}", fontsize=8, color="green" if ok else "red")
        ax.axis("off")
    fig.suptitle(f"{model.name}: zero-shot shape, accuracy {shape_acc:.0%} on {n} new scenes "
                 f"(colour: {colour_acc:.0%})")
    write_bytes_atomic(out / "zero_shot.png", figure_png(fig))
    return {"shape_accuracy": shape_acc, "colour_accuracy": colour_acc, "n": n}


def run_demo(model_name: str = "organism", *, pretrained: str | None = None, device: str = "auto",
             out: str | Path = "clipscope-demo") -> Path:
    """Run the main job and write the report folder ``out``; returns the path of its ``index.html``."""
    import clipscope

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[str, float, str]] = []
    total = time.perf_counter()
    print(f"clipscope demo: model {model_name!r}, report folder {out.resolve()}")
    holder: dict[str, Any] = {}

    def load() -> str:
        holder["model"] = clipscope.load(model_name, pretrained=pretrained, device=device)
        return repr(holder["model"])

    def layers() -> str:
        table = holder["model"].layers().to_frame()
        write_text_atomic(out / "layers.csv", table.to_csv(index=False))
        counts = table.groupby(["tower", "layout"]).size()
        return f"{len(table)} sites (" + ", ".join(f"{t}/{l}: {c}" for (t, l), c in counts.items()) + ")"

    def zero_shot() -> str:
        holder["zs"] = zero_shot_section(holder["model"], out)
        zs = holder["zs"]
        return f"shape accuracy {zs['shape_accuracy']:.1%}, colour accuracy {zs['colour_accuracy']:.1%} on {zs['n']} scenes"

    _timed(parts, "load the model", load)
    _timed(parts, "list hookable layers", layers)
    _timed(parts, "zero-shot on generated scenes", zero_shot)

    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{s:.1f} s</td><td>{html.escape(m)}</td></tr>"
                   for t, s, m in parts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>clipscope demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;text-align:left}}</style>
</head><body><h1>clipscope demo: {html.escape(model_name)}</h1>
<table><tr><th>part</th><th>time</th><th>result</th></tr>{rows}</table>
<h2>Zero-shot</h2><img src="zero_shot.png" style="max-width:100%"><p><a href="zero_shot.csv">zero_shot.csv</a></p>
<h2>Layers</h2><p><a href="layers.csv">layers.csv</a>: every hookable site, its layout and shape.</p>
</body></html>"""
    index = write_text_atomic(out / "index.html", page)
    print(f"done in {time.perf_counter() - total:.1f} s; open {index.resolve()}")
    return index
