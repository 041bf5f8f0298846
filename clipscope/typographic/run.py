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
    ablation_site: visual.layer4   # default: the image tower's last block
    ablation_units: 8              # how many text units the ablation defence zeroes
    seed: 0
    out: attack-report
    cache_dir: null            # per-block results of evaluate / sweep (default: OUT/cache): a rerun or a
                               # relaunch after a killed rank computes only what is not there yet

Every key is checked (:func:`check_config`) before the model loads, the sweep before any image is
encoded. Unreadable images are skipped and listed with their reasons in the report and in
``skipped.csv``; per-image CSVs are keyed by each image's path.

``clipscope attack --benchmark CONFIG`` runs the defence benchmark
(:mod:`clipscope.typographic.benchmark`) from its own configuration (:data:`BENCHMARK_CHECKS`,
:func:`run_benchmark_config`): generated attacks on an image folder and public sets, under several
defences, into one table, plot and report.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..data import list_image_files
from ..distributed import Context, context
from ..io import check_writable, figure_png, write_text_atomic
from ..pages import esc, page, png_uri
from ..validate import InvalidArgumentError, check_choice, check_int, check_names
from .attack import Attack
from .benchmark import ABLATION_IMAGES, ABLATION_UNITS, DEFENCE_BUILDERS, AttackSet, benchmark, text_unit_ablation
from .defences import Defence, PromptDefence
from .evaluate import SweepResult, check_attack_data, check_vary, evaluate, sweep
from .render import TextStyle
from .sets import load_materzynska, load_paint, load_rta100, load_scam

FORMATS = {"imagefolder", "paint", "rta100", "scam", "materzynska"}
DEFENCES = ("prompt", "ablation")
_STYLE_KEYS = set(TextStyle.__dataclass_fields__)


def imagefolder(path: str | Path) -> tuple[list[str], list[str]]:
    """Image paths under ``path`` and their labels (the name of each file's parent folder)."""
    files = list_image_files(path)
    if not files:
        raise InvalidArgumentError("data.path", str(path), "a folder with image files (in one sub-folder per class)")
    return [str(f) for f in files], [f.parent.name for f in files]


def build_attack(spec: Mapping[str, Any]) -> Attack:
    """An :class:`Attack` from a config mapping (``mode``, ``target``, ``position`` and style fields)."""
    if not isinstance(spec, Mapping):
        raise InvalidArgumentError("attack", spec, "a mapping of attack settings (mode, target, position, size, ...)")
    unknown = sorted(set(spec) - _STYLE_KEYS - {"mode", "target", "position"})
    if unknown:
        raise InvalidArgumentError("attack", dict(spec), f"unknown attack key(s) {unknown}; valid: "
                                                         f"{sorted(_STYLE_KEYS | {'mode', 'target', 'position'})}")
    style = TextStyle(**{k: v for k, v in spec.items() if k in _STYLE_KEYS})
    mode = spec.get("mode", "targeted" if spec.get("target") else "untargeted")
    return Attack(mode, spec.get("target"), style, spec.get("position", "center"))


