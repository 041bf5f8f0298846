"""Progress bars follow one rule everywhere: ``progress=True`` shows a bar, ``False`` never does, and
``None`` leaves it to the loop's default. Loops over an iterable (``progress_bar``) and loops advanced
by hand (``manual_bar``) apply the same rule, and a manual bar closes when its ``with`` block ends."""
from __future__ import annotations

import itertools

import pytest
from tqdm.auto import tqdm

from clipscope.neurons import dataset_examples
from clipscope.progress import HiddenBar, manual_bar, progress_bar
from clipscope.typographic import Attack, evaluate

from .conftest import make_images

#: (show, default) -> whether a bar is shown: the rule stated in clipscope.progress.
RULE = {(True, True): True, (True, False): True, (False, True): False, (False, False): False,
        (None, True): True, (None, False): False}


@pytest.mark.parametrize("show,default", list(itertools.product([True, False, None], [True, False])))
def test_the_manual_bar_is_shown_exactly_when_the_iterable_bar_is(show, default):
    items = [1, 2, 3]
    wrapped = progress_bar(items, show, default, "test")
    iterable_shown = wrapped is not items
    with manual_bar(show, default, "test", total=3) as bar:
        manual_shown = not isinstance(bar, HiddenBar)
        bar.update(3)
    if iterable_shown:
        wrapped.close()
    assert iterable_shown == manual_shown == RULE[show, default]
    assert isinstance(wrapped, tqdm) == isinstance(bar, tqdm) == RULE[show, default]


def test_a_shown_manual_bar_counts_the_updates_and_closes_on_exit():
    with manual_bar(True, False, "test", total=10) as bar:
        bar.update(4)
        bar.update(3)
        bar.set_postfix(objective="1.0")
        assert bar.n == 7 and not bar.disable
    assert bar.disable  # tqdm marks a closed bar disabled


def test_a_hidden_manual_bar_accepts_every_call_and_prints_nothing(capsys):
    with manual_bar(False, True, "test", total=10) as bar:
        bar.update(5)
        bar.set_postfix(objective="1.0")
    bar.close()
    assert capsys.readouterr().err == ""


class TestCallers:
    """Loops that advance their bar by hand show it on request and never otherwise (tqdm writes to stderr)."""

    @pytest.mark.parametrize("progress", [True, False])
    def test_dataset_examples(self, tiny_rn, capsys, progress):
        site = tiny_rn.blocks("visual")[-1]
        dataset_examples(tiny_rn, make_images(3), site, k=1, units=[0], batch_size=2, progress=progress)
        assert ("dataset examples" in capsys.readouterr().err) == progress

    @pytest.mark.parametrize("progress", [True, False])
    def test_typographic_evaluate(self, tiny_rn, capsys, progress):
        evaluate(tiny_rn, make_images(3), ["cat", "dog", "cat"], ["cat", "dog"], Attack.targeted("dog"),
                 batch_size=2, progress=progress, n_examples=0)
        assert ("typographic attack" in capsys.readouterr().err) == progress
