"""``ClipModel.zero_shot`` and friends on bad input: unreadable images are skipped, counted, warned about
and keyed by path; bad class lists, templates and batch sizes get one InvalidArgumentError naming the
parameter, before any image is read."""
from __future__ import annotations

import warnings

import pytest
import torch

from clipscope.validate import InvalidArgumentError

from .conftest import make_images

CLASSES = ["cat", "dog"]


@pytest.fixture
def image_files(tmp_path):
    """Four image paths: readable, undecodable, readable, missing."""
    good = make_images(2)
    paths = [tmp_path / "a.png", tmp_path / "broken.png", tmp_path / "c.png", tmp_path / "missing.png"]
    good[0].save(paths[0])
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    good[1].save(paths[2])
    return [str(p) for p in paths]


class TestUnreadableImages:
    def test_a_list_of_paths_is_keyed_by_path_and_the_skipped_ones_are_warned_about(self, tiny_rn, image_files):
        with pytest.warns(UserWarning, match=r"zero_shot skipped 2 of 4 image\(s\) that could not be read") as rec:
            result = tiny_rn.zero_shot(image_files, CLASSES)
        assert len(rec) == 1
        message = str(rec[0].message)
        assert image_files[1] in message and image_files[3] in message
        assert result.keys == [image_files[0], image_files[2]]
        assert result.positions == [0, 2]
        assert [k for k, _ in result.skipped] == [image_files[1], image_files[3]]
        assert "missing.png" in result.skipped[1][1] and "no such" in result.skipped[1][1]
        frame = result.to_frame()
        assert list(frame.index) == [image_files[0], image_files[2]] and frame.index.name == "image"

    def test_rows_keep_their_own_probabilities_when_others_are_skipped(self, tiny_rn, image_files):
        readable = [image_files[0], image_files[2]]
        clean = tiny_rn.zero_shot(readable, CLASSES)
        with pytest.warns(UserWarning):
            mixed = tiny_rn.zero_shot(image_files, CLASSES)
        assert torch.allclose(mixed.probs, clean.probs, atol=1e-6)

    def test_in_memory_images_are_keyed_by_position(self, tiny_rn):
        images = make_images(2)
        with pytest.warns(UserWarning, match=r"skipped 1 of 3 image\(s\) .*\): 1: "):
            result = tiny_rn.zero_shot([images[0], b"not an image", images[1]], CLASSES)
        assert result.keys == [0, 2] and result.positions == [0, 2]
        assert [k for k, _ in result.skipped] == [1]
        assert list(result.to_frame().index) == [0, 2]

    def test_a_folder_is_keyed_by_path_with_positions_in_its_sorted_listing(self, tiny_rn, image_files, tmp_path):
        with pytest.warns(UserWarning, match=r"skipped 1 of 3 image\(s\)"):
            result = tiny_rn.zero_shot(str(tmp_path), CLASSES)
        assert result.keys == [image_files[0], image_files[2]] and result.positions == [0, 2]
        assert result.skipped[0][0] == image_files[1]

    def test_a_single_path_is_keyed_by_its_path(self, tiny_rn, image_files):
        result = tiny_rn.zero_shot(image_files[0], CLASSES)
        assert result.keys == [image_files[0]] and result.positions == [0]

    def test_more_than_three_skipped_images_are_counted_not_all_listed(self, tiny_rn):
        with pytest.warns(UserWarning, match=r"skipped 5 of 5 image\(s\).*; and 2 more$"):
            result = tiny_rn.zero_shot([b"x"] * 5, CLASSES)
        assert result.probs.shape == (0, 2) and len(result.skipped) == 5

    def test_readable_inputs_give_no_warning(self, tiny_rn, image_files):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = tiny_rn.zero_shot([image_files[0], image_files[2]], CLASSES)
            batch = torch.stack([tiny_rn.preprocess(im) for im in make_images(3)])
            tensor_result = tiny_rn.zero_shot(batch, CLASSES)
        assert result.skipped == [] and tensor_result.keys == [0, 1, 2] and tensor_result.positions == [0, 1, 2]


