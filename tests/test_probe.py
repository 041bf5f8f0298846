"""Linear probes: C chosen on a validation split, as in the CLIP paper."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.probe import fit_linear_probe



def test_probe_separates_separable_classes_and_records_its_sweep():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 1, (200, 8)), rng.normal(1, 1, (200, 8))])
    y = np.array([0] * 200 + [1] * 200)
    probe = fit_linear_probe(x, y)
    assert probe.val_accuracy > 0.9 and probe.accuracy(x, y) > 0.9
    assert probe.sweep["C"].min() == pytest.approx(1e-6) and probe.sweep["C"].max() == pytest.approx(1e6)
    assert len(probe.sweep) > 13  # the coarse grid plus its refinement
    # on pure noise labels the probe cannot beat chance by much
    noise = fit_linear_probe(x, rng.integers(0, 2, 400))
    assert noise.val_accuracy < 0.7


def test_probe_on_image_features_of_a_model(tiny_vit):
    from PIL import Image
    rng = np.random.default_rng(1)
    images, labels = [], []
    for i in range(60):
        arr = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
        arr[..., i % 2 * 2] += 180  # red-ish vs blue-ish
        images.append(Image.fromarray(arr))
        labels.append(["red", "blue"][i % 2])
    feats = tiny_vit.encode_image(images)
    probe = fit_linear_probe(feats, labels)
    assert set(probe.classes) == {"red", "blue"} and probe.val_accuracy >= 0.9
    assert probe.weights.shape == (1, 32)


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="rows"):
        fit_linear_probe(torch.zeros(5, 2), [0, 1])