def _text(parameter: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(parameter, value, "a non-empty string")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda parameter, value: None if value is None else check(parameter, value)


def _data(parameter: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or "path" not in value:
        raise InvalidArgumentError(parameter, value, "a mapping with path (a folder) and optionally format")
    unknown = sorted(set(value) - {"path", "format"})
    if unknown:
        raise InvalidArgumentError(f"{parameter}.{unknown[0]}", value[unknown[0]], "a known data key: format, path")
    if not isinstance(value["path"], (str, os.PathLike)):
        raise InvalidArgumentError(f"{parameter}.path", value["path"], "a folder path")
    fmt = check_choice(f"{parameter}.format", value.get("format", "imagefolder"), sorted(FORMATS))
    return {"path": value["path"], "format": fmt}


def _defences(parameter: str, value: Any) -> list[str]:
    names = check_names(parameter, value, min_count=0)
    for name in names:
        check_choice(parameter, name, DEFENCES)
    return names


def _mapping(parameter: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(parameter, value, "a mapping")
    return dict(value)


#: One validator per configuration key: ``check(key, value)`` returns the normalized value.
CONFIG_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "model": _text,
    "pretrained": _optional(_text),
    "data": _data,
    "classes": _optional(check_names),
    "templates": lambda p, v: v,  # checked by the model, which knows the template sets
    "attack": _optional(_mapping),
    "sweep": _optional(_mapping),
    "defences": _optional(_defences),
    "ablation_site": _optional(_text),
    "ablation_units": lambda p, v: check_int(p, v, low=1),
    "seed": lambda p, v: check_int(p, v),
    "out": lambda p, v: _text(p, os.fspath(v) if isinstance(v, os.PathLike) else v),
    "cache_dir": _optional(lambda p, v: _text(p, os.fspath(v) if isinstance(v, os.PathLike) else v)),
}
CONFIG_DEFAULTS: dict[str, Any] = {"model": "organism", "pretrained": None, "classes": None, "templates": None,
                                   "attack": None, "sweep": None, "defences": None, "ablation_site": None,
                                   "ablation_units": ABLATION_UNITS, "seed": 0, "out": "attack-report",
                                   "cache_dir": None}


def checked_settings(config: Any, checks: Mapping[str, Callable[[str, Any], Any]], defaults: Mapping[str, Any],
                     what: str, required: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``config`` with ``defaults`` filled in and every key normalized by its ``checks[key](key, value)``;
    :class:`~clipscope.validate.InvalidArgumentError` for a non-mapping (``what`` says what it should hold), the
    first unknown key, a missing ``required`` key (mapped to what is valid for it) or the first bad value."""
    if not isinstance(config, Mapping):
        raise InvalidArgumentError("config", config, f"a mapping of {what}")
    unknown = sorted(set(config) - set(checks))
    if unknown:
        raise InvalidArgumentError(unknown[0], config[unknown[0]], f"a known key: {sorted(checks)}")
    for key, valid in (required or {}).items():
        if key not in config:
            raise InvalidArgumentError(key, None, valid)
    return {key: checks[key](key, value) for key, value in {**defaults, **config}.items()}


def check_config(config: Any) -> dict[str, Any]:
    """Return ``config`` with every key checked and defaults filled in; raise
    :class:`~clipscope.validate.InvalidArgumentError` naming the first bad key and its value."""
    return checked_settings(config, CONFIG_CHECKS, CONFIG_DEFAULTS, "settings (see clipscope.typographic.run)",
                            {"data": "a mapping with path (a folder) and optionally format"})


def _img(png: bytes) -> str:
    return f'<img src="{png_uri(png)}">'


def run_attack_config(config: dict[str, Any], *, progress: bool | None = None, model=None,
                      distributed: bool | None = None) -> Path | None:
    """Run the attack described by ``config`` and write the report; returns the path of ``index.html``.

    ``model``: an already loaded :class:`~clipscope.ClipModel` to use instead of loading
    ``config["model"]``. ``distributed`` (default: detect a launcher such as ``torchrun``): the ranks
    share the images of an image folder (:func:`~clipscope.typographic.evaluate`, :func:`sweep`) and
    rank 0 alone writes the report (a public set is evaluated by rank 0 alone); the other ranks
    write nothing but their cache blocks and return ``None``. The results of every block of images go to
    ``config["cache_dir"]`` (default ``OUT/cache``, created by each rank that needs it) as the block
    completes, so a relaunch after a killed rank computes only the blocks not done.
    """
    import pandas as pd

    import clipscope
    cfg = check_config(config)
    data, fmt = cfg["data"], cfg["data"]["format"]
    ctx = context(distributed)
    out = check_writable(cfg["out"]) if ctx.is_main else None  # before the model loads and any image is attacked
    attack = build_attack(cfg["attack"] or {})
    if fmt != "imagefolder" and not ctx.is_main:
        return None
    if model is None:
        device = str(ctx.device) if ctx.distributed else "auto"
        model = clipscope.load(cfg["model"], pretrained=cfg["pretrained"], device=device)
    if fmt != "imagefolder":
        sections, tables = _public_set(model, cfg, out, progress)
    else:
        results, swept, skipped = _attack_folder(model, cfg, attack, progress, ctx)
        if not ctx.is_main:
            return None
        sections, tables = _folder_report(results, swept, skipped, out)
    summary = pd.concat(tables, ignore_index=True)
    write_text_atomic(out / "summary.csv", summary.to_csv(index=False))
    body = f"<p>model: {esc(repr(model))}<br>data: {esc(data['path'])} ({esc(fmt)})</p>{''.join(sections)}"
    return write_text_atomic(out / "index.html", page("Typographic attack report", body))


def _public_set(model, cfg: dict[str, Any], out: Path, progress: bool | None) -> tuple[list[str], list]:
    """Evaluate a public attack set; returns the report sections and summary tables."""
    import pandas as pd
    loader = {"paint": load_paint, "rta100": load_rta100, "scam": load_scam,
              "materzynska": load_materzynska}[cfg["data"]["format"]]
    tset = loader(cfg["data"]["path"])
    frame, metrics = tset.evaluate(model, cfg["classes"], templates=cfg["templates"], progress=progress)
    write_text_atomic(out / "predictions.csv", frame.drop(columns=["image"]).astype(str).to_csv(index=False))
    table = pd.DataFrame([{"set": tset.name, **metrics}])
    section = (f"<h2>{esc(tset.name)} set</h2>{table.to_html(index=False)}"
               f"{_skipped_html(tset.skipped, 'entries')}")
    _write_skipped(out, tset.skipped)
    return [section], [table]


def _attack_folder(model, cfg: dict[str, Any], attack: Attack, progress: bool | None,
                   ctx: Context) -> tuple[list[tuple[Defence, Any]], SweepResult | None, list]:
    """Attack an image folder under every defence (and sweep), the ranks sharing the images; returns
    ``[(defence, AttackResult)]``, the sweep (or ``None``) and the skipped images, on every rank."""
    images, labels = imagefolder(cfg["data"]["path"])
    classes, labels = check_attack_data(images, labels, cfg["classes"] or sorted(set(labels)), attack)
    vary = check_vary(attack, classes, cfg["sweep"]) if cfg["sweep"] else None
    defences = [Defence()] + [_defence(model, name, cfg, images, classes) for name in cfg["defences"] or []]
    seed, templates, dist = cfg["seed"], cfg["templates"], ctx.distributed
    cache = cfg["cache_dir"] or Path(cfg["out"]) / "cache"
    results = [(defence, evaluate(model, images, labels, classes, attack, defence=defence, templates=templates,
                                  seed=seed, progress=progress, distributed=dist, cache_dir=cache))
               for defence in defences]
    swept = sweep(model, images, labels, classes, attack, vary, templates=templates, seed=seed, progress=progress,
                  distributed=dist, cache_dir=cache) if vary else None
    return results, swept, results[-1][1].skipped


def _folder_report(results: list[tuple[Defence, Any]], swept: SweepResult | None, skipped: list,
                   out: Path) -> tuple[list[str], list]:
    """Write the per-image and sweep CSVs of an image folder's attack; returns the report sections and the
    summary tables."""
    sections, tables = [], []
    for defence, result in results:
        tables.append(result.summary())
        sections.append(f"<h2>{esc(result.defence)}</h2>{result._repr_html_()}{_img(figure_png(result.plot()))}"
                        f"<h3>Per class</h3>{result.per_class().to_html(float_format='{:.3f}'.format)}")
        write_text_atomic(out / f"images_{defence.name}.csv", result.frame.to_csv(index=False))
    if swept is not None:
        write_text_atomic(out / "sweep.csv", swept.frame.to_csv(index=False))
        sections.append(f"<h2>Sweep</h2>{_img(figure_png(swept.plot()))}{swept._repr_html_()}")
    sections.append(_skipped_html(skipped, "image(s)"))
    _write_skipped(out, skipped)
    return sections, tables


def _defence(model, name: str, cfg: dict[str, Any], images: list[str], classes: list[str]) -> Defence:
    """The defence called ``name``; the ablation defence finds its text units on the first readable images."""
    if name == "prompt":
        return PromptDefence()
    return text_unit_ablation(model, images, [], classes, seed=cfg["seed"], site=cfg["ablation_site"],
                              units=cfg["ablation_units"], n_images=ABLATION_IMAGES)


def _skipped_html(skipped: list[tuple[Any, str]], what: str) -> str:
    """A report section listing the skipped items with their reasons."""
    items = "".join(f"<li>{esc(k)}: {esc(r)}</li>" for k, r in skipped)
    return f"<h2>Skipped {what}</h2><p>{len(skipped)} {what} skipped (unreadable)</p><ul>{items}</ul>"


def _write_skipped(out: Path, skipped: list[tuple[Any, str]]) -> None:
    """``skipped.csv``: one row per skipped item, its key (path) and the reason."""
    import pandas as pd
    write_text_atomic(out / "skipped.csv", pd.DataFrame(skipped, columns=["key", "reason"]).to_csv(index=False))


# ---------------------------------------------------------------------------------------------------
# ``clipscope attack --benchmark CONFIG``: attack sets x defences (clipscope.typographic.benchmark)

#: Formats of the public sets a benchmark configuration may list under ``sets``.
SET_LOADERS = {"paint": load_paint, "rta100": load_rta100, "scam": load_scam, "materzynska": load_materzynska}


def _folder_data(parameter: str, value: Any) -> dict[str, Any]:
    data = _data(parameter, value)
    if data["format"] != "imagefolder":
        raise InvalidArgumentError(f"{parameter}.format", data["format"], "imagefolder (public sets go under sets)")
    return data


def _attack_list(parameter: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, Mapping) or not isinstance(value, list) or not value:
        raise InvalidArgumentError(parameter, value, "a non-empty list of attack settings (mode, target, size, ...)")
    for i, spec in enumerate(value):
        build_attack(spec if isinstance(spec, Mapping) else _mapping(f"{parameter}[{i}]", spec))
    return [dict(spec) for spec in value]


def _set_list(parameter: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, Mapping) or not isinstance(value, list):
        raise InvalidArgumentError(parameter, value, "a list of public sets, each {format: ..., path: ...}")
    out = []
    for i, spec in enumerate(value):
        data = _data(f"{parameter}[{i}]", spec)
        check_choice(f"{parameter}[{i}].format", data["format"], sorted(SET_LOADERS))
        out.append(data)
    return out


def _defence_names(parameter: str, value: Any) -> list[str]:
    names = check_names(parameter, value)
    for name in names:
        check_choice(parameter, name, sorted(DEFENCE_BUILDERS))
    return names


#: One validator per key of a benchmark configuration (YAML), as :data:`CONFIG_CHECKS` for one attack::
#:
#:     model: organism-vit
#:     data: {path: photos/}                 # image folder (one sub-folder per class) for generated attacks
#:     attacks: [{mode: untargeted, size: 0.25}, {target: ipod, position: fixed8:0}]
#:     sets: [{format: scam, path: scam/}, {format: paint, path: paint/}]
#:     defences: [none, prompt, ablation, head_ablation, projection]
#:     defence_options: {ablation: {units: 8}, projection: {steps: 200}}
#:     fit_data: {path: fit-photos/}         # images the defences are fitted on (default: data)
BENCHMARK_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "model": _text,
    "pretrained": _optional(_text),
    "data": _optional(_folder_data),
    "classes": _optional(check_names),
    "templates": lambda p, v: v,
    "attacks": _optional(_attack_list),
    "sets": _optional(_set_list),
    "defences": _defence_names,
    "defence_options": _optional(_mapping),
    "fit_data": _optional(_folder_data),
    "batch_size": lambda p, v: check_int(p, v, low=1),
    "seed": lambda p, v: check_int(p, v),
    "out": lambda p, v: _text(p, os.fspath(v) if isinstance(v, os.PathLike) else v),
}
BENCHMARK_DEFAULTS: dict[str, Any] = {"model": "organism", "pretrained": None, "data": None, "classes": None,
                                      "templates": None, "attacks": None, "sets": None,
                                      "defences": ["none", "prompt", "ablation"], "defence_options": None,
                                      "fit_data": None, "batch_size": 32, "seed": 0, "out": "benchmark-report"}


def check_benchmark_config(config: Any) -> dict[str, Any]:
    """Return the benchmark ``config`` with every key checked and defaults filled in; raise
    :class:`~clipscope.validate.InvalidArgumentError` naming the first bad key and its value."""
    cfg = checked_settings(config, BENCHMARK_CHECKS, BENCHMARK_DEFAULTS, "benchmark settings (see BENCHMARK_CHECKS)")
    if cfg["data"] is None and not cfg["sets"]:
        raise InvalidArgumentError("data", None, "an image folder for generated attacks, or public sets under sets")
    if cfg["attacks"] and cfg["data"] is None:
        raise InvalidArgumentError("attacks", cfg["attacks"], "no generated attacks without data (an image folder)")
    return cfg


def run_benchmark_config(config: dict[str, Any], *, progress: bool | None = None, model=None) -> Path:
    """Run the defence benchmark described by ``config`` and write its report folder (``index.html``,
    ``benchmark.csv``, ``skipped.csv``); returns the path of ``index.html``. ``model``: an already loaded
    :class:`~clipscope.ClipModel` to use instead of loading ``config["model"]``."""
    import clipscope
    cfg = check_benchmark_config(config)
    out = check_writable(cfg["out"])  # before the model loads and any image is attacked
    attacks: list = []
    images = labels = classes = None
    if cfg["data"] is not None:
        images, labels = imagefolder(cfg["data"]["path"])
        classes = cfg["classes"] or sorted(set(labels))
        attacks += [AttackSet.generated(build_attack(spec)) for spec in cfg["attacks"] or [{}]]
    attacks += [SET_LOADERS[spec["format"]](spec["path"]) for spec in cfg["sets"] or []]
    fit_images, fit_labels = imagefolder(cfg["fit_data"]["path"]) if cfg["fit_data"] else (None, None)
    if model is None:
        model = clipscope.load(cfg["model"], pretrained=cfg["pretrained"])
    result = benchmark(model, images, labels, classes, attacks=attacks, defences=cfg["defences"],
                       fit_images=fit_images, fit_labels=fit_labels, defence_options=cfg["defence_options"],
                       templates=cfg["templates"], batch_size=cfg["batch_size"], seed=cfg["seed"], progress=progress)
    return result.save(out)
