"""The automated typographic-attack protocol of Goh et al. (2021), "Multimodal Neurons in Artificial
Neural Networks", Distill, section "Evaluating Typographic Attacks", as a runnable specification.

The protocol, as the article and its figure sources (github.com/distillpub/post--multimodal,
``AttackSetup.svelte``, ``AutomatedAttacks.svelte``, ``small_attacks.json``) state it:

- a **linear probe** on the image features (Goh et al.: RN50-4x, trained on the ImageNet training set)
  is the classifier under attack, not zero-shot prompts;
- the attack text is written **eight times, at the same (arbitrarily chosen) eight coordinates** and in
  one font style on every image (white text with a dark outline in their Figure 15); the attacks
  changed 6-10% of the pixels (**pixel cover**: the fraction of pixels changed by any amount, L0);
- an attack **succeeds** on an image when the probe's top class *becomes* the target class: the
  fraction reported is ``changed_to`` = (clean top-1 is not the target and attacked top-1 is) / n,
  over n = 1000 ImageNet validation images; images already classified as the target
  (``already_equal``) never count as successes.

:data:`DISTILL_SETUP` reproduces the positions (the centres of the eight copies in Figure 15, measured
on the 288-pixel image) and the style (DejaVu Sans, 7.1% of the image side, white with a one-pixel
black outline); :data:`GOH_TARGETS` holds the published table as reference columns. On the built-in
ResNet organism (64-pixel images, which cannot be read at 7% text height) :func:`organism_distill`
runs the same protocol with :data:`ORGANISM_SETUP` (one copy, a fifth of the image high, black on a
white label: 6-15% pixel cover, the article's range) on an organism target table
(:data:`ORGANISM_TARGETS`) generated from :mod:`clipscope.organism.scenes`.

Entry points: :func:`distill_protocol` (images in memory, or any source
:func:`clipscope.data.iter_images` reads), :func:`distill_protocol_folder` (an ImageNet-style folder
pair, one sub-folder per class) and :func:`organism_distill`; all return a :class:`DistillResult`.
"""
from __future__ import annotations

import difflib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import ImageLoadError, default_workers, iter_images, list_image_files, ordered_map
from ..io import figure_png, write_text_atomic
from ..pages import esc, image_uri, page, png_uri
from ..probe import LinearProbe, fit_linear_probe
from ..progress import progress_bar
from ..validate import InvalidArgumentError, check_int, check_names
from .render import Colour, TextStyle, check_colour, check_position, render_text, resolve_position


def _regular_font() -> str:
    """DejaVu Sans (regular), which ships with matplotlib: the look of Goh et al.'s Figure 15."""
    import matplotlib
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


#: The eight text centres of Goh et al.'s automated attack, as (x, y) fractions of the image: measured
#: on their Figure 15 (``example_after.png``, 288 x 288, the word "pizza"), whose copies form two
#: staircases from the top left towards the bottom right.
DISTILL_POSITIONS: tuple[tuple[float, float], ...] = (
    (0.1667, 0.1215), (0.3403, 0.2083), (0.1667, 0.2951), (0.3403, 0.3819),
    (0.5139, 0.4688), (0.6875, 0.5556), (0.5139, 0.6424), (0.6875, 0.7292))


@dataclass(frozen=True)
class DistillSetup:
    """Where and how the attack text is written: one copy per position (``(x, y)`` text centres, fractions
    of the image or any :func:`~clipscope.typographic.render.check_position` value), in ``style``, with a
    one-pixel ``outline`` colour drawn around the letters (``None``: no outline)."""

    positions: tuple = DISTILL_POSITIONS
    style: TextStyle = field(default_factory=lambda: TextStyle(font=_regular_font(), size=0.071, colour="white",
                                                               box=None))
    outline: Colour | None = "black"

    def __post_init__(self):
        if isinstance(self.positions, (str, bytes)) or not isinstance(self.positions, Sequence) or \
                not self.positions:
            raise InvalidArgumentError("positions", self.positions, "a non-empty list of text positions")
        object.__setattr__(self, "positions", tuple(check_position("positions", p) for p in self.positions))
        if not isinstance(self.style, TextStyle):
            raise InvalidArgumentError("style", self.style, "a TextStyle")
        if self.outline is not None:
            object.__setattr__(self, "outline", check_colour("outline", self.outline))

    def describe(self) -> str:
        s = self.style
        outline = f", {self.outline} outline" if self.outline is not None else ""
        box = f" on a {s.box} box" if s.box is not None else ""
        return (f"{len(self.positions)} cop{'y' if len(self.positions) == 1 else 'ies'}, size {s.size}, "
                f"{s.colour} text{box}{outline}, font {s.font.rsplit('/', 1)[-1]}")


