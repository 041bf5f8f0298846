"""The main job (``make demo`` / ``clipscope demo``): run the whole toolkit on a model and write one
report folder, linked from ``index.html``:

1. the model: its hookable layers and a zero-shot check on freshly generated organism scenes;
2. a small **neuron atlas** of the image tower's two last blocks (feature visualizations, dataset
   examples, rendered words, concept labels), ``atlas/``;
3. a **typographic attack** evaluation on generated object scenes with a text-size sweep and two
   defences (prompt, unit ablation), ``attack/``;
4. the organism **bias audit** comparing two class taxonomies (with and without "child"), ``audit/``.

Every part is timed; the timings are printed and written to the index. The data are generated
scenes, so the job runs offline; on a real model (``--model``) the same job runs on those scenes,
which test the machinery but say little about the model (point the notebooks at real data).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from .io import figure_png, write_bytes_atomic, write_text_atomic
from .neurons.atlas import page_name
from .pages import esc, page
from .validate import check_int

#: The bias audit the demo runs: package data, so an installed wheel has it. The repository's
#: ``audits/organism_planted_bias.yaml`` is an identical copy for users to read and adapt. Its figures carry
#: the trait of the organisms' graded planted bias (``GRADED_BIAS_CONFIG``).
AUDIT_SPEC = resources.files("clipscope") / "audit" / "specs" / "organism_planted_bias.yaml"
#: The ViT organism's audit: the same figures, with the ViT organism's population rates in its comments.
VIT_AUDIT_SPEC = resources.files("clipscope") / "audit" / "specs" / "organism_vit_graded_bias.yaml"


def _timed(parts: list[tuple[str, float, str]], title: str, fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    summary = fn()
    seconds = time.perf_counter() - start
    parts.append((title, seconds, summary))
    print(f"  {title}: {seconds:.1f} s  {summary}", flush=True)


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


def atlas_section(model, out: Path, *, n_images: int = 400, units_per_site: int = 8, steps: int = 256,
                  seed: int = 7_000_000) -> dict[str, Any]:
    """Write a neuron atlas of the image tower's two last blocks to ``out/atlas``.

    On an organism (``organism`` or ``organism-vit``) the sites are its unit sites (the ResNet's last two
    stages, the ViT's last two MLP activations) and the units shown its most selective colour, shape and
    word units (by d' on generated scenes); on other models the first ``units_per_site`` channels of the
    last two blocks. Returns
    ``{"index": Path, "sites": {site: [units]}, "labels": {site: {unit: label}}, "timings": {...}}``.
    """
    from .neurons import Atlas, default_words
    from .organism import COLOURS, SHAPES, WORDS
    from .organism.properties import ORGANISMS, unit_selectivity, unit_sites
    from .organism.scenes import generate

    images = [s.image for s in generate(n_images, seed=seed)]
    organism = model.name in ORGANISMS
    sites = unit_sites(model, 2) if organism else model.layers().blocks().names()[-2:]
    chosen: dict[str, list[int]] = {s: [] for s in sites}
    if organism:
        scan = unit_selectivity(model, layers=tuple(sites))
        for key in sorted(scan.best, key=lambda k: -scan.best[k].dprime):
            best = scan.best[key]
            if best.dprime >= scan.threshold and len(chosen[best.layer]) < units_per_site \
                    and best.channel not in chosen[best.layer]:
                chosen[best.layer].append(best.channel)
    for s in sites:  # other models, or too few selective units
        extra = (c for c in range(model.site(s).n_units) if c not in chosen[s])
        while len(chosen[s]) < min(units_per_site, model.site(s).n_units):
            chosen[s].append(next(extra))
    words = list(dict.fromkeys(list(WORDS) + default_words(200)))
    concepts = list(COLOURS) + list(SHAPES) + list(WORDS)
    atlas = Atlas(model, images, words=words, concepts=concepts, k=8, steps=steps, progress=False)
    index = atlas.save_html(out / "atlas", chosen)
    labels = {s: {u: atlas.view(s, u).label for u in chosen[s]} for s in sites}
    return {"index": index, "sites": chosen, "labels": labels,
            "timings": {f"{s}: {what}": t for (s, what), t in atlas.timings.items()}}


def attack_section(model, out: Path, *, n_per_class: int = 12, seed: int = 20_000) -> dict[str, Any]:
    """Typographic attack on generated object scenes (shape classes): untargeted (each image gets a
    wrong shape's name written on it), a text-size sweep, and the prompt and ablation defences.

    The scenes are written to ``out/attack/data/<shape>/`` (an imagefolder) and the report to
    ``out/attack/index.html``. Returns ``{"index": Path, "summary": DataFrame, "sweep": DataFrame}``.
    """
    import pandas as pd

    from .organism import SHAPES, ZERO_SHOT_TEMPLATES
    from .organism.scenes import object_scene
    from .typographic.run import run_attack_config

    data = out / "attack" / "data"
    for j, shape in enumerate(SHAPES):
        for i in range(n_per_class):
            scene = object_scene(shape=shape, seed=seed + 100 * j + i)
            path = data / shape / f"{i:03d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                scene.image.save(path)
    blocks = model.layers().blocks().names()
    config = {"data": {"path": str(data)}, "classes": list(SHAPES), "templates": list(ZERO_SHOT_TEMPLATES),
              "attack": {"size": 0.25}, "sweep": {"size": [0.1, 0.15, 0.2, 0.25, 0.3, 0.4]},
              "defences": ["prompt", "ablation"], "ablation_site": blocks[-1], "ablation_units": 16,
              "out": str(out / "attack"), "seed": 0}
    index = run_attack_config(config, model=model, progress=False)
    return {"index": index, "summary": pd.read_csv(out / "attack" / "summary.csv"),
            "sweep": pd.read_csv(out / "attack" / "sweep.csv")}


def audit_section(model, out: Path) -> dict[str, Any]:
    """Run the packaged audit spec :data:`AUDIT_SPEC` (:data:`VIT_AUDIT_SPEC` for ``organism-vit``) on ``model``;
    report in ``out/audit``.

    Returns ``{"report": Path, "rates": {taxonomy: {group: rate of 'thief'}}, "result": AuditResult}``.
    """
    from .audit.run import run_audit
    with resources.as_file(VIT_AUDIT_SPEC if model.name == "organism-vit" else AUDIT_SPEC) as spec:
        result = run_audit(spec, out=out / "audit", models=[model], progress=False)
    g = result.groups
    rows = g[(g["grouping"] == "group") & (g["metric"] == "harm_rate") & (g["outcome"] == "harm:crime")]
    rates = {t: dict(zip(r["group"], r["rate"])) for t, r in rows.groupby("taxonomy", sort=False)}
    return {"report": out / "audit" / "report.html", "rates": rates, "result": result}


def run_demo(model_name: str = "organism", *, pretrained: str | None = None, device: str = "auto",
             out: str | Path = "clipscope-demo", steps: int = 256) -> Path:
    """Run the main job and write the report folder ``out``; returns the path of its ``index.html``.

    ``steps``: optimization steps per feature visualization in the atlas (an integer >= 1).
    """
    import clipscope

    steps = check_int("steps", steps, low=1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[str, float, str]] = []
    total = time.perf_counter()
    print(f"clipscope demo: model {model_name!r}, report folder {out.resolve()}", flush=True)
    held: dict[str, Any] = {}

    def load() -> str:
        held["model"] = clipscope.load(model_name, pretrained=pretrained, device=device)
        return repr(held["model"])

    def layers() -> str:
        table = held["model"].layers().to_frame()
        write_text_atomic(out / "layers.csv", table.to_csv(index=False))
        counts = table.groupby(["tower", "layout"]).size()
        return f"{len(table)} sites (" + ", ".join(f"{t}/{l}: {c}" for (t, l), c in counts.items()) + ")"

    def zero_shot() -> str:
        zs = held["zs"] = zero_shot_section(held["model"], out)
        return f"shape accuracy {zs['shape_accuracy']:.1%}, colour accuracy {zs['colour_accuracy']:.1%} on {zs['n']} scenes"

    def atlas() -> str:
        a = held["atlas"] = atlas_section(held["model"], out, steps=steps)
        return "; ".join(f"{s}: {len(u)} units" for s, u in a["sites"].items()) + f" -> {a['index']}"

    def attack() -> str:
        a = held["attack"] = attack_section(held["model"], out)
        rows = [f"{r.defence.split(':')[0]}: accuracy {r.clean_accuracy:.2f} -> {r.attacked_accuracy:.2f}, "
                f"attack success {r.attack_success_rate:.2f}, text detected {r.text_detected_rate:.2f}"
                for r in a["summary"].itertuples()]
        return "; ".join(rows) + f" -> {a['index']}"

    def audit() -> str:
        a = held["audit"] = audit_section(held["model"], out)
        rates = "; ".join(f"{t}: " + ", ".join(f"{g} {v:.2f}" for g, v in r.items()) for t, r in a["rates"].items())
        return f"'thief' rate per group: {rates} -> {a['report']}"

    _timed(parts, "load the model", load)
    _timed(parts, "list hookable layers", layers)
    _timed(parts, "zero-shot on generated scenes", zero_shot)
    _timed(parts, "neuron atlas", atlas)
    _timed(parts, "typographic attack, sweep and defences", attack)
    _timed(parts, "bias audit, two taxonomies", audit)
    index = write_text_atomic(out / "index.html", _index_page(model_name, held, parts,
                                                              time.perf_counter() - total))
    print(f"done in {time.perf_counter() - total:.1f} s; open {index.resolve()}")
    return index


def _index_page(model_name: str, held: dict[str, Any], parts: list[tuple[str, float, str]], total: float) -> str:
    rows = "".join(f"<tr><td>{esc(t)}</td><td>{s:.1f} s</td><td>{esc(m)}</td></tr>"
                   for t, s, m in parts)
    atlas = held["atlas"]
    atlas_rows = "".join(
        f"<li><a href='atlas/{esc(page_name(s))}.html'>{esc(s)}</a>: "
        + ", ".join(f"unit {u} <i>{esc(atlas['labels'][s][u])}</i>" for u in units) + "</li>"
        for s, units in atlas["sites"].items())
    attack = held["attack"]
    audit = held["audit"]
    summary = audit["result"].summary
    columns = ["taxonomy", "outcome", "grouping", "n", "overall", "max_gap", "max_gap_ci_low", "max_gap_ci_high",
               "p_chi2"]
    audit_table = (summary[[c for c in columns if c in summary]].head(12)
                   .to_html(index=False, float_format=lambda v: f"{v:.3g}") if len(summary) else "")
    return page(f"clipscope demo: {model_name}", f"""<p>{esc(repr(held['model']))}; total {total:.1f} s.</p>
<table><tr><th>part</th><th>time</th><th>result</th></tr>{rows}</table>
<h2>1. Zero-shot</h2><img src="zero_shot.png" style="max-width:100%">
<p><a href="zero_shot.csv">zero_shot.csv</a> · <a href="layers.csv">layers.csv</a> (every hookable site, its layout
and shape)</p>
<h2>2. Neuron atlas</h2><p><a href="atlas/index.html">The atlas</a>: per unit, its feature visualization, the
generated scenes that drive it most, the rendered words that drive it most and its CLIP-Dissect label.</p>
<ul>{atlas_rows}</ul>
<h2>3. Typographic attack</h2><p><a href="attack/index.html">The attack report</a>: each object scene gets a wrong
shape's name written on it; accuracy clean vs attacked, per defence, and a sweep over text size.</p>
{_attack_table(attack['summary'])}
<p>Attack: {esc(str(attack['summary']['attack'].iloc[0]))}.</p>
<h2>4. Bias audit</h2><p><a href="audit/report.html">The audit report</a> of the spec
<code>organism_planted_bias.yaml</code> (in the package, and in the repository's <code>audits/</code> to
copy): generated figures of groups A, B and C, carrying the organism's planted cue for "thief" (a bag) on
30% of B's figures and 5% of A's and C's, labelled under two
taxonomies, the second with a neutral "child" class; per-group rates with Wilson score intervals, each
group's difference to the rest with a Newcombe score interval, and the largest gap between groups with a
simultaneous Newcombe score interval (Bonferroni over pairs) that covers 0 when the groups agree.</p>
{audit_table}""")


def _attack_table(summary) -> str:
    frame = summary.drop(columns=["attack", "n_skipped", "mean_cover"], errors="ignore").copy()
    frame["defence"] = frame["defence"].str.split(":").str[0]
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}")
