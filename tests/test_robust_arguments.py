"""Argument validation at the boundary: the text renderer, text styles, attack arguments and units.

Property-based (hypothesis): any text on any image with any valid style renders an image of the
same size and mode; any style or unit value is either accepted or refused with one
InvalidArgumentError that names the parameter.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipscope.hooks import Unit
from clipscope.optvis import param
from clipscope.typographic import ANCHORS, Attack, TextStyle, evaluate, render_text, sweep
from clipscope.typographic.render import MAX_FONT_PX, MAX_REPEAT, check_position
from clipscope.validate import InvalidArgumentError

from .conftest import make_images

CLASSES = ["cat", "dog", "ipod"]

#: Modes Pillow can create and the renderer must hand back unchanged (palette "P" comes back as RGB, by design).
MODES = ["RGB", "RGBA", "L", "LA", "La", "1", "I", "F", "I;16", "CMYK", "YCbCr", "HSV", "RGBX", "PA", "LAB"]

image_sizes = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.sampled_from([(1, 1), (2000, 3), (3, 2000), (1, 700), (700, 1)]),
)
positions = st.one_of(
    st.sampled_from(sorted(ANCHORS) + ["random"] + [f"fixed8:{k}" for k in range(8)]),
    st.tuples(st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)),
)
colours = st.one_of(st.sampled_from(["black", "white", "red", "#12ab34", "rgb(1, 2, 3)"]),
                    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
styles = st.builds(
    TextStyle,
    size=st.one_of(st.floats(0.001, 0.999), st.floats(1, 64)),
    colour=colours,
    box=st.one_of(st.none(), colours),
    box_opacity=st.floats(0, 1),
    padding=st.floats(0, 2),
    opacity=st.floats(0, 1),
    rotation=st.floats(-1e6, 1e6),
    repeat=st.integers(1, 4),
    fit=st.booleans(),
)


class TestRendererProperties:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.text(max_size=40), size=image_sizes, mode=st.sampled_from(MODES), style=styles,
           position=positions, seed=st.integers(0, 2**31))
    def test_any_text_with_any_valid_style_keeps_the_images_size_and_mode(self, text, size, mode, style, position,
                                                                           seed):
        image = Image.new(mode, size)
        if isinstance(position[0], int) and (position[0] >= size[0] or position[1] >= size[1]):
            with pytest.raises(InvalidArgumentError, match=r"position=.*a pixel inside the"):
                render_text(image, text, style, position, seed=seed)
            return
        rendered = render_text(image, text, style, position, seed=seed)
        assert rendered.image.size == image.size and rendered.image.mode == mode
        assert 0.0 <= rendered.cover <= 1.0 and rendered.text == text
        assert len(rendered.boxes) == (style.repeat if text else 0)

    @settings(max_examples=40, deadline=None)
    @given(text=st.sampled_from(["", " ", "\n", "two\nlines", "crlf\r\nand\rcr", "\x00\x85\u2028", "🍎📱 emoji",
                                 "Ünïcödé ✓ 中文 עברית"]),
           size=image_sizes)
    def test_empty_unicode_multiline_and_emoji_text(self, text, size):
        image = Image.new("RGB", size, "grey")
        rendered = render_text(image, text, TextStyle(size=0.5))
        assert rendered.image.size == image.size and rendered.image.mode == "RGB"
        if not text:
            assert rendered.cover == 0 and np.array_equal(np.asarray(rendered.image), np.asarray(image))

    def test_multi_line_text_is_laid_out_on_several_lines(self):
        image = Image.new("RGB", (200, 200), "white")
        style = TextStyle(size=20, box=None)
        one, two = (render_text(image, t, style) for t in ("ipod", "ipod\nipod"))
        height = [box[3] - box[1] for box in (one.boxes[0], two.boxes[0])]
        assert height[1] > 1.8 * height[0]

    @settings(max_examples=200, deadline=None)
    @given(field=st.sampled_from(["size", "colour", "box", "box_opacity", "padding", "opacity", "rotation", "repeat",
                                  "fit", "font"]),
           value=st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                           st.text(max_size=12), st.tuples(st.integers(-300, 300), st.integers(0, 255),
                                                           st.integers(0, 255))))
    def test_any_style_value_is_accepted_or_refused_naming_the_field(self, field, value):
        try:
            style = TextStyle(**{field: value})
        except InvalidArgumentError as exc:
            assert exc.parameter == field and str(exc).startswith(f"{field}=")
            return
        rendered = render_text(Image.new("RGB", (24, 16)), "ab", style)
        assert rendered.image.size == (24, 16)


class TestStyleMessages:
    @pytest.mark.parametrize("kwargs,parameter,valid", [
        ({"size": -1}, "size", f"(0.0, {MAX_FONT_PX}]"),
        ({"size": MAX_FONT_PX + 1}, "size", f"(0.0, {MAX_FONT_PX}]"),
        ({"size": float("inf")}, "size", "finite"),
        ({"opacity": 1.5}, "opacity", "[0.0, 1.0]"),
        ({"box_opacity": -0.1}, "box_opacity", "[0.0, 1.0]"),
        ({"repeat": 2.0}, "repeat", f"an integer in [1, {MAX_REPEAT}]"),
        ({"repeat": MAX_REPEAT + 1}, "repeat", f"an integer in [1, {MAX_REPEAT}]"),
        ({"rotation": float("nan")}, "rotation", "finite"),
        ({"colour": (0, 0)}, "colour", "(r, g, b) tuple of integers 0..255"),
        ({"box": "whit"}, "box", "did you mean 'white'"),
        ({"fit": "yes"}, "fit", "True or False"),
        ({"font": 12}, "font", "TrueType"),
    ])
    def test_bad_style_values_name_the_field_the_value_and_what_is_valid(self, kwargs, parameter, valid):
        with pytest.raises(InvalidArgumentError) as info:
            TextStyle(**kwargs)
        assert info.value.parameter == parameter and valid in str(info.value)
        assert f"{parameter}={next(iter(kwargs.values()))!r}"[:20] in str(info.value)

    def test_unknown_colour_names_list_what_is_valid(self):
        with pytest.raises(InvalidArgumentError, match=r"colour='blurple'.*148 colour names.*'purple'"):
            TextStyle(colour="blurple")

    def test_yaml_lists_become_tuples(self):
        assert TextStyle(colour=[10, 20, 30]).colour == (10, 20, 30)
        assert check_position("position", [0.5, 0.25]) == (0.5, 0.25)

    def test_replace_refuses_unknown_fields(self):
        with pytest.raises(InvalidArgumentError, match="kerning=2 .*unknown text style field"):
            TextStyle().replace(kerning=2)

    @pytest.mark.parametrize("position", ["middle", "fixed8:8", (0.5,), (0.5, float("nan")), (True, 1), None, 3,
                                          (-1, 5), (1.5, 0.5), (0.5, 1), (2.0, 0.5), (-0.1, 0.2)])
    def test_bad_positions_are_refused_with_the_choices(self, position):
        with pytest.raises(InvalidArgumentError, match="position=.*'fixed8:0'..'fixed8:7'"):
            render_text(Image.new("RGB", (8, 8)), "x", position=position)

    @pytest.mark.parametrize("kwargs,parameter", [({"image": "photo.png"}, "image"), ({"text": 3}, "text"),
                                                  ({"style": {"size": 3}}, "style"), ({"seed": 1.5}, "seed"),
                                                  ({"image": Image.new("RGB", (0, 4))}, "image")])
    def test_bad_render_arguments_are_refused(self, kwargs, parameter):
        args = {"image": Image.new("RGB", (8, 8)), "text": "x", **kwargs}
        with pytest.raises(InvalidArgumentError) as info:
            render_text(**args)
        assert info.value.parameter == parameter


class TestAttackArguments:
    @pytest.mark.parametrize("build,parameter,fragment", [
        (lambda: Attack("sideways"), "mode", "'untargeted', 'targeted', 'text'"),
        (lambda: Attack.targeted(""), "target", "non-empty string"),
        (lambda: Attack.free_text(None), "target", "non-empty string"),
        (lambda: Attack("untargeted", target="ipod"), "target", "no target"),
        (lambda: Attack.targeted("ipod", style={"size": 0.2}), "style", "TextStyle"),
        (lambda: Attack.targeted("ipod", position="middle"), "position", "fixed8"),
        (lambda: Attack.targeted("ipod").replace(size=-2), "size", "finite number"),
        (lambda: Attack.targeted("ipod").replace(colour="blurple"), "colour", "unknown colour"),
    ])
    def test_bad_attacks_are_refused_when_built(self, build, parameter, fragment):
        with pytest.raises(InvalidArgumentError) as info:
            build()
        assert info.value.parameter == parameter and fragment in str(info.value)

    @pytest.mark.parametrize("attack,classes,parameter,fragment", [
        (Attack.targeted("toaster"), CLASSES, "target", "free_text"),
        (Attack.untargeted(), ["cat"], "classes", "at least 2"),
        (Attack.targeted("cat"), [], "classes", "at least 1"),
        (Attack.targeted("cat"), ["cat", ""], "classes", "non-empty strings"),
        (Attack.targeted("cat"), ["cat", 3], "classes", "non-empty strings"),
        (Attack.targeted("cat"), "cat,dog", "classes", "a list"),
        (Attack.targeted("cat"), ["cat", "cat"], "classes", "unique"),
    ])
    def test_attacks_are_checked_against_the_classes(self, attack, classes, parameter, fragment):
        with pytest.raises(InvalidArgumentError) as info:
            attack.check(classes)
        assert info.value.parameter == parameter and fragment in str(info.value)

    def test_free_text_needs_no_class(self):
        Attack.free_text("toaster").check(CLASSES)


class TestEvaluateAndSweepArguments:
    """Refused before any image is encoded: the model is never called."""

    @pytest.mark.parametrize("kwargs,parameter,fragment", [
        ({"labels": ["cat", "dog"]}, "labels", "as many items as images (3)"),
        ({"labels": ["cat", "dog", "horse"]}, "labels", "not among the classes"),
        ({"classes": []}, "classes", "at least 1"),
        ({"classes": ["cat", None]}, "classes", "non-empty strings"),
        ({"images": [], "labels": []}, "images", "at least one image"),
        ({"attack": "ipod"}, "attack", "an Attack"),
        ({"defence": "prompt"}, "defence", "a Defence"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"seed": 0.5}, "seed", "an integer"),
        ({"workers": 0}, "workers", ">= 1"),
        ({"n_examples": -1}, "n_examples", ">= 0"),
    ])
    def test_bad_evaluate_arguments(self, kwargs, parameter, fragment):
        args = {"model": None, "images": make_images(3), "labels": ["cat", "dog", "cat"], "classes": CLASSES,
                "attack": Attack.targeted("ipod"), **kwargs}
        with pytest.raises(InvalidArgumentError) as info:
            evaluate(**args)
        assert info.value.parameter == parameter and fragment in str(info.value)

    @pytest.mark.parametrize("vary,parameter,fragment", [
        ({}, "vary", "one or two"),
        ({"size": [0.1], "opacity": [1.0], "rotation": [0.0]}, "vary", "one or two"),
        ({"kerning": [1]}, "vary", "sweepable parameters"),
        ({"size": []}, "vary['size']", "a non-empty list"),
        ({"size": 0.1}, "vary['size']", "a non-empty list"),
        ({"word": "ipod"}, "vary['word']", "a non-empty list"),
        ({"size": [0.1, -1]}, "vary['size']", "finite number"),
        ({"size": [0.1, 0.1]}, "vary['size']", "unique"),
        ({"position": ["center", "middle"]}, "vary['position']", "fixed8"),
        ({"colour": ["red", "blurple"]}, "vary['colour']", "unknown colour"),
        ({"word": ["ipod", ""]}, "vary['word']", "non-empty string"),
        ({"repeat": [1, 2.5]}, "vary['repeat']", "integer"),
    ])
    def test_bad_sweeps_are_refused_before_any_work(self, vary, parameter, fragment):
        with pytest.raises(InvalidArgumentError) as info:
            sweep(None, make_images(2), ["cat", "dog"], CLASSES, Attack.targeted("ipod"), vary)
        assert info.value.parameter == parameter and fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# Units against a real site of the tiny ResNet (conv) and the tiny ViT (tokens)


def _outcome(model, unit_factory):
    """Build a unit and check it against its site: None when valid, else the InvalidArgumentError."""
    try:
        unit = unit_factory()
        model.site(unit.site)
        unit.check(model.site(unit.site))
    except InvalidArgumentError as exc:
        return exc
    return None


ints_or_junk = st.one_of(st.integers(-600, 600), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3),
                         st.none())


class TestUnitProperties:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(index=ints_or_junk, y=ints_or_junk, x=ints_or_junk)
    def test_conv_units_are_valid_or_refused_naming_the_parameter(self, tiny_rn, index, y, x):
        site = tiny_rn.site("visual.layer4.0")
        c, h, w = site.shape
        position = None if y is None and x is None else (y, x)
        error = _outcome(tiny_rn, lambda: Unit("visual.layer4.0", index=index, position=position))

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)
        index_ok = index is None or (is_int(index) and 0 <= index < c)
        position_ok = position is None or (is_int(y) and is_int(x) and 0 <= y < h and 0 <= x < w)
        selects = index is not None or position is not None
        if index_ok and position_ok and selects:
            assert error is None
            acts = torch.randn(2, c, h, w)
            assert Unit("visual.layer4.0", index=index, position=position).read(acts, "conv").shape == (2,)
        else:
            assert isinstance(error, InvalidArgumentError)
            assert error.parameter in ({"index"} if not index_ok else set()) | \
                ({"position"} if not position_ok else set()) | ({"unit"} if not selects else set())
            assert str(error).startswith(f"{error.parameter}=")

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(token=ints_or_junk, size=st.integers(0, 300), scale=st.floats(width=32))
    def test_token_units_and_directions_are_valid_or_refused_naming_the_parameter(self, tiny_vit, token, size,
                                                                                  scale):
        name = "visual.transformer.resblocks.0"
        length, width = tiny_vit.site(name).shape
        direction = torch.full((size,), scale)
        error = _outcome(tiny_vit, lambda: Unit.along(name, direction, token=token))
        token_ok = token is None or (isinstance(token, int) and not isinstance(token, bool)
                                     and -length <= token < length)
        direction_ok = size == width and math.isfinite(scale) and scale != 0
        if token_ok and direction_ok:
            assert error is None
        else:
            assert isinstance(error, InvalidArgumentError)
            wrong = ({"token"} if not token_ok else set()) | ({"direction"} if not direction_ok else set())
            assert error.parameter in wrong

    @pytest.mark.parametrize("build,parameter,fragment", [
        (lambda: Unit(3, index=0), "site", "site name"),
        (lambda: Unit("visual.layer4.0", index=1, direction=torch.ones(4)), "direction", "not both"),
        (lambda: Unit("visual.layer4.0", position=(1, 2, 3)), "position", "(y, x) pair"),
        (lambda: Unit.along("visual.layer4.0", torch.zeros(4)), "direction", "non-zero"),
        (lambda: Unit.along("visual.layer4.0", torch.ones(2, 2)), "direction", "1-D"),
    ])
    def test_malformed_units_are_refused_when_built(self, build, parameter, fragment):
        with pytest.raises(InvalidArgumentError) as info:
            build()
        assert info.value.parameter == parameter and fragment in str(info.value)

    def test_site_names_and_ablation_arguments(self, tiny_rn):
        with pytest.raises(InvalidArgumentError, match=r"site='visual.layer4.O'.*Did you mean: visual.layer4.0"):
            tiny_rn.site("visual.layer4.O")
        with pytest.raises(InvalidArgumentError, match="site=4 .*a string"):
            tiny_rn.site(4)
        with pytest.raises(InvalidArgumentError, match="sites=.*3 is not one"):
            with tiny_rn.capture(["visual.layer4.0", 3]):
                pass
        with pytest.raises(InvalidArgumentError, match=r"units=\[\] .*at least one Unit"):
            with tiny_rn.ablate([]):
                pass
        with pytest.raises(InvalidArgumentError, match="units='visual.layer4.0'"):
            with tiny_rn.ablate("visual.layer4.0"):
                pass
        with pytest.raises(InvalidArgumentError, match="value=nan"):
            with tiny_rn.ablate(Unit.channel("visual.layer4.0", 0), value=float("nan")):
                pass


class TestRenderArguments:
    """Feature-visualization sizes, steps and batches are refused before any optimization step."""

    @pytest.mark.parametrize("kwargs,parameter,fragment", [
        ({"steps": 0}, "steps", ">= 1"),
        ({"steps": 2.5}, "steps", "an integer"),
        ({"batch": 0}, "batch", ">= 1"),
        ({"batch": True}, "batch", "an integer"),
        ({"size": 0}, "size", "[1, 4096]"),
        ({"size": (64,)}, "size", "(H, W) pair"),
        ({"size": (64, 64.5)}, "size", "(H, W) pair"),
        ({"size": 5000}, "size", "[1, 4096]"),
        ({"lr": -0.1}, "lr", ">= 0"),
        ({"seed": "a"}, "seed", "an integer"),
        ({"redirect_steps": -1}, "redirect_steps", ">= 0"),
        ({"callback": 3}, "callback", "a function"),
        ({"param": "jpeg"}, "param", "unknown parameterization"),
    ])
    def test_bad_render_arguments(self, tiny_rn, kwargs, parameter, fragment):
        from clipscope.optvis import render
        with pytest.raises(InvalidArgumentError) as info:
            render(tiny_rn, Unit.channel("visual.layer4.0", 0), **{"steps": 1, "progress": False, **kwargs})
        assert info.value.parameter == parameter and fragment in str(info.value)

    def test_an_empty_unit_list_is_refused(self, tiny_rn):
        from clipscope.optvis import render
        with pytest.raises(InvalidArgumentError, match=r"objective_or_units=\[\] .*at least one"):
            render(tiny_rn, [], steps=1)

    @pytest.mark.parametrize("build,parameter", [
        (lambda: param.make_param("pixels", 0, 8), "batch"),
        (lambda: param.PixelImage(1, (8, 0)), "size"),
        (lambda: param.PixelImage(1, 8, sd=float("nan")), "sd"),
        (lambda: param.MacoImage(1, 8, contrast=0), "contrast"),
    ])
    def test_bad_parameterizations(self, build, parameter):
        with pytest.raises(InvalidArgumentError) as info:
            build()
        assert info.value.parameter == parameter
