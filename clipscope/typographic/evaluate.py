"""Evaluating typographic attacks: clean vs attacked zero-shot predictions, metrics, sweeps.

Metrics (all fractions in [0, 1]):

- ``clean_accuracy`` / ``attacked_accuracy``: top-1 equals the true label;
- ``attack_success_rate``: the attacked top-1 is the written class, among images
  whose clean top-1 was not already that class (Goh et al., Distill 2021, count
  a change to the target; their table divides by all images, as
  :func:`~clipscope.typographic.distill_protocol`'s ``changed_to`` does, and this
  rate is its ``success_eligible``); undefined for free text that is not a class;
- ``mean_target_probability``: mean attacked probability of the written class;
- ``mean_cover``: mean fraction of pixels the text changed;
- ``text_detected_rate``: attacked images predicted as a defence's "text" class.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..endpoint import EndpointHead, is_black_box
from ..data import batched, default_workers, ordered_map, prefetch, source_length
from ..model import ZeroShotClassifier
from ..progress import ManualBar, manual_bar, progress_bar
from ..validate import InvalidArgumentError, check_int, check_names, check_same_length
from .attack import Attack, AttackedImage, attack_job, readable_jobs
from .defences import Defence

TEXT = "<text>"  # the prediction recorded when a defence's "text that says ..." class wins

METRICS = ("clean_accuracy", "attacked_accuracy", "attack_success_rate", "mean_target_probability",
           "mean_cover", "text_detected_rate")


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class AttackResult:
    """One attack (optionally under a defence) evaluated on a data set.

    ``frame`` has one row per image; ``metrics`` the figures listed in the module
    docstring; ``examples`` a few (clean, attacked) pairs for plots; ``skipped``
    the ``(key, reason)`` of unreadable images.
    """

    frame: Any
    metrics: dict[str, float]
    classes: list[str]
    attack: str
    defence: str
    examples: list[AttackedImage] = field(default_factory=list)
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    def to_frame(self):
        """Per-image rows: key, label, text, cover, clean/attacked prediction and probabilities, success."""
        return self.frame

    def summary(self):
        """One-row DataFrame of the metrics, with the attack and defence descriptions."""
        import pandas as pd
        return pd.DataFrame([{"attack": self.attack, "defence": self.defence, **self.metrics}])

    def per_class(self):
        """Metrics per true class: n, clean and attacked accuracy, attack success rate."""
        f = self.frame
        return f.groupby("label").agg(n=("label", "size"), clean_accuracy=("clean_correct", "mean"),
                                      attacked_accuracy=("attacked_correct", "mean"),
                                      attack_success_rate=("success", "mean"),
                                      mean_target_probability=("attacked_p_target", "mean"))

    def plot(self, n_examples: int = 4):
        """Bars of the main metrics and a row of attacked examples with their predictions; returns the figure."""
        import matplotlib.pyplot as plt
        n_ex = min(n_examples, len(self.examples))
        fig, axes = plt.subplots(1, 1 + n_ex, figsize=(3.2 * (1 + n_ex), 3.2), squeeze=False,
                                 gridspec_kw={"width_ratios": [1.6] + [1] * n_ex})
        names = ["clean_accuracy", "attacked_accuracy", "attack_success_rate"]
        values = [self.metrics[n] for n in names]
        ax = axes[0, 0]
        ax.bar(range(3), [0 if math.isnan(v) else v for v in values], color=["tab:green", "tab:orange", "tab:red"])
        ax.set_xticks(range(3), ["clean acc.", "attacked acc.", "success"], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{self.defence}" if self.defence != "none" else "no defence", fontsize=9)
        rows = self.frame.set_index("index")
        for ax, ex in zip(axes[0, 1:], self.examples[:n_ex]):
            ax.imshow(ex.attacked)
            row = rows.loc[ex.index]
            ax.set_title(f"{row['label']} -> {row['attacked_prediction']}", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        import html
        table = self.summary().drop(columns=["attack", "defence"]).to_html(index=False, float_format="{:.3f}".format)
        note = f"; {len(self.skipped)} unreadable image(s) skipped" if self.skipped else ""
        return (f"<p><b>{html.escape(self.attack)}</b><br>defence: {html.escape(self.defence)}; "
                f"{len(self.frame)} images{note}</p>{table}")


def check_attack_data(images: Any, labels: Iterable[str | None], classes: Sequence[str],
                      attack: Attack) -> tuple[list[str], list[str | None]]:
    """Return ``(classes, labels)`` as lists if they fit ``images`` and ``attack``; else raise
    :class:`~clipscope.validate.InvalidArgumentError` naming the bad argument.

    Classes are non-empty unique strings, each label one of them or ``None``, one label per image
    (checked here when the number of images is known, else while streaming), at least one image.
    """
    if not isinstance(attack, Attack):
        raise InvalidArgumentError("attack", attack, "an Attack (Attack.targeted, Attack.untargeted, "
                                                     "Attack.free_text)")
    classes = attack.check(classes)
    if isinstance(labels, (str, bytes, Mapping)) or not isinstance(labels, Iterable):
        raise InvalidArgumentError("labels", labels, "a list with one class name (or None) per image")
    labels = list(labels)
    bad = list(dict.fromkeys(l for l in labels if l is not None and l not in classes))
    if bad:
        raise InvalidArgumentError("labels", bad, f"not among the classes {classes}; each label must be a class "
                                                  "or None")
    n = source_length(images)
    if n == 0:
        raise InvalidArgumentError("images", images, "at least one image")
    if n is not None:
        check_same_length(images=range(n), labels=labels)
    return classes, labels


def _check_defence(defence: Any) -> Defence:
    """Return ``defence`` (``None`` gives the no-op :class:`Defence`); else raise
    :class:`~clipscope.validate.InvalidArgumentError` naming ``defence``."""
    if defence is not None and not isinstance(defence, Defence):
        raise InvalidArgumentError("defence", defence, "a Defence (PromptDefence, AblationDefence, ...) or None")
    return defence or Defence()


@dataclass
class CleanScores:
    """Zero-shot scores of clean (unattacked) images, made by :func:`clean_scores`.

    :func:`evaluate` compares attacked images with these instead of encoding the clean images
    again, and :func:`sweep` computes them once for all its settings. Row ``i`` is the image at
    position ``indices[i]`` of the input (key ``keys[i]``: its path where it has one);
    ``probs`` is float32 ``(n, len(classes))``, probabilities summed back onto the original
    ``classes`` (a defence's "text that says ..." classes count for none of them, so rows may sum
    to less than 1); ``predictions[i]`` is the top-1 class or :data:`TEXT`. ``scored`` and
    ``templates`` are the classes and prompts of the zero-shot head, ``model`` the model's id and
    ``defence`` the defence's description: :func:`evaluate` refuses scores whose setting differs
    from its own. ``skipped`` lists ``(key, reason)`` for unreadable images.
    """

    classes: tuple[str, ...]
    scored: tuple[str, ...]
    templates: tuple[str, ...]
    model: str
    defence: str
    indices: list[int]
    keys: list[Any]
    probs: torch.Tensor
    predictions: list[str]
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    _rows: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self):
        self._rows = {index: i for i, index in enumerate(self.indices)}

    def get(self, index: int) -> tuple[torch.Tensor, str] | None:
        """``(probs, prediction)`` of the image at input position ``index``, or ``None`` if it was not scored."""
        i = self._rows.get(index)
        return None if i is None else (self.probs[i], self.predictions[i])


@dataclass
class _Scorer:
    """A defence's zero-shot head, scoring images and mapping the scores back onto the original classes.

    ``class_map[j]`` is the original class that the head's class ``j`` scores for (``None``: none);
    ``columns`` holds, for the head's classes that score for one, ``(j, index of that class in classes)``.
    """

    model: Any
    defence: Defence
    classes: list[str]
    class_map: list[str | None]
    head: ZeroShotClassifier | EndpointHead
    columns: list[tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self):
        index = {c: i for i, c in enumerate(self.classes)}
        self.columns = [(j, index[original]) for j, original in enumerate(self.class_map) if original is not None]

    @classmethod
    def make(cls, model, defence: Defence, classes: list[str], templates) -> "_Scorer":
        """Build the head; call inside ``defence.context(model)`` so that a text-tower ablation counts."""
        score_classes, class_map = defence.classes(classes)
        make_head = model.zero_shot_head if is_black_box(model) else model.classifier  # a black box scores images
        return cls(model, defence, classes, class_map, make_head(score_classes, defence.templates(templates)))

    def prepare(self, image) -> torch.Tensor:
        """The model's input tensor for one image under the defence (thread-safe)."""
        return self.model.preprocess(self.defence.image(image))

    def scores(self, images: Sequence) -> tuple[torch.Tensor, list[str]]:
        """``(probs (n, len(classes)), top-1 names)`` for PIL images or tensors from :meth:`prepare` (PIL images
        only for a black-box model)."""
        if is_black_box(self.model):  # PIL images only: the endpoint does its own preprocessing
            probs = self.head.image_probs([self.defence.image(im) for im in images])
        else:
            x = torch.stack([im if isinstance(im, torch.Tensor) else self.prepare(im) for im in images])
            with torch.no_grad():
                probs = self.head.probs(self.model.encode_image(x)).cpu()
        merged = torch.zeros(len(images), len(self.classes))
        for j, i in self.columns:
            merged[:, i] += probs[:, j]
        names = [self.class_map[t] if self.class_map[t] is not None else TEXT for t in probs.argmax(dim=1).tolist()]
        return merged, names

    def check(self, clean: Any) -> None:
        """Raise :class:`~clipscope.validate.InvalidArgumentError` unless ``clean`` is ``None`` or scores of this
        setting (same classes, head, model and defence)."""
        if clean is None:
            return
        if not isinstance(clean, CleanScores):
            raise InvalidArgumentError("clean", clean, "CleanScores from clean_scores(...), or None")
        want = {"classes": tuple(self.classes), "scored": self.head.classes, "templates": self.head.templates,
                "model": self.model.id, "defence": self.defence.describe()}
        for name, value in want.items():
            if getattr(clean, name) != value:
                raise InvalidArgumentError(f"clean.{name}", getattr(clean, name),
                                           f"{value!r}, as in this evaluation (compute the clean scores with the "
                                           "same model, classes, templates and defence)")


