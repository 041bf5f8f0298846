"""One defence benchmark: attack sets x defences -> clean accuracy, attacked accuracy and attack success,
each with a Wilson 95% interval, in one table, one plot and one HTML report.

**Attack sets** (:class:`AttackSet`): attacks generated on an image set with an
:class:`~clipscope.typographic.Attack` (:meth:`AttackSet.generated`, evaluated by
:func:`~clipscope.typographic.evaluate`, so its figures are exactly those of the harness), and the
public sets loaded by :mod:`clipscope.typographic.sets` (:meth:`AttackSet.public`: PAINT, RTA-100,
Materzynska, and SCAM with one row per attacked variant, SCAM and SynthSCAM, whose clean accuracy
comes from the NoSCAM images). On a public set the attacked images are all there is: attack success is
the share of attacked images predicted as their written text (among those whose text is a class),
and clean accuracy is measured on the set's unattacked images where it has some (else NaN).

**Defences** come from a registry of builders (:data:`DEFENCE_BUILDERS`, name -> callable, extended
with :func:`register_defence`): ``none``, ``prompt`` (:class:`~clipscope.typographic.PromptDefence`),
``ablation`` (zeroing the text units of the image tower's last block,
:func:`~clipscope.typographic.find_text_units`), ``head_ablation`` (Dyslexify's
:class:`~clipscope.typographic.circuit.HeadAblationDefence`, ViTs only: on a model without attention
heads its cells say "not applicable"), ``projection`` (Materzynska et al.'s
:class:`~clipscope.typographic.projection.ProjectionDefence`) and ``sae_features`` (suppressing the text
features of a sparse autoencoder given as the option ``sae``, a folder or a
:class:`~clipscope.sae.SparseAutoencoder`: :class:`~clipscope.typographic.defences.SAEFeatureDefence`, or a
folder written by :meth:`SAEFeatureDefence.save <clipscope.typographic.defences.SAEFeatureDefence.save>`, whose
features are used as saved; without one its cells say "not applicable"). A ready :class:`Defence` object may be
given instead of a name. Every builder gets the images the defences are fitted on (``fit_images``,
by default the evaluation images) and their labels.

Intervals: Wilson score intervals (Wilson 1927; :func:`clipscope.audit.metrics.wilson`) of each
proportion, over the images it is defined on. The time each defence adds is reported as its fitting
time and its evaluation time per image (rendering, clean and attacked encoding), to be compared with
the ``none`` row of the same attack set.
"""
from __future__ import annotations

import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audit.metrics import wilson
from ..data import ImageLoadError, iter_images
from ..io import check_writable, figure_png, write_text_atomic
from ..pages import esc, page, png_uri
from ..progress import progress_bar
from ..validate import InvalidArgumentError, check_int, check_names
from ..model import ClipModel
from .attack import Attack
from .circuit import HeadAblationDefence
from .defences import SAE_DEFENCE_FILE, AblationDefence, Defence, PromptDefence, SAEFeatureDefence, find_text_units
from .evaluate import TEXT, clean_scores, evaluate
from .projection import ProjectionDefence
from .sets import TypographicSet

#: How many text units the unit-ablation defence zeroes by default, and on how many images it finds them.
ABLATION_UNITS = 8
ABLATION_IMAGES = 32


#: Text features the ``sae_features`` defence suppresses by default: on the ResNet organism (a 1,024-feature
#: TopK SAE of its last stage) 48 cut attack success 0.53 -> 0.18, 16 only to 0.28 (tests/test_sae_defence.py).
SAE_FEATURES = 48


class NotApplicable(Exception):
    """Raised by a defence builder when its defence cannot apply to the model (e.g. head ablation on a
    ResNet); the benchmark records ``"not applicable: <reason>"`` in that defence's cells."""


# ---------------------------------------------------------------------------------------------------
# attack sets


