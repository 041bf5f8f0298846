"""Typographic attacks: which text goes on which image, in which style, generated lazily.

An :class:`Attack` pairs a text policy with a :class:`~clipscope.typographic.render.TextStyle`
and a position:

- :meth:`Attack.untargeted` writes the name of a *wrong* class (drawn per image, seeded);
- :meth:`Attack.targeted` writes one chosen class name on every image;
- :meth:`Attack.free_text` writes any text (success is then undefined; accuracy still is).
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..data import ImageLoadError, default_workers, iter_images, ordered_map
from ..validate import InvalidArgumentError, check_choice, check_int, check_names
from .render import Position, TextStyle, check_position, render_text

MODES = ("untargeted", "targeted", "text")


@dataclass(frozen=True)
class Attack:
    """What to write (``mode`` + ``target``), how (``style``) and where (``position``)."""

    mode: str = "untargeted"
    target: str | None = None
    style: TextStyle = field(default_factory=TextStyle)
    position: Position = "center"

    @classmethod
    def untargeted(cls, style: TextStyle | None = None, position: Position = "center") -> "Attack":
        """Write a randomly drawn wrong class name on each image."""
        return cls("untargeted", None, style or TextStyle(), position)

    @classmethod
    def targeted(cls, target: str, style: TextStyle | None = None, position: Position = "center") -> "Attack":
        """Write ``target`` (a class name) on every image."""
        return cls("targeted", target, style or TextStyle(), position)

    @classmethod
    def free_text(cls, text: str, style: TextStyle | None = None, position: Position = "center") -> "Attack":
        """Write arbitrary ``text`` on every image (need not be a class)."""
        return cls("text", text, style or TextStyle(), position)

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if self.mode == "untargeted" and self.target is not None:
            raise InvalidArgumentError("target", self.target, "no target for an untargeted attack (it writes a "
                                                              "wrong class per image); use Attack.targeted")
        if self.mode != "untargeted" and not (isinstance(self.target, str) and self.target.strip()):
            raise InvalidArgumentError("target", self.target, f"the text a {self.mode} attack writes "
                                                              "(a non-empty string)")
        if not isinstance(self.style, TextStyle):
            raise InvalidArgumentError("style", self.style, "a TextStyle")
        object.__setattr__(self, "position", check_position("position", self.position))

    def replace(self, **changes) -> "Attack":
        """A copy with attack fields (``mode``, ``target``, ``position``) or style fields changed."""
        style_fields = set(TextStyle.__dataclass_fields__)
        style_changes = {k: v for k, v in changes.items() if k in style_fields}
        own = {k: v for k, v in changes.items() if k not in style_fields}
        unknown = sorted(set(own) - {"mode", "target", "position"})
        if unknown:
            raise InvalidArgumentError(unknown[0], own[unknown[0]], "unknown attack parameter; valid: "
                                       f"{sorted(style_fields | {'mode', 'target', 'position'})}")
        style = self.style.replace(**style_changes) if style_changes else self.style
        return Attack(own.get("mode", self.mode), own.get("target", self.target), style,
                      own.get("position", self.position))

    def check(self, classes: Sequence[str]) -> list[str]:
        """Return ``classes`` as a list if the attack can be scored against them; else raise
        :class:`~clipscope.validate.InvalidArgumentError` (an untargeted attack needs two classes,
        a targeted one its target among them)."""
        classes = check_names("classes", classes, min_count=2 if self.mode == "untargeted" else 1)
        if self.mode == "targeted" and self.target not in classes:
            raise InvalidArgumentError("target", self.target, f"one of the classes {classes}; use "
                                                              "Attack.free_text for text outside the class list")
        return classes

    def text_for(self, label: str | None, classes: Sequence[str], index: int, seed: int) -> str:
        """The text written on image number ``index`` whose true class is ``label``."""
        if self.mode != "untargeted":
            return self.target
        wrong = [c for c in classes if c != label]
        return random.Random(f"{seed}:{index}").choice(wrong)

    def describe(self) -> str:
        """A one-line description (for reports)."""
        s = self.style
        what = {"untargeted": "a wrong class name", "targeted": repr(self.target), "text": repr(self.target)}[self.mode]
        return (f"{self.mode} attack writing {what} at {self.position!r}: size {s.size}, colour {s.colour}, "
                f"box {s.box} (opacity {s.box_opacity}), opacity {s.opacity}, rotation {s.rotation}, "
                f"repeat {s.repeat}, font {s.font.rsplit('/', 1)[-1]}")


@dataclass
class AttackedImage:
    """One generated attack: the clean and attacked images, the text written and its pixel cover (0..1)."""

    key: Any
    index: int
    label: str | None
    text: str
    clean: Image.Image
    attacked: Image.Image
    cover: float


def apply(attack: Attack, image: Image.Image, label: str | None, classes: Sequence[str], index: int,
          seed: int = 0) -> AttackedImage:
    """Attack one image; returns an :class:`AttackedImage`."""
    text = attack.text_for(label, classes, index, seed)
    rendered = render_text(image, text, attack.style, attack.position, seed=seed * 1_000_003 + index)
    return AttackedImage(index, index, label, text, image, rendered.image, rendered.cover)


def generate(attack: Attack, images: Any, labels: Iterable[str | None], classes: Sequence[str], *,
             seed: int = 0, skipped: list | None = None, workers: int | None = None) -> Iterator[AttackedImage]:
    """Lazily attack every readable image of ``images`` (any source :func:`clipscope.data.iter_images` reads).

    ``labels`` are the true class names in the same order. Unreadable images are
    appended to ``skipped`` as ``(key, reason)`` and left out. Images are rendered by
    ``workers`` threads (default: :func:`~clipscope.data.default_workers`), in order and
    with the same result as one thread (each image's randomness is seeded by its
    index); at most ``2 * workers`` images are held beyond the current one.
    """
    classes = attack.check(classes)
    seed = check_int("seed", seed)
    workers = default_workers() if workers is None else check_int("workers", workers, low=1)
    yield from ordered_map(lambda job: attack_job(attack, classes, seed, job), readable_jobs(images, labels, skipped),
                           workers)


def readable_jobs(images: Any, labels: Iterable[str | None] | None, skipped: list | None) -> Iterator[tuple]:
    """``(index, key, image, label)`` for each readable image; unreadable ones go to ``skipped``.

    The key is the image's path where it has one (a folder's files, a list of paths), else
    what :func:`~clipscope.data.iter_images` gives (its position). A stream whose number of
    labels differs from its number of images raises where the difference shows; ``labels=None``
    gives every image the label ``None``.
    """
    labels = iter(labels) if labels is not None else None
    count = 0
    for index, (key, image) in enumerate(iter_images(images)):
        label = next(labels, _MISSING) if labels is not None else None
        if label is _MISSING:
            raise InvalidArgumentError("labels", f"<{index} items>", "one label per image (there are more images)")
        count += 1
        key = image_key(images, key)
        if isinstance(image, ImageLoadError):
            if skipped is not None:
                skipped.append((key, str(image)))
            continue
        if not isinstance(image, Image.Image):
            raise TypeError("typographic attacks need PIL images, paths or a data set, not preprocessed tensors")
        yield index, key, image, label
    if labels is not None and next(labels, _MISSING) is not _MISSING:
        raise InvalidArgumentError("labels", f"<more than {count} items>", f"one label per image ({count} images)")


_MISSING = object()


def image_key(source: Any, key: Any) -> Any:
    """The key that names item ``key`` of ``source`` in results: its path (a string) when it is a path, else ``key``."""
    if isinstance(source, (list, tuple)) and isinstance(key, int) and isinstance(source[key], (str, os.PathLike)):
        return str(source[key])
    return key


def attack_job(attack: Attack, classes: Sequence[str], seed: int, job: tuple) -> AttackedImage:
    """Attack the image of one :func:`readable_jobs` item (thread-safe: fonts are per thread)."""
    index, key, image, label = job
    item = apply(attack, image, label, classes, index, seed)
    item.key = key
    return item