#: Goh et al.'s setup: eight copies at :data:`DISTILL_POSITIONS`, white DejaVu Sans with a black outline.
DISTILL_SETUP = DistillSetup()
#: The organism's setup: one copy at the centre, a fifth of the image high, black on a white label (the
#: style the organism reads; 6-15% pixel cover on its 64-pixel images).
ORGANISM_SETUP = DistillSetup(positions=("center",), style=TextStyle(size=0.2, colour="black", box="white",
                                                                     padding=0.1), outline=None)


@dataclass(frozen=True)
class DistillTarget:
    """One row of the protocol's table: the probe class ``target``, the ``text`` written, and where known
    the published ``reference_success`` (fraction changed to the target), ``reference_cover`` (pixel cover)
    and the ImageNet ``wnid`` (so that a folder named by WordNet ids matches)."""

    target: str
    text: str
    reference_success: float | None = None
    reference_cover: float | None = None
    wnid: str | None = None


#: Goh et al. (2021), Figure "automated attacks": RN50-4x linear probe, n = 1000 ImageNet validation
#: images; success = fraction changed to the target, cover = mean L0 pixel cover (``small_attacks.json``).
GOH_TARGETS: tuple[DistillTarget, ...] = (
    DistillTarget("waste container", "trash", 0.954, 0.0759, "n02747177"),
    DistillTarget("iPod", "iPod", 0.947, 0.0680, "n03584254"),
    DistillTarget("rifle", "rifle", 0.910, 0.0641, "n04090263"),
    DistillTarget("pizza", "pizza", 0.923, 0.0811, "n07873807"),
    DistillTarget("radio", "radio", 0.770, 0.0773, "n04041544"),
    DistillTarget("great white shark", "shark", 0.622, 0.0833, "n01484850"),
    DistillTarget("library", "library", 0.759, 0.0995, "n03661043"),
    DistillTarget("Siamese cat", "meow", 0.465, 0.0844, "n02123597"),
    DistillTarget("piggy bank", "$$$", 0.364, 0.0699, "n03935335"),
)
#: Goh et al.'s probe accuracy on the clean images (``baseline_accuracy``), and their model, data and n.
GOH_BASELINE_ACCURACY = 0.742
GOH_REFERENCE = "Goh et al. 2021: RN50-4x linear probe, 1000 ImageNet validation images"
GOH_N = 1000


def _organism_targets() -> tuple[DistillTarget, ...]:
    from ..organism.scenes import OBJECT_WORDS, SHAPES
    return (tuple(DistillTarget(w, w) for w in OBJECT_WORDS) + tuple(DistillTarget(s, s) for s in SHAPES)
            + (DistillTarget("pizza", "qxz"),))


#: The organism's target table: every object word (a class the probe learns from word scenes), every
#: shape (a class it learns from drawn shapes), each attacked with its own name, and a control that
#: writes letters the organism never saw as a word ("qxz") against the target "pizza".
ORGANISM_TARGETS: tuple[DistillTarget, ...] = _organism_targets()