@dataclass(frozen=True)
class AttackSet:
    """One row group of the benchmark: a generated ``attack`` (on the benchmark's images) or a loaded public
    ``tset`` (optionally one ``variant`` of its ``variant`` column, e.g. SCAM's ``"SynthSCAM"``)."""

    name: str
    attack: Attack | None = None
    tset: TypographicSet | None = field(default=None, compare=False)
    variant: str | None = None

    @classmethod
    def generated(cls, attack: Attack, name: str | None = None) -> "AttackSet":
        """Attacks generated with ``attack`` on the benchmark's images."""
        if not isinstance(attack, Attack):
            raise InvalidArgumentError("attack", attack, "an Attack (Attack.untargeted(), Attack.targeted(...))")
        if name is None:
            target = f" {attack.target!r}" if attack.target is not None else ""
            name = f"generated {attack.mode}{target} (size {attack.style.size}, {attack.position})"
        return cls(name, attack)

    @classmethod
    def public(cls, tset: TypographicSet) -> list["AttackSet"]:
        """One attack set per attacked variant of a loaded public set (SCAM: SCAM and SynthSCAM), else one."""
        if not isinstance(tset, TypographicSet):
            raise InvalidArgumentError("tset", tset, "a TypographicSet (load_paint, load_rta100, load_scam, ...)")
        if "variant" in tset.frame.columns:
            attacked = tset.frame[tset.frame["attacked"]]
            variants = sorted(set(attacked["variant"]))
            if variants:
                return [cls(f"{tset.name}: {v}", None, tset, v) for v in variants]
        return [cls(tset.name, None, tset)]

    def describe(self) -> str:
        if self.attack is not None:
            return self.attack.describe()
        n = len(self.tset.frame)
        variant = f", variant {self.variant}" if self.variant else ""
        return f"public set {self.tset.name} ({n} images{variant})"