def _bar(total: int | None, batch_size: int, progress: bool | None, desc: str) -> ManualBar:
    """The bar of one pass over ``total`` images; by default shown when they fill more than one batch."""
    return manual_bar(progress, (total or 0) > batch_size, desc, total=total)


def clean_scores(model, images: Any, classes: Sequence[str], *, defence: Defence | None = None,
                 templates: str | Sequence[str] | None = None, batch_size: int = 32,
                 progress: bool | None = None) -> CleanScores:
    """Zero-shot scores of the clean ``images`` among ``classes`` under ``defence``; returns :class:`CleanScores`.

    ``images`` is any source :func:`clipscope.data.iter_images` reads; unreadable images are
    skipped and listed in the result. Pass the result to :func:`evaluate` as ``clean`` (with the
    same model, classes, templates and defence) to score several attacks on the same images
    while encoding the clean images once.
    """
    classes = check_names("classes", classes)
    defence = _check_defence(defence)
    batch_size = check_int("batch_size", batch_size, low=1)
    if source_length(images) == 0:
        raise InvalidArgumentError("images", images, "at least one image")
    skipped: list = []
    indices, keys, probs, predictions = [], [], [], []
    with defence.context(model), _bar(source_length(images), batch_size, progress, "clean scores") as bar:
        scorer = _Scorer.make(model, defence, classes, templates)
        for batch in prefetch(batched(readable_jobs(images, None, skipped), batch_size)):
            p, names = scorer.scores([image for _, _, image, _ in batch])
            indices += [index for index, _, _, _ in batch]
            keys += [key for _, key, _, _ in batch]
            probs.append(p)
            predictions += names
            bar.update(len(batch))
    return CleanScores(tuple(classes), scorer.head.classes, scorer.head.templates, model.id, defence.describe(),
                       indices, keys, torch.cat(probs) if probs else torch.zeros(0, len(classes)), predictions,
                       skipped)