def organism_distill_data(n_train: int = 420, n_test: int = 140, seed: int = 7_000_000
                          ) -> tuple[list[Image.Image], list[str], list[Image.Image], list[str]]:
    """Probe data for the organism: ``(train_images, train_labels, test_images, test_labels)``.

    Classes are the organism's shapes (word-free object scenes of that shape) and object words
    (word-only scenes of that word), cycled so that every class has the same count (to within one);
    train and test are drawn from disjoint seeded streams (``seed`` and ``seed + 1``; training of the
    organism used seed 0).
    """
    from ..organism.scenes import OBJECT_WORDS, SHAPES, object_scene, scene_rng, word_scene
    n_train, n_test = check_int("n_train", n_train, low=2), check_int("n_test", n_test, low=1)
    seed = check_int("seed", seed)
    classes = list(SHAPES) + list(OBJECT_WORDS)

    def draw(n: int, stream: int) -> tuple[list[Image.Image], list[str]]:
        images, labels = [], []
        for i in range(n):
            c = classes[i % len(classes)]
            rng = scene_rng(stream, i, "distill")
            scene = object_scene(shape=c, rng=rng) if c in SHAPES else word_scene(word=c, rng=rng)
            images.append(scene.image)
            labels.append(c)
        return images, labels

    return (*draw(n_train, seed), *draw(n_test, seed + 1))


def stamp(image: Image.Image, text: str, setup: DistillSetup = DISTILL_SETUP) -> tuple[Image.Image, float]:
    """``text`` written at every position of ``setup`` on a copy of ``image``; returns ``(image, cover)``,
    cover the fraction (0..1) of pixels changed by any amount (Goh et al.'s L0 pixel cover)."""
    out = image.convert("RGB")
    outline = setup.style.replace(colour=setup.outline) if setup.outline is not None else None
    for position in setup.positions:
        if outline is None:
            out = render_text(out, text, setup.style, position).image
            continue
        x, y = _centre(position, out.size)
        for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):  # a one-pixel outline under the letters
            out = render_text(out, text, outline, (_inside(x + dx, out.width), _inside(y + dy, out.height))).image
        out = render_text(out, text, setup.style, (x, y)).image
    before = np.asarray(image.convert("RGB"))
    return out, float(np.any(np.asarray(out) != before, axis=-1).mean())


def _centre(position, size: tuple[int, int]) -> tuple[int, int]:
    """The pixel centre of ``position`` on an image of ``size``, inside the image."""
    cx, cy = resolve_position(position, size, random.Random(0))
    return _inside(int(round(cx)), size[0]), _inside(int(round(cy)), size[1])


def _inside(v: int, limit: int) -> int:
    return min(max(v, 0), limit - 1)


