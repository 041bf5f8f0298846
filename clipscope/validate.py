"""Argument validation at the boundary: one error type and a few small declarative checks.

Every public entry point validates its arguments once, here, so that a bad value gets one error
that names the parameter, the value and what is valid, instead of a traceback from deep inside
torch or Pillow. The checks return the (possibly normalized) value so they can be used inline::

    size = check_number("size", size, low=0, low_open=True)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any


class InvalidArgumentError(ValueError):
    """A bad argument: ``parameter`` got ``value``; ``valid`` says what would be accepted."""

    def __init__(self, parameter: str, value: Any, valid: str):
        self.parameter, self.value, self.valid = parameter, value, valid
        super().__init__(f"{parameter}={_short(value)} is not valid: {valid}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(parameter: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) with ``low <= value <= high``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        value = int(value)
        ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise InvalidArgumentError(parameter, value, ("an integer " + _range_text(low, high, False, False)).strip())
    return value


def check_number(parameter: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number in the given range (closed by default)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (low is None or (v > low if low_open else v >= low)) and \
             (high is None or (v < high if high_open else v <= high))
    if not ok:
        raise InvalidArgumentError(parameter, value,
                                   ("a finite number " + _range_text(low, high, low_open, high_open)).strip())
    return float(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_choice(parameter: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable or incomparable
        ok = False
    if not ok:
        raise InvalidArgumentError(parameter, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_names(parameter: str, value: Any, *, min_count: int = 1, unique: bool = True) -> list[str]:
    """Return ``value`` as a list of names: non-empty, stripped strings, at least ``min_count`` of them.

    A single string is refused (``["cat", "dog"]``, not ``"cat, dog"``), as are duplicates when ``unique``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgumentError(parameter, value, f"a list of at least {min_count} non-empty strings")
    names = list(value)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(parameter, value, f"non-empty strings only; {_short(name)} is not one")
    if len(names) < min_count:
        raise InvalidArgumentError(parameter, value, f"a list of at least {min_count} non-empty strings")
    if unique:
        seen = set()
        for name in names:
            if name in seen:
                raise InvalidArgumentError(parameter, value, f"names must be unique; {name!r} appears twice")
            seen.add(name)
    return names


def check_same_length(**sequences: Sequence[Any]) -> int:
    """Return the common length of the named sequences; raise naming both if two differ."""
    items = [(name, len(seq)) for name, seq in sequences.items()]
    first_name, first_len = items[0]
    for name, n in items[1:]:
        if n != first_len:
            raise InvalidArgumentError(name, f"<{n} items>",
                                       f"must have as many items as {first_name} ({first_len})")
    return first_len


def check_vector(parameter: str, value: Any, *, size: int | None = None):
    """Return ``value`` as a 1-D float tensor if it is finite, non-zero and (if given) ``size`` long."""
    import torch
    try:
        vec = torch.as_tensor(value, dtype=torch.float32).detach()
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(parameter, value, "a 1-D vector of finite numbers") from None
    if vec.ndim != 1 or vec.numel() == 0:
        raise InvalidArgumentError(parameter, f"<shape {tuple(vec.shape)}>", "a 1-D vector of finite numbers")
    if size is not None and vec.numel() != size:
        raise InvalidArgumentError(parameter, f"<{vec.numel()} entries>", f"a vector of {size} entries")
    if not torch.isfinite(vec).all():
        raise InvalidArgumentError(parameter, "<vector with NaN or inf>", "finite entries only")
    if not vec.abs().sum() > 0:
        raise InvalidArgumentError(parameter, "<zero vector>", "a non-zero direction")
    return vec