def evaluate(model, images: Any, labels: Sequence[str | None], classes: Sequence[str], attack: Attack, *,
             defence: Defence | None = None, templates: str | Sequence[str] | None = None, batch_size: int = 32,
             seed: int = 0, progress: bool | None = None, n_examples: int = 8, workers: int | None = None,
             clean: CleanScores | None = None) -> AttackResult:
    """Attack ``images`` and compare zero-shot predictions before and after; returns an :class:`AttackResult`.

    ``labels`` are the true class names (or ``None`` where unknown) in the order of
    ``images`` (any source :func:`clipscope.data.iter_images` reads, generated
    lazily). Rendering runs off the main thread, a batch ahead of the model, in
    ``workers`` threads: by default one when the model runs on the CPU (it needs the
    cores), else :func:`~clipscope.data.default_workers`. With more than one worker the
    workers also preprocess the images, so that a GPU does not wait for Pillow (on a CPU
    model that competes with the model for the cores). Results do not depend on ``workers``.
    ``clean``: the clean images' scores from :func:`clean_scores` (same model, classes,
    templates and defence, else :class:`~clipscope.validate.InvalidArgumentError`); images
    it holds are not encoded clean again, others are. The result is the same with or without it.
    """
    classes, labels = check_attack_data(images, labels, classes, attack)
    defence = _check_defence(defence)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed)
    n_examples = check_int("n_examples", n_examples, low=0)
    if workers is not None:
        workers = check_int("workers", workers, low=1)
    skipped: list = []
    rows, examples = [], []
    with defence.context(model), _bar(source_length(images), batch_size, progress, "typographic attack") as bar:
        scorer = _Scorer.make(model, defence, classes, templates)
        scorer.check(clean)
        render = functools.partial(attack_job, attack, classes, seed)
        jobs = readable_jobs(images, labels, skipped)
        for chunk, clean_scored, attacked_scored in _scored_batches(scorer, render, jobs, batch_size, workers, clean):
            rows += [_row(it, classes, clean_scored, attacked_scored, i) for i, it in enumerate(chunk)]
            examples += chunk[:max(0, n_examples - len(examples))]
            bar.update(len(chunk))
    frame = _frame(rows)
    return AttackResult(frame, _metrics(frame, skipped), classes, attack.describe(), defence.describe(), examples,
                        skipped)