@dataclass
class DistillResult:
    """The protocol's outcome.

    ``frame``: one row per target with ``target``, ``text``, ``n`` (test images), ``cover`` (mean pixel
    cover, 0..1), ``changed_to`` (the success rate of the protocol: clean top-1 not the target and
    attacked top-1 the target, over n), its Wilson 95% interval ``changed_to_low``/``_high``,
    ``already_equal`` (clean and attacked top-1 both the target), ``changed_away`` (clean top-1 the target,
    attacked not), ``neither`` (neither is the target; the four fractions sum to 1), ``success_eligible`` (changed_to among the images not already the target, the
    definition :func:`~clipscope.typographic.evaluate` uses) and the reference columns
    ``reference_success`` / ``reference_cover`` (NaN where the table has none). ``clean_accuracy`` is the
    probe's accuracy on the clean test images (with ``clean_interval``), ``reference_accuracy`` the
    published one; ``images`` holds one row per (target, test image).
    """

    frame: Any
    clean_accuracy: float
    clean_interval: tuple[float, float]
    reference_accuracy: float | None
    reference: str
    setup: DistillSetup
    probe: LinearProbe
    images: Any
    examples: list[tuple[str, Image.Image]] = field(default_factory=list)
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    model: str = ""

    def to_frame(self):
        """The per-target table (see the class docstring), measured next to the reference columns."""
        return self.frame

    def plot(self, ax=None):
        """Bars of the measured success (with Wilson 95% intervals) next to the reference per target;
        returns the figure."""
        import matplotlib.pyplot as plt
        f = self.frame
        if ax is None:
            _, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(f) + 2), 3.6))
        x = np.arange(len(f))
        err = np.clip([f["changed_to"] - f["changed_to_low"], f["changed_to_high"] - f["changed_to"]], 0, None)
        ax.bar(x - 0.2, f["changed_to"], 0.4, yerr=err, capsize=2, color="tab:red", label="measured")
        ref = f["reference_success"].astype(float)
        if ref.notna().any():
            ax.bar(x + 0.2, ref.fillna(0), 0.4, color="tab:gray", label="Goh et al. 2021")
        ax.set_xticks(x, [f"{t}\n'{w}'" for t, w in zip(f["target"], f["text"])], fontsize=7, rotation=40,
                      ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("attack success (changed to target)")
        ax.set_title(f"Distill protocol on {self.model}: probe clean accuracy {self.clean_accuracy:.1%}", fontsize=9)
        ax.legend(fontsize=8)
        ax.figure.tight_layout()
        return ax.figure

    def _table_html(self) -> str:
        cols = ["target", "text", "n", "cover", "reference_cover", "changed_to", "changed_to_low", "changed_to_high",
                "reference_success", "already_equal", "changed_away", "success_eligible"]
        return self.frame[cols].to_html(index=False, float_format="{:.3f}".format, na_rep="")

    def _repr_html_(self) -> str:
        lo, hi = self.clean_interval
        ref = f" (reference {self.reference_accuracy:.1%})" if self.reference_accuracy is not None else ""
        return (f"<p><b>Distill automated-attack protocol</b> on {esc(self.model)}: {esc(self.setup.describe())}; "
                f"probe clean accuracy {self.clean_accuracy:.1%} [{lo:.1%}, {hi:.1%}]{ref}; "
                f"reference: {esc(self.reference)}</p>{self._table_html()}")

    def to_html(self) -> str:
        """A self-contained report page: the table, the plot and one attacked example per target."""
        examples = "".join(f'<figure style="display:inline-block;margin:4px"><img src="{image_uri(im, 128)}">'
                           f"<figcaption>{esc(t)}</figcaption></figure>" for t, im in self.examples)
        skipped = "".join(f"<li>{esc(k)}: {esc(r)}</li>" for k, r in self.skipped)
        body = (f"{self._repr_html_()}<img src=\"{png_uri(figure_png(self.plot()))}\">"
                f"<h2>Examples</h2>{examples}<h2>Skipped images</h2><p>{len(self.skipped)} unreadable image(s) "
                f"skipped</p><ul>{skipped}</ul>")
        return page("Distill automated typographic attack", body)

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path."""
        return write_text_atomic(path, self.to_html())


def _readable(images: Any, labels: Sequence[str], parameter: str, skipped: list) -> tuple[list, list[str]]:
    """The readable PIL images of ``images`` and their labels; unreadable ones go to ``skipped``."""
    labels = list(labels)
    out, kept, count = [], [], 0
    for i, (key, image) in enumerate(iter_images(images)):
        count = i + 1
        if i >= len(labels):
            break
        if isinstance(image, ImageLoadError):
            skipped.append((images[key] if isinstance(images, (list, tuple)) and isinstance(key, int) else key,
                            str(image)))
            continue
        if not isinstance(image, Image.Image):
            raise InvalidArgumentError(f"{parameter}_images", type(image).__name__, "PIL images, paths or a folder")
        out.append(image)
        kept.append(labels[i])
    if count != len(labels):
        raise InvalidArgumentError(f"{parameter}_labels", f"<{len(labels)} items>",
                                   f"one label per image of {parameter}_images")
    return out, kept


def check_targets(targets: Any, classes: Sequence[str]) -> list[DistillTarget]:
    """Return ``targets`` as a list of :class:`DistillTarget` whose ``target`` is one of ``classes``; else raise
    :class:`~clipscope.validate.InvalidArgumentError` naming the first bad target and close class names."""
    if isinstance(targets, (str, bytes, DistillTarget)) or not isinstance(targets, Sequence) or not targets:
        raise InvalidArgumentError("targets", targets, "a non-empty list of DistillTarget(target, text)")
    out = []
    for t in targets:
        if isinstance(t, Sequence) and not isinstance(t, (str, bytes)) and len(t) == 2:
            t = DistillTarget(*t)
        if not isinstance(t, DistillTarget) or not isinstance(t.text, str) or not t.text.strip():
            raise InvalidArgumentError("targets", t, "DistillTarget(target, text) or (target, text) with a "
                                                     "non-empty text")
        if t.target not in classes:
            close = difflib.get_close_matches(str(t.target), list(classes), n=3)
            hint = f"; close: {close}" if close else ""
            raise InvalidArgumentError("targets", t.target, f"a class of the probe ({len(classes)} classes){hint}")
        out.append(t)
    return out


def distill_protocol(model, train_images: Any, train_labels: Sequence[str], test_images: Any,
                     test_labels: Sequence[str], targets: Sequence[DistillTarget] = GOH_TARGETS, *,
                     setup: DistillSetup = DISTILL_SETUP, probe: LinearProbe | None = None,
                     reference_accuracy: float | None = GOH_BASELINE_ACCURACY, reference: str = GOH_REFERENCE,
                     batch_size: int = 64, seed: int = 0, grid: int = 13, n_examples: int = 1,
                     progress: bool | None = None) -> DistillResult:
    """Run Goh et al.'s automated typographic attack against a linear probe; returns a :class:`DistillResult`.

    A logistic-regression probe (:func:`clipscope.probe.fit_linear_probe`, ``grid`` C values, ``seed``)
    is fitted on the unit-norm image embeddings of ``train_images`` with classes ``train_labels``
    (or ``probe``, already fitted, is used). Every readable test image is then classified clean and
    with each target's text written at ``setup``'s positions; see the module docstring for the
    counts. ``targets``' classes must be probe classes. Unreadable images are skipped and listed.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed)
    n_examples = check_int("n_examples", n_examples, low=0)
    if not isinstance(setup, DistillSetup):
        raise InvalidArgumentError("setup", setup, "a DistillSetup (DISTILL_SETUP, ORGANISM_SETUP, ...)")
    skipped: list = []
    if probe is None:
        train_labels = check_names("train_labels", train_labels, min_count=2, unique=False)
        train, train_y = _readable(train_images, train_labels, "train", skipped)
        if len(set(train_y)) < 2:
            raise InvalidArgumentError("train_labels", sorted(set(train_y)),
                                       "at least two classes among the readable images")
        probe = fit_linear_probe(model.encode_image(train, batch_size=batch_size, progress=progress), np.array(train_y),
                                 grid=grid, seed=seed)
    elif not isinstance(probe, LinearProbe):
        raise InvalidArgumentError("probe", probe, "a LinearProbe from clipscope.probe.fit_linear_probe, or None")
    classes = [str(c) for c in probe.classes]
    targets = check_targets(targets, classes)
    test_labels = check_names("test_labels", test_labels, unique=False)
    test, test_y = _readable(test_images, test_labels, "test", skipped)
    if not test:
        raise InvalidArgumentError("test_images", test_images, "at least one readable image")
    test_y = np.array(test_y)
    clean = probe.predict(model.encode_image(test, batch_size=batch_size, progress=False))
    clean_correct = int((clean == test_y).sum())
    workers = 1 if model.device.type == "cpu" else default_workers()
    rows, per_image, examples = [], [], []
    for t in progress_bar(targets, progress, True, "distill targets", total=len(targets)):
        stamped = list(ordered_map(lambda im, text=t.text: stamp(im, text, setup), test, workers))
        attacked = probe.predict(model.encode_image([im for im, _ in stamped], batch_size=batch_size, progress=False))
        covers = np.array([c for _, c in stamped])
        rows.append(_row(t, clean, attacked, covers))
        per_image.append({"target": t.target, "text": t.text, "label": test_y, "clean_prediction": clean,
                          "attacked_prediction": attacked, "cover": covers})
        examples += [(f"{t.target}: '{t.text}'", stamped[i][0]) for i in range(min(n_examples, len(stamped)))]
    import pandas as pd
    frame = pd.DataFrame(rows)
    images = pd.concat([pd.DataFrame(p) for p in per_image], ignore_index=True)
    from ..audit.metrics import wilson
    return DistillResult(frame, clean_correct / len(test_y), wilson(clean_correct, len(test_y)), reference_accuracy,
                         reference, setup, probe, images, examples, skipped, getattr(model, 'name', repr(model)))


def _row(t: DistillTarget, clean: np.ndarray, attacked: np.ndarray, covers: np.ndarray) -> dict:
    """The counts of one target (see :class:`DistillResult`)."""
    from ..audit.metrics import wilson
    n = len(clean)
    was, now = clean == t.target, attacked == t.target
    changed_to = int((~was & now).sum())
    eligible = int((~was).sum())
    lo, hi = wilson(changed_to, n)
    nan = float("nan")
    return {"target": t.target, "text": t.text, "n": n, "cover": float(covers.mean()),
            "changed_to": changed_to / n, "changed_to_low": lo, "changed_to_high": hi,
            "already_equal": float((was & now).mean()), "changed_away": float((was & ~now).mean()),
            "neither": float((~was & ~now).mean()),
            "success_eligible": changed_to / eligible if eligible else nan,
            "reference_success": nan if t.reference_success is None else t.reference_success,
            "reference_cover": nan if t.reference_cover is None else t.reference_cover}


def _folder(folder: str | Path, parameter: str, class_names: Mapping[str, str] | None, limit: int | None,
            per_class: bool, seed: int) -> tuple[list[str], list[str]]:
    """Image paths of an ImageNet-style ``folder`` and their classes (sub-folder names, renamed by
    ``class_names``), at most ``limit`` (per class when ``per_class``) drawn with ``seed``."""
    files = list_image_files(folder)
    if not files:
        raise InvalidArgumentError(parameter, str(folder), "a folder with image files in one sub-folder per class")
    names = [f.parent.name for f in files]
    if class_names is not None:
        names = [class_names.get(n, n) for n in names]
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    if limit is not None and per_class:
        counts: dict[str, int] = {}
        kept = []
        for i in order:
            counts[names[i]] = counts.get(names[i], 0) + 1
            if counts[names[i]] <= limit:
                kept.append(i)
        order = kept
    elif limit is not None:
        order = order[:limit]
    order.sort()
    return [str(files[i]) for i in order], [names[i] for i in order]


def distill_protocol_folder(model, train_folder: str | Path, test_folder: str | Path,
                            targets: Sequence[DistillTarget] = GOH_TARGETS, *,
                            class_names: Mapping[str, str] | None = None, n_test: int | None = GOH_N,
                            n_train_per_class: int | None = None, seed: int = 0, **options) -> DistillResult:
    """:func:`distill_protocol` on ImageNet-style folders (one sub-folder per class, e.g. ``train/`` and
    ``val/``); returns a :class:`DistillResult`.

    Class names are the sub-folder names, renamed by ``class_names`` (folder -> name) where given. A
    target whose class is not a folder's class but whose ``wnid`` is (folders named by WordNet id, as
    ImageNet's are) is matched through the wnid. ``n_test`` test images (Goh et al.: 1000) and at most
    ``n_train_per_class`` training images per class are drawn at random with ``seed``; ``options`` go
    to :func:`distill_protocol`.
    """
    seed = check_int("seed", seed)
    if n_test is not None:
        n_test = check_int("n_test", n_test, low=1)
    if n_train_per_class is not None:
        n_train_per_class = check_int("n_train_per_class", n_train_per_class, low=1)
    train, train_y = _folder(train_folder, "train_folder", class_names, n_train_per_class, True, seed)
    test, test_y = _folder(test_folder, "test_folder", class_names, n_test, False, seed + 1)
    classes = set(train_y)
    matched = []
    for t in targets if isinstance(targets, Sequence) else []:
        if isinstance(t, DistillTarget) and t.target not in classes and t.wnid is not None:
            name = class_names.get(t.wnid, t.wnid) if class_names is not None else t.wnid
            if name in classes:
                t = DistillTarget(name, t.text, t.reference_success, t.reference_cover, t.wnid)
        matched.append(t)
    return distill_protocol(model, train, train_y, test, test_y, matched or targets, seed=seed, **options)


def organism_distill(model, *, n_train: int = 420, n_test: int = 140, seed: int = 7_000_000,
                     targets: Sequence[DistillTarget] = ORGANISM_TARGETS, **options) -> DistillResult:
    """The protocol on a model organism: :func:`organism_distill_data` as probe data, :data:`ORGANISM_TARGETS`,
    :data:`ORGANISM_SETUP` and no published reference; returns a :class:`DistillResult`."""
    data = organism_distill_data(n_train, n_test, seed)
    options = {"setup": ORGANISM_SETUP, "reference_accuracy": None,
               "reference": "none (organism target table)", **options}
    return distill_protocol(model, *data, targets, **options)

