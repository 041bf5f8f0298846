"""Rebuild the README gallery from the organism: ``python docs/gallery/make_gallery.py``.

Writes small PNGs next to this file (the explorer screenshot, ``explorer.png``, comes from the
browser test: ``make test`` saves it under ``test-artifacts/browser/``).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import clipscope  # noqa: E402
from clipscope import Unit, optvis  # noqa: E402
from clipscope.io import figure_png, write_bytes_atomic  # noqa: E402
from clipscope.organism import COLOURS, SHAPES, ZERO_SHOT_TEMPLATES  # noqa: E402
from clipscope.organism.properties import unit_selectivity  # noqa: E402
from clipscope.organism.scenes import generate, object_scene  # noqa: E402

HERE = Path(__file__).resolve().parent


def save(name: str, fig, dpi: int = 80) -> None:
    path = write_bytes_atomic(HERE / name, figure_png(fig, dpi=dpi))
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    model = clipscope.load("organism")
    scan = unit_selectivity(model)
    keys = [f"colour:{c}" for c in COLOURS] + ["shape:circle", "shape:cross", "word:apple", "word:star"]
    units = [Unit.channel(scan.best[k].layer, scan.best[k].channel) for k in keys]
    targets = [Unit.channel(optvis.optimization_site(model, u.site), u.index) for u in units]
    result = optvis.render(model, targets, steps=256, seed=0, progress=False)
    fig, axes = plt.subplots(1, len(units), figsize=(1.25 * len(units), 1.6))
    for ax, img, key in zip(axes, result.pil_images(), keys):
        ax.imshow(img)
        ax.set_title(key.split(":")[1], fontsize=8)
        ax.axis("off")
    fig.suptitle("feature visualizations of the organism's most selective units", fontsize=9)
    save("feature_visualization.png", fig)

    from clipscope.neurons import dataset_examples
    red = scan.best["colour:red"]
    ex = dataset_examples(model, [s.image for s in generate(600, seed=7_000_000)], red.layer, k=8,
                          units=[red.channel], progress=False)
    save("dataset_examples.png", ex.plot(red.layer, red.channel, n=8), dpi=60)

    from clipscope.typographic import Attack, TextStyle, sweep
    scenes = [object_scene(shape=s, seed=20_000 + 100 * j + i) for j, s in enumerate(SHAPES) for i in range(12)]
    images, labels = [s.image for s in scenes], [s.meta["shape"] for s in scenes]
    attack = Attack("untargeted", None, TextStyle(size=0.25), "center")
    result = sweep(model, images, labels, list(SHAPES), attack, {"size": [0.1, 0.15, 0.2, 0.25, 0.3, 0.4]},
                   templates=list(ZERO_SHOT_TEMPLATES), progress=False)
    fig = result.plot()
    fig.set_size_inches(5, 3)
    save("attack_sweep.png", fig)

    from clipscope.audit import run_audit
    audit = run_audit(HERE.parents[1] / "audits" / "organism_planted_bias.yaml", models=[model], write=False,
                      progress=False)
    fig = audit.compare("roles+thief", "roles+thief+child").plot()
    save("audit_comparison.png", fig)


if __name__ == "__main__":
    main()