def _scored_batches(scorer: _Scorer, render, jobs: Iterable[tuple], batch_size: int, workers: int | None,
                    clean: CleanScores | None):
    """Yield ``(attacked images, clean scores, attacked scores)`` per batch; each scores is ``(probs, names)``."""
    model = scorer.model
    black_box = is_black_box(model)  # no local model competes for the cores; the endpoint preprocesses
    n_workers = workers if workers is not None else default_workers() if black_box or model.device.type != "cpu" else 1

    def job(j):  # in a worker thread: render, and with several workers preprocess what the model will see
        item = render(j)
        if n_workers <= 1 or black_box:
            return item, None, item.attacked
        known = clean is not None and clean.get(item.index) is not None
        return item, None if known else scorer.prepare(item.clean), scorer.prepare(item.attacked)

    for prepared in prefetch(batched(ordered_map(job, jobs, n_workers), batch_size)):
        chunk = [it for it, _, _ in prepared]
        known = [clean.get(it.index) for it in chunk] if clean is not None else [None]
        if all(k is not None for k in known):
            clean_scored = torch.stack([p for p, _ in known]), [name for _, name in known]
        else:
            clean_scored = scorer.scores([it.clean if x is None else x for it, x, _ in prepared])
        yield chunk, clean_scored, scorer.scores([x for _, _, x in prepared])


