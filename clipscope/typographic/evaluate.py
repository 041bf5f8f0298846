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

Batches, ranks and the cache: a batch always holds the readable images among one block of
``batch_size`` consecutive input positions (so a batch next to unreadable files is smaller). Under a
launcher (``torchrun``, ``accelerate launch``) or with ``distributed=True``, :func:`clean_scores`,
:func:`evaluate` and :func:`sweep` give each rank a contiguous range of whole blocks, and every rank
returns the merged result, identical to one process's: the rows come back in the input's order and
each image is scored in the same batch however the images are split. With ``cache_dir`` each block's
results are written as the block completes, keyed by the setting and the block (not by the rank), so
a relaunch after a killed rank, on any number of processes, computes only the unfinished blocks.
"""
from __future__ import annotations

import dataclasses
import collections
import functools
import hashlib
import itertools
import json
import math
import os
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..endpoint import EndpointHead, is_black_box
from ..data import ImageLoadError, default_workers, ordered_map, prefetch, source_fingerprint, source_length
from ..distributed import Context, Shard, context, gather_objects, main_bar, split_source
from ..io import ensure_folder, write_text_atomic
from ..model import ZeroShotClassifier
from ..progress import ManualBar, progress_bar
from ..validate import InvalidArgumentError, check_int, check_names, check_same_length
from .attack import Attack, AttackedImage, attack_job, image_key, readable_jobs
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


# ---------------------------------------------------------------------------------------
# Blocks of batch_size positions: the unit of batching, of splitting over ranks and of the cache


def _range_jobs(images: Any, labels: Sequence[str | None] | None, ctx: Context, positions: range,
                skipped: list) -> Iterator[tuple]:
    """``(position, key, image, label)`` of the readable images at ``positions`` (a contiguous range of the
    source), with the keys :func:`~clipscope.typographic.attack.readable_jobs` gives; the unreadable ones go to
    ``skipped`` as ``(position, key, reason)``."""
    shard = Shard(images, ctx.rank, ctx.world_size, positions.start, positions.stop)
    for position, key, image in shard.items():
        key = image_key(images, key)
        if isinstance(image, ImageLoadError):
            skipped.append((position, key, str(image)))
            continue
        if not isinstance(image, Image.Image):
            raise TypeError("typographic attacks need PIL images, paths or a data set, not preprocessed tensors")
        yield position, key, image, None if labels is None else labels[position]


def _position_batches(items: Iterable, size: int, position: Callable[[Any], int]) -> Iterator[list]:
    """Lists of the consecutive ``items`` whose ``position(item)`` falls in one block of ``size`` positions
    (``0..size-1``, ``size..2*size-1``, ...): a batch is the same whichever range of positions a process reads."""
    batch, block = [], None
    for item in items:
        b = position(item) // size
        if batch and b != block:
            yield batch
            batch = []
        batch.append(item)
        block = b
    if batch:
        yield batch


def _runs(blocks: Iterable[int]) -> list[list[int]]:
    """``blocks`` (increasing) grouped into runs of consecutive numbers."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _block_parts(images: Any, labels: Sequence[str | None] | None, ctx: Context, batch_size: int,
                 cache: "_BlockCache | None", score: Callable[[Iterator], Iterator], bar: ManualBar) -> list[dict]:
    """This rank's results as parts (dicts of lists, in input order): ``score(jobs)`` yields ``(block, part, n)``
    for each batch of ``n`` readable ``jobs`` (``(position, key, image, label)``), one batch per block of
    ``batch_size`` positions; every part also gets ``skipped``, the ``(key, reason)`` of its unreadable images.

    One process without a ``cache`` reads ``images`` once, as they come (a stream too). Otherwise the parts are
    one per block of this rank's range (whole blocks, :func:`~clipscope.distributed.split_source`): blocks in
    the ``cache`` are read back, the others computed, each written to the cache as soon as it is complete."""
    if cache is None and not ctx.distributed:
        skipped: list = []
        parts = []
        for _, part, n in score(readable_jobs(images, labels, skipped)):
            parts.append({**part, "skipped": []})
            bar.update(n)
        return parts + [{"skipped": skipped}]
    shard = split_source(images, ctx, block=batch_size)
    if shard.stop is None:
        raise InvalidArgumentError("images", images, "a folder, a list of images or paths or a datasets table "
                                                     "(a source with a length) on several processes")
    blocks = range(shard.start // batch_size, -(-shard.stop // batch_size) if shard.stop > shard.start else 0)
    done = {b: part for b in blocks if cache is not None and (part := cache.get(b)) is not None}
    for b in done:
        bar.update(min(shard.stop, (b + 1) * batch_size) - b * batch_size)
    for run in _runs(b for b in blocks if b not in done):
        positions = range(run[0] * batch_size, min(shard.stop, (run[-1] + 1) * batch_size))
        done.update(_computed_run(images, labels, ctx, positions, batch_size, cache, score, bar))
    return [done[b] for b in blocks]


def _computed_run(images: Any, labels: Sequence[str | None] | None, ctx: Context, positions: range,
                  batch_size: int, cache: "_BlockCache | None", score: Callable[[Iterator], Iterator],
                  bar: ManualBar) -> Iterator[tuple[int, dict]]:
    """``(block, part)`` of the blocks of ``positions`` (whole blocks), computed by ``score`` (see
    :func:`_block_parts`) and written to ``cache`` one by one, as each completes."""
    skipped: collections.deque = collections.deque()
    todo = collections.deque(range(positions.start // batch_size, -(-positions.stop // batch_size)))

    def finish(block: int, part: dict) -> tuple[int, dict]:
        end = min(positions.stop, (block + 1) * batch_size)  # every position before `end` has been read
        part["skipped"] = []
        while skipped and skipped[0][0] < end:
            part["skipped"].append(skipped.popleft()[1:])
        if cache is not None:
            cache.put(block, part)
        bar.update(end - block * batch_size)
        return block, part

    for block, part, _ in score(_range_jobs(images, labels, ctx, positions, skipped)):
        while todo[0] < block:  # blocks without a readable image
            yield finish(todo.popleft(), {})
        yield finish(todo.popleft(), part)
    while todo:
        yield finish(todo.popleft(), {})


def _joined(parts: list[dict], name: str) -> list:
    """The lists called ``name`` in ``parts``, concatenated."""
    return [x for part in parts for x in part.get(name, ())]


PART_VERSION = 2


class _UnstableDigest(ValueError):
    """A value known only by its default ``repr``, which holds its address (different in every process)."""


def _digest(value: Any) -> str:
    """A hash of ``value``'s content, the same in every process: tensors and arrays by their bytes, PIL
    images by their pixels, modules by their class, public attributes and ``state_dict``, dataclasses field by
    field, containers item by item, functions by module, name, code (bytecode, constants, names used),
    defaults and closure, bound methods by their function and object, ``functools.partial`` by function,
    arguments and keywords, other objects by their attributes (``vars``), anything else (numbers, strings,
    ...) by ``repr``. An object met again (a cycle) counts by its type alone. Raises :class:`_UnstableDigest`
    for a value whose ``repr`` holds its address (``<... at 0x...>``): its hash would differ per process.
    The globals a function reads are not part of its hash."""
    h = hashlib.sha256()
    seen: dict[int, Any] = {}  # holds what it saw, so that no id is reused by a later temporary

    def add(x: Any) -> None:
        h.update(type(x).__qualname__.encode() + b"\0")
        if id(x) in seen:
            return
        if not isinstance(x, (str, bytes, int, float, bool, type(None))):
            seen[id(x)] = x
        for kind, parts in _DIGEST_RULES:
            if isinstance(x, kind):
                parts(x, add, h)
                break
        else:
            _add_other(x, add, h)
        h.update(b"\0")

    add(value)
    return h.hexdigest()[:32]


def _add_tensor(x: torch.Tensor, add, h) -> None:
    x = x.detach().cpu().contiguous()
    h.update(f"{x.dtype}{tuple(x.shape)}".encode() + x.flatten().view(torch.uint8).numpy().tobytes())


def _add_items(items: Iterable, add, h) -> None:
    for v in items:
        add(v)
    h.update(b"]")


def _add_other(x: Any, add, h) -> None:
    """The rules of :func:`_digest` after the ones by type (:data:`_DIGEST_RULES`)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            add(f.name)
            add(getattr(x, f.name))
    elif isinstance(x, Mapping):
        for k in sorted(x, key=repr):
            add(k)
            add(x[k])
    elif hasattr(x, "__code__"):
        add((x.__module__, x.__qualname__, x.__code__, x.__defaults__, x.__kwdefaults__,
             [c.cell_contents for c in x.__closure__ or ()]))
    elif hasattr(x, "__dict__") and not isinstance(x, type):
        add(vars(x))
    else:
        text = repr(x)
        if " at 0x" in text:
            raise _UnstableDigest(text)
        h.update(text.encode())


_DIGEST_RULES: tuple[tuple[type, Callable], ...] = (
    (torch.Tensor, _add_tensor),
    (np.ndarray, lambda x, add, h: h.update(f"{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())),
    (Image.Image, lambda x, add, h: add((x.mode, x.size, np.asarray(x)))),
    (torch.nn.Module, lambda x, add, h: add((type(x).__module__, {k: v for k, v in vars(x).items()
                                                                  if not k.startswith("_")}, x.state_dict()))),
    (functools.partial, lambda x, add, h: add((x.func, x.args, x.keywords))),
    (types.MethodType, lambda x, add, h: add((x.__func__, x.__self__))),
    (types.CodeType, lambda x, add, h: add((x.co_code, x.co_consts, x.co_names))),
    ((list, tuple), lambda x, add, h: _add_items(x, add, h)),
    ((set, frozenset), lambda x, add, h: _add_items(sorted(x, key=repr), add, h)),
)


def edits_in_force(model) -> bool:
    """Whether an ablation, edit or steering (``model.ablate`` / ``edit`` / ``steer``) is in force on ``model``:
    :attr:`ClipModel.id` does not describe them, so results cached under the id would be another model's.
    A black-box model has none."""
    return bool(getattr(model, "edits_in_force", False))  # a black box raises an AttributeError: it has none


@dataclass
class _BlockCache:
    """Results of one setting on disk, one JSON file per block of ``batch_size`` input positions:
    ``FOLDER/<kind>_<key>.json``, ``key`` a :func:`_digest` of the setting, the source's fingerprint, the
    defence and the block's index. No rank or world size is in the key: any run of the same setting, on any
    number of processes, reuses every block written by any rank."""

    folder: Path
    prefix: str
    key: str = ""

    @classmethod
    def open(cls, cache_dir: str | os.PathLike | None, images: Any, model, defence: Defence) -> "_BlockCache | None":
        """The cache in ``cache_dir`` (created if needed), ``None`` without one. Call before ``defence.context``
        (an ablation defence is an edit). :class:`~clipscope.validate.InvalidArgumentError` for a source without
        a fingerprint (a stream), while ``model`` has edits in force (:func:`edits_in_force`), or for a
        defence known only by addresses (``defence``)."""
        if cache_dir is None:
            return None
        if edits_in_force(model):
            raise InvalidArgumentError("cache_dir", cache_dir, "None while model.ablate / edit / steer is in force: "
                                       "the cache key (model.id) does not describe the edits, so results of the "
                                       "unedited model would be read back (use a defence for the edit instead)")
        fingerprint = source_fingerprint(images)
        if fingerprint is None:
            raise InvalidArgumentError("cache_dir", cache_dir, "None for images without a fingerprint (a stream); "
                                                               "a cache needs a folder, list, tensor or table")
        try:
            described = _digest(defence)
        except _UnstableDigest as exc:
            raise InvalidArgumentError("defence", defence.describe(), f"a defence with a stable description, or no "
                                       f"cache_dir: part of it ({str(exc)[:80]}) is known only by its address, "
                                       "which differs in every process") from None
        return cls(ensure_folder(cache_dir), _digest((PART_VERSION, fingerprint, described)))

    def keyed(self, kind: str, setting: tuple) -> "_BlockCache":
        """This cache for results of ``kind`` (``clean``, ``evaluate``) under ``setting`` (all that decides them
        besides the images and the defence); :class:`~clipscope.validate.InvalidArgumentError` (``cache_dir``)
        for a setting known only by addresses."""
        try:
            key = _digest((self.prefix, setting))
        except _UnstableDigest as exc:
            raise InvalidArgumentError("cache_dir", str(self.folder), f"None: part of the setting ({str(exc)[:80]}) "
                                       "is known only by its address, which differs in every process") from None
        return _BlockCache(self.folder, self.prefix, f"{kind}_{key}")

    def _path(self, block: int) -> Path:
        return self.folder / f"{self.key[:self.key.index('_') + 1]}{_digest((self.key, block))}.json"

    def get(self, block: int) -> dict | None:
        """The stored part of ``block``, or ``None`` (missing or unreadable)."""
        try:
            part = json.loads(self._path(block).read_text())
        except Exception:  # noqa: BLE001 - a missing or damaged file (any read error) is recomputed, never trusted
            return None
        part["skipped"] = [tuple(s) for s in part["skipped"]]
        if "probs" in part:
            part["probs"] = torch.tensor(part["probs"], dtype=torch.float32)
        return part

    def put(self, block: int, part: dict) -> None:
        """Write ``block``'s part (lists, numbers, strings, float32 tensors) atomically."""
        write_text_atomic(self._path(block), json.dumps(part, default=lambda o: o.tolist()))


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
    ``columns`` holds, for the head's classes that score for one, ``(j, index of that class in classes)``;
    ``model_id`` is the model's id inside the defence's context (a defence may change it: an SAE attached,
    embeddings transformed).
    """

    model: Any
    defence: Defence
    classes: list[str]
    class_map: list[str | None]
    head: ZeroShotClassifier | EndpointHead
    model_id: str
    columns: list[tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self):
        index = {c: i for i, c in enumerate(self.classes)}
        self.columns = [(j, index[original]) for j, original in enumerate(self.class_map) if original is not None]

    @classmethod
    def make(cls, model, defence: Defence, classes: list[str], templates) -> "_Scorer":
        """Build the head; call inside ``defence.context(model)`` so that a text-tower ablation counts."""
        score_classes, class_map = defence.classes(classes)
        make_head = model.zero_shot_head if is_black_box(model) else model.classifier  # a black box scores images
        return cls(model, defence, classes, class_map, make_head(score_classes, defence.templates(templates)),
                   model.id)

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
                "model": self.model_id, "defence": self.defence.describe()}
        for name, value in want.items():
            if getattr(clean, name) != value:
                raise InvalidArgumentError(f"clean.{name}", getattr(clean, name),
                                           f"{value!r}, as in this evaluation (compute the clean scores with the "
                                           "same model, classes, templates and defence)")


def _bar(ctx: Context, total: int | None, batch_size: int, progress: bool | None, desc: str) -> ManualBar:
    """The bar of one pass over ``total`` images (on rank 0 only, counting every rank's); by default shown
    when they fill more than one batch."""
    return main_bar(ctx, progress, (total or 0) > batch_size, desc, total=total)


def clean_scores(model, images: Any, classes: Sequence[str], *, defence: Defence | None = None,
                 templates: str | Sequence[str] | None = None, batch_size: int = 32,
                 progress: bool | None = None, distributed: bool | None = None,
                 cache_dir: str | os.PathLike | None = None) -> CleanScores:
    """Zero-shot scores of the clean ``images`` among ``classes`` under ``defence``; returns :class:`CleanScores`.

    ``images`` is any source :func:`clipscope.data.iter_images` reads; unreadable images are
    skipped and listed in the result. Pass the result to :func:`evaluate` as ``clean`` (with the
    same model, classes, templates and defence) to score several attacks on the same images
    while encoding the clean images once. ``distributed`` (default: detect a launcher): each rank
    scores its range of the images and every rank gets all the scores (see the module docstring).
    ``cache_dir``: as for :func:`evaluate`, per block of ``batch_size`` positions.
    """
    classes = check_names("classes", classes)
    defence = _check_defence(defence)
    batch_size = check_int("batch_size", batch_size, low=1)
    if source_length(images) == 0:
        raise InvalidArgumentError("images", images, "at least one image")
    ctx = context(distributed)
    cache = _BlockCache.open(cache_dir, images, model, defence)
    with defence.context(model), _bar(ctx, source_length(images), batch_size, progress, "clean scores") as bar:
        scorer = _Scorer.make(model, defence, classes, templates)
        blocks = None if cache is None else cache.keyed("clean", (scorer.model_id, classes, scorer.head.classes,
                                                                  scorer.head.templates, batch_size))
        parts = _block_parts(images, None, ctx, batch_size, blocks, functools.partial(_clean_batches, scorer,
                                                                                       batch_size), bar)
    parts = [part for rank in gather_objects(parts, ctx) for part in rank]  # in rank order: the input's order
    probs = [part["probs"] for part in parts if "probs" in part]
    return CleanScores(tuple(classes), scorer.head.classes, scorer.head.templates, scorer.model_id,
                       defence.describe(), _joined(parts, "indices"), _joined(parts, "keys"),
                       torch.cat(probs) if probs else torch.zeros(0, len(classes)), _joined(parts, "predictions"),
                       _joined(parts, "skipped"))


def _clean_batches(scorer: _Scorer, batch_size: int, jobs: Iterable[tuple]) -> Iterator[tuple[int, dict, int]]:
    """``(block, part, n)`` per batch of ``jobs`` (see :func:`_block_parts`): the part holds the batch's
    ``indices``, ``keys``, ``probs`` (n, classes) and ``predictions``."""
    for batch in prefetch(_position_batches(jobs, batch_size, lambda job: job[0])):
        probs, names = scorer.scores([image for _, _, image, _ in batch])
        yield batch[0][0] // batch_size, {"indices": [job[0] for job in batch], "keys": [job[1] for job in batch],
                                          "probs": probs, "predictions": names}, len(batch)


def evaluate(model, images: Any, labels: Sequence[str | None], classes: Sequence[str], attack: Attack, *,
             defence: Defence | None = None, templates: str | Sequence[str] | None = None, batch_size: int = 32,
             seed: int = 0, progress: bool | None = None, n_examples: int = 8, workers: int | None = None,
             clean: CleanScores | None = None, distributed: bool | None = None,
             cache_dir: str | os.PathLike | None = None) -> AttackResult:
    """Attack ``images`` and compare zero-shot predictions before and after; returns an :class:`AttackResult`.

    ``labels`` are the true class names (or ``None`` where unknown) in the order of
    ``images`` (any source :func:`clipscope.data.iter_images` reads, generated
    lazily). Rendering runs off the main thread, a batch ahead of the model, in
    ``workers`` threads: by default one when the model runs on the CPU (it needs the
    cores), else :func:`~clipscope.data.default_workers`. With more than one worker the
    workers also preprocess the images, so that a GPU does not wait for Pillow (on a CPU
    model that competes with the model for the cores). Results do not depend on ``workers``.
    A batch holds the readable images among ``batch_size`` consecutive input positions, so a
    batch next to unreadable files is smaller than ``batch_size``.
    ``clean``: the clean images' scores from :func:`clean_scores` (same model, classes,
    templates and defence, else :class:`~clipscope.validate.InvalidArgumentError`); images
    it holds are not encoded clean again, others are. The result is the same with or without it.

    ``distributed`` (default: detect a launcher): each rank attacks its range of the images (a
    folder, list, tensor or table) and every rank returns the merged result, equal to one process's
    (see the module docstring). ``cache_dir``: the rows of every block of ``batch_size`` positions are
    written there as the block completes (atomically, under a key of everything that decides them: images,
    model id, defence, attack, classes, templates, labels, seed, batch size; not the rank or the number of
    processes), and a rerun of the same setting reads the blocks it finds: after a killed rank only the
    unfinished blocks are computed, also when relaunched on another number of processes. Refused
    (:class:`~clipscope.validate.InvalidArgumentError`) for a stream, while ``model.ablate`` / ``edit`` /
    ``steer`` is in force (the model id does not describe them) and for a defence known only by addresses.
    """
    classes, labels = check_attack_data(images, labels, classes, attack)
    defence = _check_defence(defence)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed)
    n_examples = check_int("n_examples", n_examples, low=0)
    if workers is not None:
        workers = check_int("workers", workers, low=1)
    ctx = context(distributed)
    cache = _BlockCache.open(cache_dir, images, model, defence)
    examples: list[AttackedImage] = []
    with defence.context(model), _bar(ctx, source_length(images), batch_size, progress, "typographic attack") as bar:
        scorer = _Scorer.make(model, defence, classes, templates)
        scorer.check(clean)
        blocks = None if cache is None else cache.keyed("evaluate", (
            scorer.model_id, labels, classes, scorer.head.classes, scorer.head.templates, attack, seed, batch_size))
        render = functools.partial(attack_job, attack, scorer.classes, seed)
        score = functools.partial(_attack_batches, scorer, render, (batch_size, workers), clean,
                                  (examples, n_examples))
        parts = _block_parts(images, labels, ctx, batch_size, blocks, score, bar)
    parts = [part for rank in gather_objects(parts, ctx) for part in rank]  # in rank order: the input's order
    if cache is not None or ctx.distributed:  # the first images were maybe read from the cache or by another rank
        examples = [render(job) for job in itertools.islice(readable_jobs(images, labels, None), n_examples)]
    frame, skipped = _frame(_joined(parts, "rows")), _joined(parts, "skipped")
    return AttackResult(frame, _metrics(frame, skipped), classes, attack.describe(), defence.describe(), examples,
                        skipped)


def _attack_batches(scorer: _Scorer, render, sizes: tuple[int, int | None], clean: CleanScores | None,
                    examples: tuple[list[AttackedImage], int], jobs: Iterable[tuple]) -> Iterator[tuple[int, dict, int]]:
    """``(block, part, n)`` per batch of ``jobs`` (see :func:`_block_parts`), the part holding the batch's
    ``rows``; ``sizes`` is ``(batch_size, workers)``; the first attacked images go to ``examples``, a
    ``(list, how many)``."""
    (batch_size, workers), (kept, n_examples) = sizes, examples
    for chunk, clean_scored, attacked_scored in _scored_batches(scorer, render, jobs, batch_size, workers, clean):
        kept += chunk[:max(0, n_examples - len(kept))]
        rows = [_row(it, scorer.classes, clean_scored, attacked_scored, i) for i, it in enumerate(chunk)]
        yield chunk[0].index // batch_size, {"rows": rows}, len(chunk)



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

    items = ordered_map(job, jobs, n_workers)
    for prepared in prefetch(_position_batches(items, batch_size, lambda p: p[0].index)):
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
          progress: bool | None = None, distributed: bool | None = None,
          cache_dir: str | os.PathLike | None = None) -> SweepResult:
    """Evaluate ``attack`` with one or two parameters varied over the given values; returns a :class:`SweepResult`.

    Parameters are :data:`SWEEPABLE` (text style fields, ``position``, and
    ``word``: the text written). ``images`` must be re-iterable (a list, folder or
    data set). Clean predictions are computed once (:func:`clean_scores`) and shared by every setting.
    ``distributed`` and ``cache_dir`` as for :func:`evaluate` (every rank returns the whole sweep; the clean
    scores are cached too).
    """
    import itertools

    import pandas as pd

    vary = check_vary(attack, classes, vary)
    if iter(images) is images:
        raise TypeError("sweep needs re-iterable images (a list, folder or data set), not a one-shot iterator")
    check_attack_data(images, labels, classes, attack)
    params = list(vary)
    ctx = context(distributed)
    clean = clean_scores(model, images, classes, defence=defence, templates=templates, batch_size=batch_size,
                         progress=False, distributed=ctx.distributed, cache_dir=cache_dir)
    rows, results = [], []
    combos = list(itertools.product(*vary.values()))
    for combo in progress_bar(combos, progress if ctx.is_main else False, True, "sweep", total=len(combos)):
        values = dict(zip(params, combo))
        result = evaluate(model, images, labels, classes, _vary(attack, classes, **dict(values)), defence=defence,
                          templates=templates, batch_size=batch_size, seed=seed, progress=False, n_examples=2,
                          clean=clean, distributed=ctx.distributed, cache_dir=cache_dir)
        results.append(result)
        rows.append({**values, **{k: result.metrics[k] for k in ("n", *METRICS)}})
    return SweepResult(pd.DataFrame(rows), params, results)
