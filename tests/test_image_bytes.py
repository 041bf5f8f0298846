"""One image encoder for pages and widgets: ``pages.image_bytes`` gives the file bytes that
``image_uri`` embeds in report pages and that the explorer widget shows (its views are checked in
test_neurons_atlas.py)."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from clipscope.pages import image_bytes, image_uri
from clipscope.validate import InvalidArgumentError

RED = (255, 0, 0)


def test_png_bytes_decode_to_the_image_at_the_asked_size():
    back = Image.open(io.BytesIO(image_bytes(Image.new("L", (4, 4), 76), size=12)))
    assert back.format == "PNG" and back.size == (12, 12) and back.mode == "RGB"
    assert back.getpixel((5, 5)) == (76, 76, 76)  # grey made RGB, enlarged without new colours


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_uri_is_the_base64_of_the_same_bytes(fmt):
    image = Image.new("RGB", (8, 8), RED)
    encoded = base64.b64encode(image_bytes(image, 16, fmt)).decode("ascii")
    assert image_uri(image, 16, fmt) == f"data:image/{fmt.lower()};base64,{encoded}"


def test_other_formats_are_refused_naming_the_parameter():
    with pytest.raises(InvalidArgumentError, match=r"^fmt='GIF' .*'PNG', 'JPEG'"):
        image_bytes(Image.new("RGB", (2, 2)), fmt="GIF")

