"""One image decoding policy for every input and every data set.

Whatever goes wrong decoding one image (a file that is not an image whatever its suffix, a
truncated file, also inside an already-open PIL image, a decompression bomb, any exception from
Pillow or a plugin, a dangling symlink, a symlink loop, a FIFO) is an :class:`ImageLoadError` for
that item: data sets skip, count and list it, never crash halfway. What is decoded is what an image
viewer shows (EXIF orientation applied), and images deeper than 8 bits are scaled by their own range.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
from PIL import Image

from clipscope.data import (MAX_IMAGE_PIXELS, ImageLoadError, iter_images, list_image_files, load_image,
                            max_image_pixels, source_fingerprint, source_length)
from clipscope.validate import InvalidArgumentError

from .conftest import make_images


def png_bytes(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 greyscale PNG whose header claims ``width`` x ``height`` pixels (valid CRCs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + \
        chunk(b"IEND", b"")


def closed_file(path):
    """A binary file object for ``path`` that has been closed."""
    fh = open(path, "rb")
    fh.close()
    return fh


def red_channel(im) -> np.ndarray:
    return np.asarray(im)[..., 0]


class TestExifOrientation:
    # a 2 x 4 image whose every pixel differs, stored with EXIF orientation 6 ("rotate 90 clockwise to view")
    STORED = (np.arange(8, dtype=np.uint8).reshape(2, 4) * 30)

    def encoded(self) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6
        return png_bytes(Image.fromarray(self.STORED).convert("RGB"), exif=exif)

    def test_files_bytes_and_open_images_come_out_as_viewers_show_them(self, tmp_path):
        (tmp_path / "rotated.png").write_bytes(self.encoded())
        viewed = np.rot90(self.STORED, k=-1)                         # 4 x 2, clockwise
        for item in (tmp_path / "rotated.png", self.encoded(), Image.open(io.BytesIO(self.encoded()))):
            out = load_image(item)
            assert out.size == (2, 4) and np.array_equal(red_channel(out), viewed)

    def test_images_without_orientation_are_unchanged(self):
        out = load_image(png_bytes(Image.fromarray(self.STORED)))
        assert np.array_equal(red_channel(out), self.STORED)


class TestDeepImages:
    """Integer and float images are scaled by their own min..max to 0..255, not clipped."""

    RAMP = np.arange(256)

    @pytest.mark.parametrize("dtype, lo, step", [(np.uint16, 1000, 200), (np.int32, -70000, 300),
                                                 (np.float32, -1.0, 2 / 255), (np.float64, 0.0, 1 / 255),
                                                 (np.int64, 5, 1), (np.uint32, 2**31, 2**20)])
    def test_arrays_map_their_range_onto_0_255_exactly(self, dtype, lo, step):
        ramp = (lo + step * self.RAMP).astype(dtype).reshape(1, 256)
        for array in (ramp, np.repeat(ramp[..., None], 3, axis=2), ramp[..., None]):
            out = np.asarray(load_image(array))
            assert out.shape == (1, 256, 3) and np.array_equal(out[0, :, 0], self.RAMP)

    @pytest.mark.parametrize("fmt, array", [
        ("PNG", 1000 + 200 * np.arange(256, dtype=np.uint16)),           # 16-bit greyscale PNG: mode I;16
        ("TIFF", np.arange(-128, 128, dtype=np.int32) * 1000),           # mode I
        ("TIFF", np.linspace(-1, 1, 256, dtype=np.float32)),             # mode F
    ])
    def test_deep_files_map_their_range_onto_0_255_exactly(self, tmp_path, fmt, array):
        path = tmp_path / f"deep.{fmt.lower()}"
        Image.fromarray(array.reshape(1, 256)).save(path, format=fmt)
        assert Image.open(path).mode in ("I;16", "I", "F")
        assert np.array_equal(red_channel(load_image(path))[0], self.RAMP)

    def test_a_16_bit_image_is_not_clipped_to_white(self):
        dark = Image.fromarray(np.array([[0, 300, 600]], dtype=np.uint16))     # all above 255
        assert red_channel(load_image(dark)).tolist() == [[0, 128, 255]]

    def test_constant_non_finite_and_bool_arrays(self):
        assert red_channel(load_image(np.full((2, 2), 7.5))).tolist() == [[0, 0], [0, 0]]
        assert red_channel(load_image(np.array([[np.nan, 0.0, 1.0, np.inf]]))).tolist() == [[0, 0, 255, 255]]
        assert red_channel(load_image(np.array([[True, False]]))).tolist() == [[255, 0]]
        with pytest.raises(ImageLoadError, match="no finite pixel value"):
            load_image(np.full((2, 2), np.nan))
        with pytest.raises(ImageLoadError, match=r"shape \(2, 2, 5\)"):
            load_image(np.zeros((2, 2, 5), np.uint8))
        with pytest.raises(ImageLoadError, match="complex128"):
            load_image(np.zeros((2, 2), complex))


class TestDecompressionBombs:
    def test_the_default_limit_is_pillows_and_pillow_is_left_alone(self, monkeypatch):
        monkeypatch.delenv("CLIPSCOPE_MAX_IMAGE_PIXELS", raising=False)
        before = PIL.Image.MAX_IMAGE_PIXELS
        assert max_image_pixels() == MAX_IMAGE_PIXELS == 89_478_485
        with pytest.raises(ImageLoadError):
            load_image(png_claiming_size(100_000, 100_000))
        assert PIL.Image.MAX_IMAGE_PIXELS == before

    def test_a_tiny_file_claiming_a_huge_size_is_refused_not_decoded(self, monkeypatch):
        monkeypatch.delenv("CLIPSCOPE_MAX_IMAGE_PIXELS", raising=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with pytest.raises(ImageLoadError, match="10000 x 10000 = 100000000 pixels is above the limit of 89478485"):
                load_image(png_claiming_size(10_000, 10_000))    # under Pillow's error, over our limit
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(png_claiming_size(100_000, 100_000))      # Pillow's own error, reported the same way

    def test_the_limit_is_set_by_the_environment(self, monkeypatch, tmp_path):
        monkeypatch.setenv("CLIPSCOPE_MAX_IMAGE_PIXELS", "100")
        assert load_image(Image.new("RGB", (10, 10))).size == (10, 10)
        with pytest.raises(ImageLoadError, match="11 x 10 = 110 pixels is above the limit of 100.*CLIPSCOPE_MAX"):
            load_image(png_bytes(Image.new("RGB", (11, 10))))
        monkeypatch.setenv("CLIPSCOPE_MAX_IMAGE_PIXELS", "none")
        assert max_image_pixels() is None

    @pytest.mark.parametrize("value", ["lots", "0", "-5", "1e9"])
    def test_a_bad_setting_is_one_error_naming_it_not_a_skip_per_image(self, monkeypatch, value):
        monkeypatch.setenv("CLIPSCOPE_MAX_IMAGE_PIXELS", value)
        with pytest.raises(InvalidArgumentError, match=f"CLIPSCOPE_MAX_IMAGE_PIXELS='{value}'.*positive integer"):
            list(iter_images(make_images(2)))


class TestUndecodable:
    def test_a_truncated_jpeg_passed_as_an_open_pil_image(self):
        buf = io.BytesIO()
        make_images(1, size=64)[0].save(buf, format="JPEG")
        opened = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))     # lazy: not decoded yet
        results = dict(iter_images([make_images(1)[0], opened, make_images(1)[0]]))
        assert isinstance(results[1], ImageLoadError) and "truncated" in str(results[1])
        assert isinstance(results[0], Image.Image) and isinstance(results[2], Image.Image)

    def test_a_text_file_named_png(self, tmp_path):
        (tmp_path / "notes.png").write_text("not an image at all")
        with pytest.raises(ImageLoadError, match=r"cannot read image '.*notes.png': UnidentifiedImageError"):
            load_image(tmp_path / "notes.png")

    def test_open_files_in_text_mode_or_closed_are_image_load_errors(self, tmp_path):
        make_images(1)[0].save(tmp_path / "a.png")
        (tmp_path / "path.txt").write_text(str(tmp_path / "a.png"))     # text that names an image: not read
        with open(tmp_path / "path.txt") as text_mode:
            with pytest.raises(ImageLoadError, match=r"binary mode \('rb'\); reading gave str"):
                load_image(text_mode)
        with pytest.raises(ImageLoadError, match="cannot read the open file .*a.png.*closed file"):
            load_image(closed_file(tmp_path / "a.png"))

    def test_any_exception_from_a_plugin_is_an_image_load_error(self, monkeypatch):
        def broken_load(self):
            raise RuntimeError("plugin bug")
        monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", broken_load)
        with pytest.raises(ImageLoadError, match="image bytes: RuntimeError: plugin bug"):
            load_image(png_bytes(make_images(1)[0]))

    def test_a_folder_with_every_kind_of_bad_entry_is_read_to_the_end(self, tmp_path, monkeypatch):
        monkeypatch.setenv("CLIPSCOPE_MAX_IMAGE_PIXELS", "10000")
        for i, im in enumerate(make_images(2)):
            im.save(tmp_path / f"good{i}.png")
        (tmp_path / "bomb.png").write_bytes(png_claiming_size(1000, 1000))
        (tmp_path / "text.png").write_text("hello")
        (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
        (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
        os.mkfifo(tmp_path / "fifo.png")                          # opening it would block forever
        (tmp_path / "folder.png").mkdir()                         # a folder is not an image entry
        expected = {"bomb.png": "above the limit of 10000", "text.png": "UnidentifiedImageError",
                    "dangling.png": "dangling symlink", "loop.png": "symlink loop", "fifo.png": "not a regular file"}

        assert [p.name for p in list_image_files(tmp_path)] == sorted(["good0.png", "good1.png", *expected])
        assert source_length(tmp_path) == 7 and source_fingerprint(tmp_path) is not None
        results = {os.path.basename(k): v for k, v in iter_images(tmp_path)}
        assert all(isinstance(results[f"good{i}.png"], Image.Image) for i in range(2))
        for name, reason in expected.items():
            assert isinstance(results[name], ImageLoadError) and reason in str(results[name]), name

    def test_encoding_a_folder_skips_and_lists_the_bad_entries(self, tmp_path, tiny_vit):
        make_images(1)[0].save(tmp_path / "good.png")
        (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
        (tmp_path / "bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
        result = tiny_vit.embed(tmp_path, progress=False)
        assert len(result) == 1 and result.n_skipped == 2
        assert sorted(os.path.basename(k) for k, _ in result.skipped) == ["bomb.png", "loop.png"]


@pytest.mark.parametrize("item", [np.zeros((0, 5), np.uint8), np.zeros((4, 0, 3), np.float32),
                                  Image.new("RGB", (0, 0))])
def test_an_image_without_pixels_is_a_load_error(item):
    with pytest.raises(ImageLoadError, match="has no pixels"):
        load_image(item)