def _untouched_images(consumed: list):
    """A stream of images that records each one read, to show validation happens before any is."""
    for image in make_images(2):
        consumed.append(image)
        yield image


class TestClassesAndTemplates:
    @pytest.mark.parametrize("classes,valid", [
        ([], "a list of at least 1 non-empty strings"),
        (["cat", ""], "non-empty strings only; '' is not one"),
        (["cat", "  "], "non-empty strings only; '  ' is not one"),
        (["cat", 3], "non-empty strings only; 3 is not one"),
        (["cat", "dog", "cat"], "names must be unique; 'cat' appears twice"),
        ("cat", "a list of at least 1 non-empty strings"),
        (None, "a list of at least 1 non-empty strings"),
    ])
    def test_a_bad_class_list_is_refused_naming_classes_before_reading_images(self, tiny_rn, classes, valid):
        consumed = []
        with pytest.raises(InvalidArgumentError) as info:
            tiny_rn.zero_shot(_untouched_images(consumed), classes)
        assert info.value.parameter == "classes" and str(info.value).endswith(valid)
        assert consumed == []
        with pytest.raises(InvalidArgumentError, match="classes="):
            tiny_rn.class_embeddings(classes)

    @pytest.mark.parametrize("templates,valid", [
        ("imagenet", "a template set name (default, openai_imagenet), a template string containing '{}', "
                     "or a list of those"),
        ([], "at least one template"),
        (["no slot"], "exactly one '{}' slot for the class name and no other braces; 'no slot' is not one"),
        (["{} and {}"], "'{} and {}' is not one"),
        (["a {} of {kind}"], "'a {} of {kind}' is not one"),
        (["a {} {0}"], "'a {} {0}' is not one"),
        (["a photo of a {}.", 3], "3 is not one"),
        (5, "a template set name, a template string or a list of them"),
    ])
    def test_bad_templates_are_refused_naming_templates_before_reading_images(self, tiny_rn, templates, valid):
        consumed = []
        with pytest.raises(InvalidArgumentError) as info:
            tiny_rn.zero_shot(_untouched_images(consumed), CLASSES, templates)
        assert info.value.parameter == "templates" and str(info.value).endswith(valid)
        assert consumed == []

    def test_a_class_name_with_braces_is_filled_in_verbatim(self, tiny_rn):
        result = tiny_rn.zero_shot(make_images(1), ["{}", "a {weird} class"], ["a photo of a {}."])
        assert result.classes == ["{}", "a {weird} class"]


class TestNumbers:
    @pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8", None])
    def test_batch_size_must_be_an_integer_of_at_least_one(self, tiny_rn, batch_size):
        images = make_images(2)
        calls = [lambda: tiny_rn.zero_shot(images, CLASSES, batch_size=batch_size),
                 lambda: tiny_rn.encode_image(images, batch_size=batch_size),
                 lambda: tiny_rn.embed(images, batch_size=batch_size),
                 lambda: tiny_rn.encode_text(["a cat"], batch_size=batch_size)]
        for call in calls:
            with pytest.raises(InvalidArgumentError) as info:
                call()
            assert str(info.value) == f"batch_size={batch_size!r} is not valid: an integer >= 1"

    @pytest.mark.parametrize("texts", [["a cat", 3], [None], 5])
    def test_texts_must_be_strings(self, tiny_rn, texts):
        with pytest.raises(InvalidArgumentError, match=r"texts=.* is not valid: a string, a list of strings"):
            tiny_rn.encode_text(texts)

    def test_plot_needs_at_least_one_image(self, tiny_rn):
        result = tiny_rn.zero_shot(make_images(2), CLASSES)
        with pytest.raises(InvalidArgumentError, match="max_images=0 is not valid: an integer >= 1"):
            result.plot(max_images=0)


class TestActivationsArguments:
    def test_text_sites_are_refused_naming_sites(self, tiny_rn):
        batch = torch.zeros(1, 3, *tiny_rn.image_size)
        with pytest.raises(InvalidArgumentError, match=r"sites=\['text.ln_final'\] is not valid: .*not image-tower"):
            tiny_rn.activations(batch, ["visual.layer1", "text.ln_final"])
