"""Progress bars for the long loops (encoding, rendering words): shown or not by one rule.

Every function with a ``progress`` argument takes ``True`` (show a bar), ``False`` (never) or
``None`` (its own default, usually "when there is more than one batch").
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], show: bool | None, default: bool, desc: str,
                 total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar labelled ``desc`` (of ``total`` steps, when known) if ``show``
    is true, or ``show`` is ``None`` and ``default`` is true; otherwise ``iterable`` itself.

    The bar disappears when the loop ends (``leave=False``).
    """
    if not (default if show is None else show):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)
