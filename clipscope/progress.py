"""Progress bars for the long loops (encoding, mining, rendering): shown or not by one rule.

Every function with a ``progress`` argument takes ``True`` (show a bar), ``False`` (never) or
``None`` (its own default, usually "when there is more than one batch"). Loops over an iterable
wrap it in :func:`progress_bar`; loops that advance by hand (a batch of images at a time) use
:func:`manual_bar`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

__all__ = ["HiddenBar", "ManualBar", "manual_bar", "progress_bar"]

T = TypeVar("T")


class ManualBar(Protocol):
    """A bar advanced by hand; a context manager that closes the bar on exit."""

    def update(self, n: int = 1) -> Any:
        """Advance the bar by ``n`` steps."""

    def set_postfix(self, **values: Any) -> Any:
        """Show ``values`` after the bar (e.g. the current objective)."""

    def close(self) -> None:
        """Remove the bar."""

    def __enter__(self) -> "ManualBar": ...

    def __exit__(self, *exc: Any) -> Any: ...


def _shown(show: bool | None, default: bool) -> bool:
    """Whether a bar is shown: ``show`` when given, else ``default``."""
    return default if show is None else bool(show)


def progress_bar(iterable: Iterable[T], show: bool | None, default: bool, desc: str,
                 total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar labelled ``desc`` (of ``total`` steps, when known) if ``show``
    is true, or ``show`` is ``None`` and ``default`` is true; otherwise ``iterable`` itself.

    The bar disappears when the loop ends (``leave=False``).
    """
    if not _shown(show, default):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def manual_bar(show: bool | None, default: bool, desc: str, total: int | None = None) -> ManualBar:
    """A bar labelled ``desc`` of ``total`` steps (``None``: unknown) that the caller advances with
    ``update(n)``; shown by the same rule as :func:`progress_bar`. Use it as a context manager
    (``with manual_bar(...) as bar:``): the bar disappears on exit (``leave=False``). A hidden bar is
    a :class:`HiddenBar`, whose methods do nothing.
    """
    if not _shown(show, default):
        return HiddenBar()
    from tqdm.auto import tqdm
    return tqdm(desc=desc, total=total, leave=False)


class HiddenBar:
    """The :class:`ManualBar` of a hidden progress bar: every method does nothing."""

    def update(self, n: int = 1) -> None:
        """Do nothing (a shown bar advances by ``n``)."""

    def set_postfix(self, **values: Any) -> None:
        """Do nothing (a shown bar shows ``values``)."""

    def close(self) -> None:
        """Do nothing (a shown bar disappears)."""

    def __enter__(self) -> "HiddenBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