COLUMNS = ("key", "index", "label", "text", "cover", "clean_prediction", "attacked_prediction", "clean_correct",
           "attacked_correct", "clean_p_label", "attacked_p_label", "clean_p_target", "attacked_p_target", "success")


def _row(it: AttackedImage, classes: list[str], clean_scored: tuple, attacked_scored: tuple, i: int) -> dict:
    """One row of :attr:`AttackResult.frame` for the ``i``-th image of a batch (see :data:`COLUMNS`)."""
    (clean_p, clean_pred), (att_p, att_pred) = clean_scored, attacked_scored
    target = classes.index(it.text) if it.text in classes else None
    label = classes.index(it.label) if it.label is not None else None
    defined = target is not None and clean_pred[i] != it.text

    def p(probs, j):
        return float(probs[i, j]) if j is not None else np.nan

    return {
        "key": it.key, "index": it.index, "label": it.label, "text": it.text, "cover": it.cover,
        "clean_prediction": clean_pred[i], "attacked_prediction": att_pred[i],
        "clean_correct": float(clean_pred[i] == it.label) if label is not None else np.nan,
        "attacked_correct": float(att_pred[i] == it.label) if label is not None else np.nan,
        "clean_p_label": p(clean_p, label), "attacked_p_label": p(att_p, label),
        "clean_p_target": p(clean_p, target), "attacked_p_target": p(att_p, target),
        "success": float(att_pred[i] == it.text) if defined else np.nan,
    }


def _frame(rows: list[dict]):
    import pandas as pd
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _metrics(frame, skipped: list) -> dict[str, float]:
    """The figures of the module docstring, plus ``n`` (images scored) and ``n_skipped`` (unreadable)."""
    return {
        "n": float(len(frame)), "n_skipped": float(len(skipped)),
        "clean_accuracy": _nanmean(frame["clean_correct"]),
        "attacked_accuracy": _nanmean(frame["attacked_correct"]),
        "attack_success_rate": _nanmean(frame["success"]),
        "mean_target_probability": _nanmean(frame["attacked_p_target"]),
        "mean_cover": _nanmean(frame["cover"]),
        "text_detected_rate": float((frame["attacked_prediction"] == TEXT).mean()) if len(frame) else float("nan"),
    }


# ---------------------------------------------------------------------------------------
# Sweeps

SWEEPABLE = ("size", "opacity", "position", "font", "colour", "box", "box_opacity", "rotation", "repeat", "word")


def check_vary(attack: Attack, classes: Sequence[str], vary: Any) -> dict[str, list[Any]]:
    """Return ``vary`` with each value normalized (as the varied attack holds it) if it names one or two
    :data:`SWEEPABLE` parameters, each with a non-empty list of unique values valid for it; else raise
    :class:`~clipscope.validate.InvalidArgumentError` naming the parameter (``vary['size']``) and the value."""
    if not isinstance(attack, Attack):
        raise InvalidArgumentError("attack", attack, "an Attack (Attack.targeted, Attack.untargeted, "
                                                     "Attack.free_text)")
    if not isinstance(vary, Mapping) or not 1 <= len(vary) <= 2:
        raise InvalidArgumentError("vary", vary, "a dict of one or two parameters and their values, "
                                                 "e.g. {'size': [0.1, 0.2, 0.3]}")
    unknown = [p for p in vary if p not in SWEEPABLE]
    if unknown:
        raise InvalidArgumentError("vary", unknown, f"cannot sweep these; sweepable parameters: {list(SWEEPABLE)}")
    return {p: _check_values(attack, classes, p, values) for p, values in vary.items()}


def _check_values(attack: Attack, classes: Sequence[str], param: str, values: Any) -> list[Any]:
    name = f"vary[{param!r}]"
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence) or not values:
        raise InvalidArgumentError(name, values, f"a non-empty list of values for {param}")
    normalized = []
    for value in values:
        try:
            varied = _vary(attack, classes, **{param: value})
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(name, value, exc.valid) from None
        value = varied.target if param == "word" else varied.position if param == "position" else \
            getattr(varied.style, param)
        if value in normalized:
            raise InvalidArgumentError(name, values, f"unique values; {value!r} appears twice")
        normalized.append(value)
    return normalized