def check_attack_sets(attacks: Any) -> list[AttackSet]:
    """``attacks`` (Attacks, AttackSets or loaded TypographicSets, mixed) as a list of :class:`AttackSet` with
    unique names; else :class:`~clipscope.validate.InvalidArgumentError`."""
    if isinstance(attacks, (Attack, AttackSet, TypographicSet)):
        attacks = [attacks]
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, Sequence) or not attacks:
        raise InvalidArgumentError("attacks", attacks, "a non-empty list of Attacks, AttackSets or TypographicSets")
    out: list[AttackSet] = []
    for a in attacks:
        if isinstance(a, Attack):
            out.append(AttackSet.generated(a))
        elif isinstance(a, TypographicSet):
            out += AttackSet.public(a)
        elif isinstance(a, AttackSet):
            out.append(a)
        else:
            raise InvalidArgumentError("attacks", a, "an Attack, AttackSet or TypographicSet")
    names = [a.name for a in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidArgumentError("attacks", dup, "attack sets with unique names (give AttackSet.generated a name)")
    return out


# ---------------------------------------------------------------------------------------------------
# defence registry

#: ``builder(model, images, labels, classes, *, seed, templates, progress, **options) -> Defence``.
DefenceBuilder = Callable[..., Defence]


def ablation_site(model, site: str | None) -> str:
    """``site``, or by default the image tower's last block, if it is an image-tower site of ``model``."""
    valid = "an image-tower site from model.layers() (default: the image tower's last block)"
    if site is None:
        blocks = model.layers().blocks().names()
        if not blocks:
            raise InvalidArgumentError("ablation_site", None, f"{valid}; this model has no blocks to default to")
        return blocks[-1]
    try:
        tower = model.site(site).tower
    except InvalidArgumentError as exc:
        raise InvalidArgumentError("ablation_site", site, exc.valid) from None
    if tower != "visual":
        raise InvalidArgumentError("ablation_site", site, valid)
    return site


def text_unit_ablation(model, images: Sequence, labels: Sequence[str], classes: Sequence[str], *, seed: int = 0,
                       templates=None, progress: bool | None = None, site: str | None = None,
                       units: int = ABLATION_UNITS, n_images: int = ABLATION_IMAGES) -> AblationDefence:
    """The unit-ablation defence: the ``units`` units of ``site`` (default: the image tower's last block) that
    respond most to the class names rendered on the first ``n_images`` readable ``images``
    (:func:`~clipscope.typographic.find_text_units`), zeroed."""
    units = check_int("units", units, low=1)
    site = ablation_site(model, site)
    readable = list(itertools.islice((im for _, im in iter_images(images) if not isinstance(im, ImageLoadError)),
                                     n_images))
    found = find_text_units(model, site, readable, list(classes), k=units, seed=seed)
    return AblationDefence(found.units)


def _none(model, images, labels, classes, **_) -> Defence:
    return Defence()


def _prompt(model, images, labels, classes, *, seed=0, templates=None, progress=None, **options) -> Defence:
    return PromptDefence(**options)


def _head_ablation(model, images, labels, classes, *, seed=0, templates=None, progress=None, **options) -> Defence:
    _needs_weights(model, "head ablation")
    if model.head_count("visual") == 0:
        raise NotApplicable("head ablation needs attention heads in the image tower (a ViT); "
                            f"{model.name} has none")
    return HeadAblationDefence.fit(model, list(images), list(labels), list(classes), templates=templates,
                                   seed=seed, progress=progress, **options)


def _projection(model, images, labels, classes, *, seed=0, templates=None, progress=None, **options) -> Defence:
    _needs_weights(model, "the projection defence")
    return ProjectionDefence.fit(model, list(images), list(labels), list(classes), templates=templates, seed=seed,
                                 progress=progress, **options)


def _unit_ablation(model, images, labels, classes, **options) -> Defence:
    _needs_weights(model, "unit ablation")
    return text_unit_ablation(model, images, labels, classes, **options)


def _sae_features(model, images, labels, classes, *, seed=0, templates=None, progress=None, sae=None,
                  features: int = SAE_FEATURES, n_images: int = ABLATION_IMAGES) -> Defence:
    _needs_weights(model, "the SAE feature defence")
    if sae is None:
        raise NotApplicable("the SAE feature defence needs a sparse autoencoder of an image-tower site: give the "
                            "option sae=FOLDER (saved by SparseAutoencoder.save, clipscope.sae.train_sae trains "
                            "one; or a defence saved by SAEFeatureDefence.save)")
    if isinstance(sae, (str, Path)) and (Path(sae) / SAE_DEFENCE_FILE).is_file():
        return SAEFeatureDefence.load(sae, model)
    if isinstance(sae, (str, Path)):
        from ..sae import SparseAutoencoder
        sae = SparseAutoencoder.load(sae)
    readable = list(itertools.islice((im for _, im in iter_images(images) if not isinstance(im, ImageLoadError)),
                                     check_int("n_images", n_images, low=2)))
    return SAEFeatureDefence.fit(model, readable, list(classes), sae, k=check_int("features", features, low=1),
                                 seed=seed)


def _needs_weights(model, defence: str) -> None:
    """Raise :class:`NotApplicable` for a model without weights and hooks (a black-box endpoint)."""
    if not isinstance(model, ClipModel):
        raise NotApplicable(f"{defence} needs the model's weights and hooks; {model!r} is a black box")


#: The defences the benchmark builds by name; extend with :func:`register_defence`.
DEFENCE_BUILDERS: dict[str, DefenceBuilder] = {"none": _none, "prompt": _prompt, "ablation": _unit_ablation,
                                               "head_ablation": _head_ablation, "projection": _projection,
                                               "sae_features": _sae_features}


def register_defence(name: str, builder: DefenceBuilder) -> None:
    """Make ``builder`` available to :func:`benchmark` (and the CLI's ``defences``) as ``name``."""
    check_names("name", [name])
    if not callable(builder):
        raise InvalidArgumentError("builder", builder, "a callable (model, images, labels, classes, *, seed, "
                                                       "templates, progress, **options) -> Defence")
    DEFENCE_BUILDERS[name] = builder


def check_defences(defences: Any) -> list[str | Defence]:
    """``defences`` (names of :data:`DEFENCE_BUILDERS` or :class:`Defence` objects) as a list; else
    :class:`~clipscope.validate.InvalidArgumentError`."""
    if isinstance(defences, (str, Defence)):
        defences = [defences]
    if isinstance(defences, (bytes, Mapping)) or not isinstance(defences, Sequence) or not defences:
        raise InvalidArgumentError("defences", defences, "a non-empty list of defence names "
                                                         f"{sorted(DEFENCE_BUILDERS)} or Defence objects")
    out, seen = [], set()
    for d in defences:
        if isinstance(d, str):
            if d not in DEFENCE_BUILDERS:
                raise InvalidArgumentError("defences", d, f"one of {sorted(DEFENCE_BUILDERS)} or a Defence object")
        elif not isinstance(d, Defence):
            raise InvalidArgumentError("defences", d, f"a defence name ({sorted(DEFENCE_BUILDERS)}) or a Defence")
        label = d if isinstance(d, str) else d.name
        if label in seen:
            raise InvalidArgumentError("defences", label, "defences with unique names")
        seen.add(label)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------
# the benchmark

COLUMNS = ("attack_set", "defence", "status", "n", "clean_accuracy", "clean_low", "clean_high", "attacked_accuracy",
           "attacked_low", "attacked_high", "attack_success", "success_low", "success_high", "n_success",
           "text_detected_rate", "fit_seconds", "ms_per_image")


def _rate(values) -> tuple[float, float, float, int]:
    """``(proportion, wilson low, wilson high, n)`` of the 0/1 ``values`` that are not NaN."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if not arr.size:
        return math.nan, math.nan, math.nan, 0
    k = int(arr.sum())
    lo, hi = wilson(k, arr.size)
    return k / arr.size, lo, hi, int(arr.size)


def _cells(clean, attacked, success, detected: float, n: int) -> dict:
    c, cl, ch, _ = _rate(clean)
    a, al, ah, _ = _rate(attacked)
    s, sl, sh, ns = _rate(success)
    return {"n": n, "clean_accuracy": c, "clean_low": cl, "clean_high": ch, "attacked_accuracy": a,
            "attacked_low": al, "attacked_high": ah, "attack_success": s, "success_low": sl, "success_high": sh,
            "n_success": ns, "text_detected_rate": detected}


@dataclass
class BenchmarkResult:
    """The benchmark's table (``frame``: one row per attack set and defence, :data:`COLUMNS`; proportions in
    [0, 1], ``*_low``/``*_high`` their Wilson 95% intervals, ``status`` ``"ok"`` or ``"not applicable: ..."``),
    the descriptions of the attack sets and defences, each run's :class:`~clipscope.typographic.AttackResult`
    (``results[(attack set, defence)]``, generated sets only) and the skipped images."""

    frame: Any
    attacks: dict[str, str]
    defences: dict[str, str]
    model: str
    results: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    def to_frame(self):
        """The table (see the class docstring)."""
        return self.frame

    def plot(self):
        """Attacked accuracy (clean accuracy as black ticks) and attack success per attack set, one bar per
        defence, with Wilson 95% intervals; cells that do not apply are marked "n/a". Returns the figure."""
        import matplotlib.pyplot as plt
        f = self.frame
        sets, defences = list(dict.fromkeys(f["attack_set"])), list(dict.fromkeys(f["defence"]))
        fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.4 * len(sets) + 3), 3.8), sharey=True)
        width = 0.8 / max(1, len(defences))
        colours = plt.get_cmap("tab10")
        for ax, (metric, low, high, title) in zip(axes, (
                ("attacked_accuracy", "attacked_low", "attacked_high", "attacked accuracy (| clean)"),
                ("attack_success", "success_low", "success_high", "attack success"))):
            for j, d in enumerate(defences):
                for i, s in enumerate(sets):
                    row = f[(f["attack_set"] == s) & (f["defence"] == d)].iloc[0]
                    x = i - 0.4 + width * (j + 0.5)
                    if row["status"] != "ok":
                        ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
                        continue
                    v = row[metric]
                    if not math.isnan(v):
                        ax.bar(x, v, width, color=colours(j % 10), label=d if i == 0 else None,
                               yerr=[[max(0.0, v - row[low])], [max(0.0, row[high] - v)]], capsize=2)
                    if metric == "attacked_accuracy" and not math.isnan(row["clean_accuracy"]):
                        ax.plot([x - width / 2, x + width / 2], [row["clean_accuracy"]] * 2, color="black", lw=1.5)
            ax.set_xticks(range(len(sets)), [s if len(s) <= 28 else s[:26] + "..." for s in sets], rotation=20,
                          ha="right", fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.set_title(title, fontsize=9)
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[1].get_legend_handles_labels()
        if handles:
            axes[1].legend(handles, labels, fontsize=7, title="defence", title_fontsize=7)
        fig.suptitle(f"Typographic defence benchmark: {self.model}", fontsize=10)
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        return self.frame.to_html(index=False, float_format="{:.3f}".format, na_rep="")

    def to_html(self) -> str:
        """A self-contained report page: the table, the plot, what each attack set and defence is."""
        attacks = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in self.attacks.items())
        defences = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in self.defences.items())
        skipped = "".join(f"<li>{esc(k)}: {esc(r)}</li>" for k, r in self.skipped)
        body = (f"<p>model: {esc(self.model)}. Proportions with Wilson 95% intervals; attack success among images "
                f"whose clean top-1 is not the written class (generated sets; Goh et al. 2021 divide by all images) "
                f"or the share predicted as the written text (public sets).</p>"
                f"{self._repr_html_()}<img src=\"{png_uri(figure_png(self.plot()))}\">"
                f"<h2>Attack sets</h2><ul>{attacks}</ul><h2>Defences</h2><ul>{defences}</ul>"
                f"<h2>Skipped images</h2><p>{len(self.skipped)} unreadable image(s) skipped</p><ul>{skipped}</ul>")
        return page("Typographic defence benchmark", body)

    def save(self, folder: str | Path) -> Path:
        """Write ``index.html``, ``benchmark.csv`` and ``skipped.csv`` to ``folder`` atomically; returns the
        path of ``index.html``."""
        import pandas as pd
        folder = check_writable(folder)
        write_text_atomic(Path(folder) / "benchmark.csv", self.frame.to_csv(index=False))
        write_text_atomic(Path(folder) / "skipped.csv",
                          pd.DataFrame(self.skipped, columns=["key", "reason"]).to_csv(index=False))
        return write_text_atomic(Path(folder) / "index.html", self.to_html())


def benchmark(model, images: Any = None, labels: Sequence[str | None] | None = None,
              classes: Sequence[str] | None = None, *, attacks: Any = None,
              defences: Sequence[str | Defence] = ("none", "prompt", "ablation"), fit_images: Any = None,
              fit_labels: Sequence[str] | None = None, defence_options: Mapping[str, Mapping] | None = None,
              fit_count: int = 256, templates: str | Sequence[str] | None = None, batch_size: int = 32,
              seed: int = 0, progress: bool | None = None) -> BenchmarkResult:
    """Every attack set under every defence; returns a :class:`BenchmarkResult`.

    ``images`` / ``labels`` / ``classes``: the image set generated attacks are written on (any source
    :func:`~clipscope.typographic.evaluate` takes; ``images`` must be re-iterable) and its class list;
    ``attacks``: Attacks, :class:`AttackSet` objects or loaded public sets (default: one untargeted
    attack in the default style). ``defences``: names of :data:`DEFENCE_BUILDERS` or :class:`Defence`
    objects; builders are fitted on at most ``fit_count`` readable images drawn with ``seed`` from
    ``fit_images`` / ``fit_labels`` (default: the evaluation images, with a warning: the figures are then
    in-sample), with ``defence_options[name]``
    as keyword arguments. The ``none`` rows of generated sets
    are :func:`~clipscope.typographic.evaluate`'s own figures.
    """
    sets = check_attack_sets(attacks if attacks is not None else [Attack.untargeted()])
    names = check_defences(defences)
    batch_size, seed = check_int("batch_size", batch_size, low=1), check_int("seed", seed)
    options = dict(defence_options or {})
    for key, value in options.items():
        if key not in DEFENCE_BUILDERS or not isinstance(value, Mapping):
            raise InvalidArgumentError(f"defence_options[{key!r}]", value,
                                       f"a mapping of keyword arguments for a defence of {sorted(DEFENCE_BUILDERS)}")
    generated = [s for s in sets if s.attack is not None]
    if generated:
        if images is None or labels is None or classes is None:
            raise InvalidArgumentError("images", images, "images, labels and classes for the generated attacks")
        if iter(images) is images:
            raise InvalidArgumentError("images", images, "a re-iterable source (a list, folder or data set)")
        classes = check_names("classes", classes)
        labels = list(labels)
    fit_count = check_int("fit_count", fit_count, low=1)
    fit_classes = classes if classes is not None else sorted({c for s in sets if s.tset is not None
                                                              for c in s.tset.classes})
    if fit_images is None:
        fitted = [d for d in names if isinstance(d, str) and d not in ("none", "prompt")]
        if fitted:
            warnings.warn(f"benchmark: the defences {fitted} are fitted on the evaluation images (in-sample "
                          "figures); pass fit_images / fit_labels from a separate set", UserWarning, stacklevel=2)
        fit_images, fit_labels = images, labels
    fit_images, fit_labels = fit_sample(fit_images, fit_labels, fit_count, seed)
    rows, results, described, skipped = [], {}, {}, []
    for d in progress_bar(names, progress, True, "defences", total=len(names)):
        label = d if isinstance(d, str) else d.name
        start = time.perf_counter()
        try:
            defence = d if isinstance(d, Defence) else _build(d, model, fit_images, fit_labels, fit_classes, seed,
                                                              templates, options.get(d, {}))
        except NotApplicable as exc:
            described[label] = f"not applicable: {exc}"
            rows += [{"attack_set": s.name, "defence": label, "status": f"not applicable: {exc}"} for s in sets]
            continue
        fit_seconds = time.perf_counter() - start
        described[label] = defence.describe()
        for s in sets:
            start = time.perf_counter()
            if s.attack is not None:
                result = evaluate(model, images, labels, classes, s.attack, defence=defence, templates=templates,
                                  batch_size=batch_size, seed=seed, progress=False, n_examples=4)
                results[(s.name, label)] = result
                f = result.frame
                cells = _cells(f["clean_correct"], f["attacked_correct"], f["success"],
                               result.metrics["text_detected_rate"], len(f))
                skipped = result.skipped
            else:
                cells = _public_cells(model, s, defence, templates, batch_size)
            cells["ms_per_image"] = 1000 * (time.perf_counter() - start) / max(1, cells["n"])
            rows.append({"attack_set": s.name, "defence": label, "status": "ok", "fit_seconds": fit_seconds, **cells})
    import pandas as pd
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for s in sets:
        if s.tset is not None:
            skipped = skipped + [(k, r) for k, r in s.tset.skipped if (k, r) not in skipped]
    return BenchmarkResult(frame, {s.name: s.describe() for s in sets}, described, getattr(model, "name", repr(model)), results, skipped)


def fit_sample(images: Any, labels: Sequence[str] | None, count: int, seed: int) -> tuple[list | None, list | None]:
    """At most ``count`` readable images of ``images`` (as PIL images) with their ``labels``, drawn at random
    with ``seed`` (so that a folder sorted by class gives every class a share); ``(None, None)`` without
    images or labels."""
    if images is None or labels is None:
        return None, None
    labels = list(labels)
    items = [(im, labels[i]) for i, (_, im) in enumerate(iter_images(images))
             if i < len(labels) and not isinstance(im, ImageLoadError)] if not isinstance(images, list) else None
    if items is None:  # a list: draw first, then read only what is drawn
        order = list(range(min(len(images), len(labels))))
        random.Random(seed).shuffle(order)
        items = []
        for i in order:
            image = next(iter(iter_images([images[i]])))[1]
            if not isinstance(image, ImageLoadError):
                items.append((image, labels[i]))
            if len(items) == count:
                break
        return [im for im, _ in items], [y for _, y in items]
    random.Random(seed).shuffle(items)
    return [im for im, _ in items[:count]], [y for _, y in items[:count]]


def _build(name: str, model, images, labels, classes, seed: int, templates, options: Mapping) -> Defence:
    if name != "none" and (images is None or labels is None or classes is None):
        raise InvalidArgumentError("fit_images", images, f"images, labels and classes to fit the {name} defence on")
    defence = DEFENCE_BUILDERS[name](model, images, labels, classes, seed=seed, templates=templates, progress=False,
                                     **dict(options))
    if not isinstance(defence, Defence):
        raise TypeError(f"the defence builder {name!r} returned {type(defence).__name__}, not a Defence")
    return defence


def _public_cells(model, s: AttackSet, defence: Defence, templates, batch_size: int) -> dict:
    """The cells of a public set under ``defence``: its images scored as they are (they carry their attacks)."""
    frame = s.tset.frame
    classes = s.tset.classes
    scores = clean_scores(model, list(frame["image"]), classes, defence=defence, templates=templates,
                          batch_size=batch_size, progress=False)
    predicted = dict(zip(scores.indices, scores.predictions))
    rows = frame.iloc[scores.indices] if len(scores.indices) else frame.iloc[[]]
    pred = np.array([predicted[i] for i in scores.indices], dtype=object)
    clean = ~rows["attacked"].to_numpy(bool)
    attacked = ~clean if s.variant is None else ~clean & (rows["variant"] == s.variant).to_numpy(bool)
    label, text = rows["label"].to_numpy(object), rows["text"].to_numpy(object)
    correct = (pred == label).astype(float)
    fooled = np.array([float(p == t) if t in classes else np.nan for p, t in zip(pred, text)])
    detected = float((pred[attacked] == TEXT).mean()) if attacked.any() else math.nan
    return _cells(correct[clean], correct[attacked], fooled[attacked], detected, int(attacked.sum()))

