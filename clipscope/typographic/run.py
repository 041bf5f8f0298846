"""``clipscope attack``: run an attack (plus sweep and defences) over a folder from a YAML file or flags,
and write a self-contained report folder.

Configuration keys (YAML or flags; flags win)::

    model: organism            # any clipscope.load name; pretrained: TAG
    data: {path: photos/, format: imagefolder}   # or paint, rta100, scam, materzynska
    classes: [apple, ipod]     # default: the folder's labels (and written texts)
    templates: null            # a template list or set name
    attack: {mode: targeted, target: ipod, size: 0.2, position: center, colour: black, box: white}
    sweep: {size: [0.1, 0.2, 0.3]}
    defences: [prompt, ablation]   # ablation finds text units at `ablation_site`
    ablation_site: visual.layer4.0
    seed: 0
    out: attack-report
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ..data import list_image_files
from ..io import figure_png, write_text_atomic
from .attack import Attack
from .defences import AblationDefence, Defence, PromptDefence, find_text_units
from .evaluate import SweepResult, evaluate, sweep
from .render import TextStyle
from .sets import load_materzynska, load_paint, load_rta100, load_scam

FORMATS = {"imagefolder", "paint", "rta100", "scam", "materzynska"}
_STYLE_KEYS = set(TextStyle.__dataclass_fields__)


def imagefolder(path: str | Path) -> tuple[list[str], list[str]]:
    """Image paths under ``path`` and their labels (the name of each file's parent folder)."""
    files = list_image_files(path)
    if not files:
        raise ValueError(f"no images under {str(path)!r}")
    return [str(f) for f in files], [f.parent.name for f in files]


def build_attack(spec: dict[str, Any]) -> Attack:
    """An :class:`Attack` from a config mapping (``mode``, ``target``, ``position`` and style fields)."""
    unknown = set(spec) - _STYLE_KEYS - {"mode", "target", "position"}
    if unknown:
        raise ValueError(f"unknown attack key(s) {sorted(unknown)}; valid: "
                         f"{sorted(_STYLE_KEYS | {'mode', 'target', 'position'})}")
    style = TextStyle(**{k: v for k, v in spec.items() if k in _STYLE_KEYS})
    position = spec.get("position", "center")
    if isinstance(position, list):
        position = tuple(position)
    mode = spec.get("mode", "targeted" if spec.get("target") else "untargeted")
    return Attack(mode, spec.get("target"), style, position)


def _img(png: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" style="max-width:100%">'


def run_attack_config(config: dict[str, Any], *, progress: bool | None = None, model=None) -> Path:
    """Run the attack described by ``config`` and write the report; returns the path of ``index.html``.

    ``model``: an already loaded :class:`~clipscope.ClipModel` to use instead of loading
    ``config["model"]``.
    """
    import pandas as pd

    import clipscope
    cfg = dict(config)
    data = cfg.get("data") or {}
    if "path" not in data:
        raise ValueError("config needs data.path (a folder)")
    fmt = data.get("format", "imagefolder")
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; valid: {sorted(FORMATS)}")
    out = Path(cfg.get("out", "attack-report"))
    if model is None:
        model = clipscope.load(cfg.get("model", "organism"), pretrained=cfg.get("pretrained"))
    templates = cfg.get("templates")
    seed = int(cfg.get("seed", 0))
    sections: list[str] = []
    tables: list[pd.DataFrame] = []

    if fmt != "imagefolder":
        loader = {"paint": load_paint, "rta100": load_rta100, "scam": load_scam,
                  "materzynska": load_materzynska}[fmt]
        tset = loader(data["path"])
        frame, metrics = tset.evaluate(model, cfg.get("classes"), templates=templates, progress=progress)
        write_text_atomic(out / "predictions.csv", frame.drop(columns=["image"]).astype(str).to_csv(index=False))
        tables.append(pd.DataFrame([{"set": tset.name, **metrics}]))
        skipped = "".join(f"<li>{html.escape(str(k))}: {html.escape(r)}</li>" for k, r in tset.skipped)
        sections.append(f"<h2>{html.escape(tset.name)} set</h2>{tables[-1].to_html(index=False)}"
                        f"<p>{len(tset.skipped)} entries skipped</p><ul>{skipped}</ul>")
    else:
        images, labels = imagefolder(data["path"])
        classes = list(cfg.get("classes") or sorted(set(labels)))
        attack = build_attack(cfg.get("attack") or {})
        defences: list[Defence] = [Defence()]
        for name in cfg.get("defences") or []:
            if name == "prompt":
                defences.append(PromptDefence())
            elif name == "ablation":
                site = cfg.get("ablation_site")
                if not site:
                    raise ValueError("the ablation defence needs ablation_site (a site name from model.layers())")
                from PIL import Image
                found = find_text_units(model, site, [Image.open(p).convert("RGB") for p in images[:32]],
                                        classes, k=int(cfg.get("ablation_units", 8)), seed=seed)
                defences.append(AblationDefence(found.units))
            else:
                raise ValueError(f"unknown defence {name!r}; valid: 'prompt', 'ablation'")
        for defence in defences:
            result = evaluate(model, images, labels, classes, attack, defence=defence, templates=templates,
                              seed=seed, progress=progress)
            tables.append(result.summary())
            sections.append(f"<h2>{html.escape(result.defence)}</h2>{result._repr_html_()}{_img(figure_png(result.plot()))}"
                            f"<h3>Per class</h3>{result.per_class().to_html(float_format='{:.3f}'.format)}")
            write_text_atomic(out / f"images_{defence.name}.csv", result.frame.to_csv(index=False))
        if cfg.get("sweep"):
            result: SweepResult = sweep(model, images, labels, classes, attack, cfg["sweep"], templates=templates,
                                        seed=seed, progress=progress)
            write_text_atomic(out / "sweep.csv", result.frame.to_csv(index=False))
            sections.append(f"<h2>Sweep</h2>{_img(figure_png(result.plot()))}{result._repr_html_()}")
    summary = pd.concat(tables, ignore_index=True)
    write_text_atomic(out / "summary.csv", summary.to_csv(index=False))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>typographic attack report</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:3px 8px}}</style>"
            f"</head><body><h1>Typographic attack report</h1><p>model: {html.escape(repr(model))}<br>"
            f"data: {html.escape(str(data['path']))} ({html.escape(fmt)})</p>{''.join(sections)}</body></html>")
    return write_text_atomic(out / "index.html", page)