def _vary(attack: Attack, classes: Sequence[str], **values) -> Attack:
    if "word" in values:
        word = values.pop("word")
        attack = (Attack.targeted(word, attack.style, attack.position) if word in classes
                  else Attack.free_text(word, attack.style, attack.position))
    return attack.replace(**values) if values else attack


@dataclass
class SweepResult:
    """Metrics for every combination of one or two swept attack parameters (one row each in ``frame``)."""

    frame: Any
    params: list[str]
    results: list[AttackResult]

    def to_frame(self):
        return self.frame

    def plot(self, metric: str = "attack_success_rate", ax=None):
        """Line plot of ``metric`` against the parameter (one parameter) or a heatmap (two); returns the figure."""
        import matplotlib.pyplot as plt
        if metric not in self.frame.columns:
            raise InvalidArgumentError("metric", metric, f"one of {[m for m in METRICS if m in self.frame]}")
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        if len(self.params) == 1:
            p = self.params[0]
            labels = [str(v) for v in self.frame[p]]
            numeric = all(isinstance(v, (int, float)) for v in self.frame[p])
            xs = list(self.frame[p]) if numeric else range(len(labels))
            ax.plot(xs, self.frame[metric], marker="o")
            if not numeric:
                ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(p)
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_ylim(-0.02, 1.02)
        else:
            p, q = self.params
            grid = self.frame.pivot(index=p, columns=q, values=metric)
            im = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(grid.index)), [str(v) for v in grid.index])
            ax.set_xticks(range(len(grid.columns)), [str(v) for v in grid.columns], rotation=30, ha="right")
            ax.set_ylabel(p)
            ax.set_xlabel(q)
            ax.figure.colorbar(im, ax=ax, label=metric.replace("_", " "))
        ax.set_title(f"{metric.replace('_', ' ')} vs {' x '.join(self.params)}", fontsize=9)
        ax.figure.tight_layout()
        return ax.figure

    def _repr_html_(self) -> str:
        return self.frame.to_html(index=False, float_format="{:.3f}".format)


def sweep(model, images: Any, labels: Sequence[str | None], classes: Sequence[str], attack: Attack,
          vary: dict[str, Sequence[Any]], *, defence: Defence | None = None,
          templates: str | Sequence[str] | None = None, batch_size: int = 32, seed: int = 0,
          progress: bool | None = None) -> SweepResult:
    """Evaluate ``attack`` with one or two parameters varied over the given values; returns a :class:`SweepResult`.

    Parameters are :data:`SWEEPABLE` (text style fields, ``position``, and
    ``word``: the text written). ``images`` must be re-iterable (a list, folder or
    data set). Clean predictions are computed once (:func:`clean_scores`) and shared by every setting.
    """
    import itertools

    import pandas as pd

    vary = check_vary(attack, classes, vary)
    if iter(images) is images:
        raise TypeError("sweep needs re-iterable images (a list, folder or data set), not a one-shot iterator")
    check_attack_data(images, labels, classes, attack)
    params = list(vary)
    clean = clean_scores(model, images, classes, defence=defence, templates=templates, batch_size=batch_size,
                         progress=False)
    rows, results = [], []
    combos = list(itertools.product(*vary.values()))
    for combo in progress_bar(combos, progress, True, "sweep", total=len(combos)):
        values = dict(zip(params, combo))
        result = evaluate(model, images, labels, classes, _vary(attack, classes, **dict(values)), defence=defence,
                          templates=templates, batch_size=batch_size, seed=seed, progress=False, n_examples=2,
                          clean=clean)
        results.append(result)
        rows.append({**values, **{k: result.metrics[k] for k in ("n", *METRICS)}})
    return SweepResult(pd.DataFrame(rows), params, results)
