"""Pixel normalization is one primitive on the model: ``model.normalize`` maps pixels in [0, 1] to the
model's input with its own preprocessing statistics, ``model.unnormalize`` maps back, and feature
visualization's input stage uses it."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipscope.optvis.transform import ClipInput
from clipscope.validate import InvalidArgumentError


def pixels(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_normalize_subtracts_the_mean_and_divides_by_the_std_of_each_channel(tiny):
    x = pixels(2, 3, 5, 7)
    expected = torch.stack([(x[:, c] - tiny.image_mean[c]) / tiny.image_std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(tiny.normalize(x), expected)


def test_unnormalize_inverts_normalize_for_batches_and_single_images(tiny):
    for x in (pixels(2, 3, 4, 4), pixels(3, 6, 5)):
        y = tiny.normalize(x)
        assert y.shape == x.shape
        torch.testing.assert_close(tiny.unnormalize(y), x)


def test_the_result_keeps_the_inputs_dtype_and_device(tiny):
    x = pixels(1, 3, 2, 2, dtype=torch.float64)
    assert tiny.normalize(x).dtype == torch.float64 and tiny.unnormalize(x).device == x.device


def test_the_models_preprocessing_unnormalizes_to_the_image_pixels(tiny):
    colour = (200, 30, 90)
    model_input = tiny.preprocess(Image.new("RGB", (40, 40), colour))
    back = tiny.unnormalize(model_input.float())
    for c in range(3):
        torch.testing.assert_close(back[c], torch.full_like(back[c], colour[c] / 255), atol=1e-5, rtol=0)


def test_feature_visualizations_input_stage_is_the_models_normalization(tiny):
    x = pixels(2, 3, *tiny.image_size)
    torch.testing.assert_close(ClipInput(tiny)(x), tiny.normalize(x).to(tiny.dtype))


@pytest.mark.parametrize(("value", "message"), [
    (pixels(2, 4, 5, 5), r"^pixels\.shape=\(2, 4, 5, 5\) is not valid: \(B, 3, H, W\) or \(3, H, W\)"),
    (pixels(5, 5), r"^pixels\.shape=\(5, 5\) is not valid"),
    (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), r"^pixels\.dtype=torch\.uint8 is not valid: a floating-point"),
    ([[0.5]], r"^pixels=\[\[0\.5\]\] is not valid: a float tensor"),
])
def test_anything_but_float_pixels_with_three_channels_is_refused(tiny_rn, value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tiny_rn.normalize(value)


def test_unnormalize_names_its_own_argument(tiny_rn):
    with pytest.raises(InvalidArgumentError, match=r"^inputs\.shape=\(1, 1, 2, 2\)"):
        tiny_rn.unnormalize(pixels(1, 1, 2, 2))
