"""Typographic attacks: which text goes on which image, in which style, generated lazily.

An :class:`Attack` pairs a text policy with a :class:`~clipscope.typographic.render.TextStyle`
and a position:

- :meth:`Attack.untargeted` writes the name of a *wrong* class (drawn per image, seeded);
- :meth:`Attack.targeted` writes one chosen class name on every image;
- :meth:`Attack.free_text` writes any text (success is then undefined; accuracy still is).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..data import ImageLoadError, default_workers, iter_images, ordered_map
from .render import Position, TextStyle, render_text


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
        if self.mode not in ("untargeted", "targeted", "text"):
            raise ValueError(f"unknown attack mode {self.mode!r}; valid: 'untargeted', 'targeted', 'text'")
        if self.mode != "untargeted" and not self.target:
            raise ValueError(f"a {self.mode} attack needs its text (target)")

    def replace(self, **changes) -> "Attack":
        """A copy with attack fields (``mode``, ``target``, ``position``) or style fields changed."""
        style_fields = set(TextStyle.__dataclass_fields__)
        style_changes = {k: v for k, v in changes.items() if k in style_fields}
        own = {k: v for k, v in changes.items() if k not in style_fields}
        unknown = set(own) - {"mode", "target", "position"}
        if unknown:
            raise ValueError(f"unknown attack parameter(s) {sorted(unknown)}; valid: "
                             f"{sorted(style_fields | {'mode', 'target', 'position'})}")
        style = self.style.replace(**style_changes) if style_changes else self.style
        return Attack(own.get("mode", self.mode), own.get("target", self.target), style,
                      own.get("position", self.position))

    def check(self, classes: Sequence[str]) -> None:
        """Raise ``ValueError`` if the attack cannot be scored against ``classes``."""
        if self.mode == "targeted" and self.target not in classes:
            raise ValueError(f"targeted attack text {self.target!r} is not one of the classes {list(classes)}; "
                             "use Attack.free_text for text outside the class list")
        if self.mode == "untargeted" and len(classes) < 2:
            raise ValueError("an untargeted attack needs at least two classes")

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
    attack.check(classes)
    yield from ordered_map(lambda job: attack_job(attack, classes, seed, job), readable_jobs(images, labels, skipped),
                           default_workers() if workers is None else workers)


def readable_jobs(images: Any, labels: Iterable[str | None], skipped: list | None) -> Iterator[tuple]:
    """``(index, key, image, label)`` for each readable image; unreadable ones go to ``skipped``."""
    for index, ((key, image), label) in enumerate(zip(iter_images(images), labels)):
        if isinstance(image, ImageLoadError):
            if skipped is not None:
                skipped.append((key, str(image)))
            continue
        if not isinstance(image, Image.Image):
            raise TypeError("typographic attacks need PIL images, paths or a data set, not preprocessed tensors")
        yield index, key, image, label


def attack_job(attack: Attack, classes: Sequence[str], seed: int, job: tuple) -> AttackedImage:
    """Attack the image of one :func:`readable_jobs` item (thread-safe: fonts are per thread)."""
    index, key, image, label = job
    item = apply(attack, image, label, classes, index, seed)
    item.key = key
    return item
