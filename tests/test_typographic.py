"""Typographic attacks: renderer, attack generation, evaluation, sweeps, defences and data set I/O."""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipscope.typographic import (FIXED8, AblationDefence, Attack, FunctionDefence, PromptDefence,
                                   TextStyle, evaluate, export_attack_set, generate, find_text_units, load_label_text_folder,
                                   load_materzynska, load_paint, load_rta100, load_scam, render_text, sweep)
from clipscope.typographic.evaluate import TEXT

from .conftest import make_images

CLASSES = ["cat", "dog", "ipod"]


def white(w=100, h=80, mode="RGB"):
    return Image.new(mode, (w, h), "white")


class TestRenderer:
    def test_an_opaque_box_changes_exactly_its_own_pixels(self):
        r = render_text(white(), "hi", TextStyle(size=20, colour="red", box="black"), position="center")
        (left, top, right, bottom), = r.boxes
        assert r.cover == pytest.approx((right - left) * (bottom - top) / (100 * 80))
        changed = np.any(np.asarray(r.image) != 255, axis=-1)
        assert changed[top:bottom, left:right].all() and changed.sum() == (right - left) * (bottom - top)

    def test_positions_anchor_fixed8_pixels_and_fractions(self):
        style = TextStyle(size=10, box="black")
        centre = lambda r: ((r.boxes[0][0] + r.boxes[0][2]) / 2, (r.boxes[0][1] + r.boxes[0][3]) / 2)
        img = white(300, 300)
        assert centre(render_text(img, "a", style, "center")) == pytest.approx((150, 150), abs=1)
        assert centre(render_text(img, "a", style, "fixed8:0")) == pytest.approx((300 * FIXED8[0][0],) * 2, abs=1)
        assert centre(render_text(img, "a", style, (60, 240))) == pytest.approx((60, 240), abs=1)
        assert centre(render_text(img, "a", style, (0.25, 0.75))) == pytest.approx((75, 225), abs=1)

    def test_text_is_kept_inside_the_image(self):
        r = render_text(white(120, 90), "corner", TextStyle(size=16), position=(0, 0))
        left, top, right, bottom = r.boxes[0]
        assert left == 0 and top == 0 and right <= 120 and bottom <= 90

    def test_long_words_shrink_to_fit_unless_told_not_to(self):
        fitted = render_text(white(64, 64), "hexagonal", TextStyle(size=0.3))
        left, _, right, _ = fitted.boxes[0]
        assert right - left <= 0.95 * 64
        clipped = render_text(white(64, 64), "hexagonal", TextStyle(size=0.3, fit=False))
        assert clipped.boxes[0][2] - clipped.boxes[0][0] == 64  # overflowing text is cut at the edge

    def test_size_is_a_fraction_of_the_shorter_side_or_pixels(self):
        assert TextStyle(size=0.25).font_px((400, 200)) == 50
        assert TextStyle(size=30).font_px((400, 200)) == 30
        small, big = (render_text(white(200, 200), "word", TextStyle(size=s)).cover for s in (0.1, 0.3))
        assert big > 2 * small

    def test_opacity_zero_changes_nothing_and_half_opacity_blends(self):
        invisible = render_text(white(), "x", TextStyle(opacity=0.0))
        assert invisible.cover == 0.0
        assert np.array_equal(np.asarray(invisible.image), np.asarray(white()))
        half = render_text(white(), "x", TextStyle(size=30, box="black", box_opacity=1.0, opacity=0.5))
        left, top, _, _ = half.boxes[0]
        assert 100 < np.asarray(half.image)[top + 1, left + 1, 0] < 155  # white blended halfway to black

    def test_rotation_grows_the_box_and_repeat_adds_copies(self):
        flat = render_text(white(300, 300), "rotate me", TextStyle(size=20))
        turned = render_text(white(300, 300), "rotate me", TextStyle(size=20, rotation=45))
        assert (turned.boxes[0][3] - turned.boxes[0][1]) > (flat.boxes[0][3] - flat.boxes[0][1])
        three = render_text(white(300, 300), "x", TextStyle(size=20, repeat=3), seed=1)
        assert len(three.boxes) == 3 and three.cover > flat.cover / 4

    @pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "CMYK", "P", "1", "I", "F", "YCbCr"])
    def test_every_pil_mode_keeps_its_mode(self, mode):
        image = Image.new("RGB", (64, 48), (30, 120, 200)).convert(mode)
        r = render_text(image, "ipod", TextStyle(size=0.3))
        assert r.image.mode == (mode if mode != "P" else "RGB") and r.image.size == (64, 48) and r.cover > 0

    def test_tiny_and_huge_images(self):
        assert render_text(white(6, 5), "ipod").cover > 0
        huge = render_text(white(4000, 3000), "ipod", TextStyle(size=0.1), position="bottom-right")
        assert 0 < huge.cover < 0.05

    def test_rendering_is_deterministic_given_the_seed(self):
        style = TextStyle(repeat=3, size=0.15)
        a, b, c = (render_text(white(), "w", style, "random", seed=s).image for s in (7, 7, 8))
        assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))

    @pytest.mark.parametrize("kwargs,message", [({"colour": "blurple"}, "unknown colour"), ({"size": 0}, "size"),
                                                ({"opacity": 2}, "opacity"), ({"repeat": 0}, "repeat")])
    def test_bad_styles_are_refused(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            TextStyle(**kwargs)

    def test_bad_positions_and_fonts_are_refused_with_the_choices(self):
        with pytest.raises(ValueError, match="fixed8"):
            render_text(white(), "x", position="middle")
        with pytest.raises(ValueError, match="cannot read the font"):
            render_text(white(), "x", TextStyle(font="/nope.ttf"))


class TestAttacks:
    def test_untargeted_attacks_write_a_seeded_wrong_class(self):
        attack = Attack.untargeted()
        texts = [attack.text_for("cat", CLASSES, i, seed=3) for i in range(50)]
        assert "cat" not in texts and set(texts) == {"dog", "ipod"}
        assert texts == [attack.text_for("cat", CLASSES, i, seed=3) for i in range(50)]

    def test_targeted_attacks_need_their_target_among_the_classes(self):
        with pytest.raises(ValueError, match="free_text"):
            Attack.targeted("toaster").check(CLASSES)
        Attack.free_text("toaster").check(CLASSES)

    def test_replace_changes_style_or_attack_fields_and_names_unknown_ones(self):
        attack = Attack.targeted("ipod").replace(size=0.3, position="top")
        assert attack.style.size == 0.3 and attack.position == "top" and attack.target == "ipod"
        with pytest.raises(ValueError, match="unknown attack parameter"):
            attack.replace(font_size=3)


class TestEvaluation:
    def test_metrics_follow_the_per_image_frame_and_the_distill_definition(self, tiny_vit):
        images, labels = make_images(12, size=64), ["cat", "dog", "ipod"] * 4
        result = evaluate(tiny_vit, images, labels, CLASSES, Attack.untargeted())
        f = result.to_frame()
        assert len(f) == 12 and (f["text"] != f["label"]).all()
        already = f["clean_prediction"] == f["text"]
        assert f.loc[already, "success"].isna().all()
        assert (f.loc[~already, "success"] == (f.loc[~already, "attacked_prediction"] == f.loc[~already, "text"])).all()
        assert result.metrics["attack_success_rate"] == pytest.approx(f["success"].mean())
        assert result.metrics["clean_accuracy"] == pytest.approx((f["clean_prediction"] == f["label"]).mean())
        assert result.metrics["mean_cover"] == pytest.approx(f["cover"].mean())
        assert set(result.per_class().index) == set(CLASSES)

    def test_results_do_not_depend_on_the_number_of_render_workers(self, tiny_vit, tmp_path):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        images = make_images(10, size=64)
        images.insert(4, str(bad))
        labels = ["cat", "dog", "ipod"] * 3 + ["cat", "dog"]
        attack = Attack.untargeted(TextStyle(size=0.2), "random")
        one = evaluate(tiny_vit, images, labels, CLASSES, attack, batch_size=4, workers=1)
        for workers in (2, 4):   # several threads render and preprocess, sharing nothing but the order
            many = evaluate(tiny_vit, images, labels, CLASSES, attack, batch_size=4, workers=workers)
            pd.testing.assert_frame_equal(many.to_frame(), one.to_frame())
            assert many.skipped == one.skipped and len(many.skipped) == 1
        rendered = [list(generate(attack, images, labels, CLASSES, workers=w)) for w in (1, 4)]
        assert [np.array_equal(np.asarray(a.attacked), np.asarray(b.attacked)) for a, b in zip(*rendered)] == [True] * 10

    def test_unreadable_images_are_skipped_and_counted(self, tiny_vit, tmp_path):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        result = evaluate(tiny_vit, [make_images(1)[0], str(bad)], ["cat", "dog"], CLASSES, Attack.targeted("ipod"))
        assert result.metrics["n"] == 1 and result.metrics["n_skipped"] == 1 and "bad.png" in result.skipped[0][1]

    def test_unknown_labels_are_refused(self, tiny_vit):
        with pytest.raises(ValueError, match="not among the classes"):
            evaluate(tiny_vit, make_images(1), ["horse"], CLASSES, Attack.untargeted())

    def test_the_prompt_defence_scores_extra_text_classes(self, tiny_vit):
        defence = PromptDefence()
        scored, mapping = defence.classes(CLASSES)
        assert scored[3:] == ["text that says cat", "text that says dog", "text that says ipod"]
        assert mapping[3:] == [None, None, None]
        result = evaluate(tiny_vit, make_images(8, size=64), ["cat"] * 8, CLASSES, Attack.targeted("ipod"),
                          defence=defence)
        f = result.to_frame()
        assert set(f["attacked_prediction"]) <= set(CLASSES) | {TEXT}
        assert result.metrics["text_detected_rate"] == pytest.approx((f["attacked_prediction"] == TEXT).mean())

    def test_ablation_and_user_defences_act_while_encoding(self, tiny_vit):
        images, labels = make_images(6, size=64), ["cat"] * 6
        plain = evaluate(tiny_vit, images, labels, CLASSES, Attack.targeted("ipod"))
        units = find_text_units(tiny_vit, "visual.transformer.resblocks.1", images, ["ipod", "dog"], k=4)
        assert len(units.units) == 4 and units.scores == sorted(units.scores, reverse=True)
        ablated = evaluate(tiny_vit, images, labels, CLASSES, Attack.targeted("ipod"),
                           defence=AblationDefence(units.units))
        assert not np.allclose(plain.frame["attacked_p_target"], ablated.frame["attacked_p_target"])
        assert "visual.transformer.resblocks.1" in ablated.defence
        seen = []
        custom = FunctionDefence(image_fn=lambda im: seen.append(1) or im.convert("L").convert("RGB"))
        evaluate(tiny_vit, images, labels, CLASSES, Attack.targeted("ipod"), defence=custom)
        assert len(seen) == 12  # clean and attacked copy of each image

    def test_results_render(self, tiny_vit):
        result = evaluate(tiny_vit, make_images(4, size=64), ["cat"] * 4, CLASSES, Attack.targeted("ipod"))
        assert "<table" in result._repr_html_() and len(result.plot().axes) == 5
        assert list(result.summary()["defence"]) == ["none"]


class TestSweeps:
    def test_clean_images_are_encoded_once_for_the_whole_sweep(self, tiny_vit, monkeypatch):
        images, labels = make_images(6, size=64), ["cat", "dog"] * 3
        encoded = []
        original = tiny_vit.model.encode_image
        monkeypatch.setattr(tiny_vit.model, "encode_image", lambda x, *a, **k: encoded.append(len(x)) or original(x, *a, **k))
        result = sweep(tiny_vit, images, labels, CLASSES, Attack.targeted("ipod"), {"size": [0.1, 0.2, 0.3]},
                       batch_size=6)
        assert sum(encoded) == 6 + 3 * 6
        assert list(result.frame["size"]) == [0.1, 0.2, 0.3]
        assert result.frame["mean_cover"].is_monotonic_increasing

    def test_two_parameter_sweeps_and_words(self, tiny_vit):
        result = sweep(tiny_vit, make_images(4, size=64), ["cat"] * 4, CLASSES, Attack.targeted("ipod"),
                       {"word": ["ipod", "dog", "toaster"], "opacity": [0.5, 1.0]})
        assert len(result.frame) == 6
        assert result.frame.loc[result.frame["word"] == "toaster", "attack_success_rate"].isna().all()
        assert len(result.plot().axes) == 2  # heatmap and its colour bar

    def test_bad_sweeps_are_refused(self, tiny_vit):
        with pytest.raises(ValueError, match="sweepable parameters"):
            sweep(tiny_vit, make_images(2), ["cat"] * 2, CLASSES, Attack.targeted("ipod"), {"kerning": [1]})
        with pytest.raises(TypeError, match="re-iterable"):
            sweep(tiny_vit, iter(make_images(2)), ["cat"] * 2, CLASSES, Attack.targeted("ipod"), {"size": [0.1]})


def _fill(image, level):
    """A plain grey image of ``level`` (a defence that makes every image the same, one per level)."""
    return Image.new("RGB", image.size, (level,) * 3)


def _other_fill(image, level):
    return Image.new("RGB", image.size, (level, 0, 0))


class _Holder:
    def __init__(self, level):
        self.level = level

    def image(self, image):
        return _fill(image, self.level)


def _same_result(a, b) -> bool:
    return a.frame.equals(b.frame) and a.skipped == b.skipped


class TestDefencesInSweepsAndCaches:
    def test_a_sweep_under_a_defence_that_changes_the_model_id_equals_separate_evaluations(self, tiny_vit):
        import torch

        from clipscope.typographic import ProjectionDefence, clean_scores
        basis = torch.linalg.qr(torch.randn(tiny_vit.embed_dim, 8, generator=torch.Generator().manual_seed(0)))[0].T
        images, labels = make_images(5, size=64), ["cat", "dog", "ipod", "cat", "dog"]
        attack = Attack.untargeted(TextStyle(size=0.25))
        for defence in (ProjectionDefence(basis.contiguous()),  # transform_embeddings: a tag in model.id
                        FunctionDefence(context_fn=lambda m: m.transform_embeddings(lambda e: e * 2, "double"))):
            clean = clean_scores(tiny_vit, images, CLASSES, defence=defence, batch_size=2)
            assert clean.model != tiny_vit.id                    # recorded inside the defence's context
            swept = sweep(tiny_vit, images, labels, CLASSES, attack, {"size": [0.1, 0.25]}, defence=defence,
                          batch_size=2)
            for size, result in zip((0.1, 0.25), swept.results):
                alone = evaluate(tiny_vit, images, labels, CLASSES, attack.replace(size=size), defence=defence,
                                 batch_size=2)
                with_clean = evaluate(tiny_vit, images, labels, CLASSES, attack.replace(size=size),
                                      defence=defence, batch_size=2, clean=clean)
                pd.testing.assert_frame_equal(result.frame, alone.frame, check_exact=True)
                pd.testing.assert_frame_equal(with_clean.frame, alone.frame, check_exact=True)

    def test_the_cache_is_refused_while_the_model_is_edited(self, tiny_vit, tmp_path):
        from clipscope import Unit
        images, labels = make_images(3, size=64), ["cat", "dog", "ipod"]
        attack = Attack.untargeted(TextStyle(size=0.25))
        evaluate(tiny_vit, images, labels, CLASSES, attack, cache_dir=tmp_path)
        site = "visual.transformer.resblocks.1"
        units = [Unit(site, index=i) for i in range(tiny_vit.site(site).n_units)]
        for edited in (tiny_vit.ablate(units), tiny_vit.edit(site, lambda a: a * 0),
                       tiny_vit.steer(units[:1], 5.0)):
            with edited, pytest.raises(ValueError, match="ablate / edit / steer") as error:
                evaluate(tiny_vit, images, labels, CLASSES, attack, cache_dir=tmp_path)
            assert error.value.parameter == "cache_dir"

    @pytest.mark.parametrize("make", [lambda level: FunctionDefence(image_fn=functools.partial(_fill, level=level)),
                                      lambda level: FunctionDefence(image_fn=_Holder(level).image),
                                      lambda level: FunctionDefence(image_fn=[lambda im: _other_fill(im, 200),
                                                                              lambda im: _fill(im, 200)][level > 0])],
                             ids=["partial", "bound method", "names used"])
    def test_cached_results_follow_the_defence_functions_arguments(self, tiny_vit, tmp_path, make):
        images, labels = make_images(2, size=64), ["cat", "dog"]
        attack = Attack.untargeted(TextStyle(size=0.25))
        dark = evaluate(tiny_vit, images, labels, CLASSES, attack, defence=make(0), cache_dir=tmp_path)
        light = evaluate(tiny_vit, images, labels, CLASSES, attack, defence=make(255), cache_dir=tmp_path)
        assert not _same_result(dark, light)                     # another argument, another key
        assert _same_result(light, evaluate(tiny_vit, images, labels, CLASSES, attack, defence=make(255)))
        again = evaluate(tiny_vit, images, labels, CLASSES, attack, defence=make(0), cache_dir=tmp_path)
        assert _same_result(again, dark)

    def test_a_defence_known_only_by_its_address_is_refused_with_a_cache(self, tiny_vit, tmp_path):
        images, labels = make_images(2, size=64), ["cat", "dog"]
        marker = object()                                      # repr '<object object at 0x...>': per process
        defence = FunctionDefence(image_fn=lambda im, marker=marker: im)
        with pytest.raises(ValueError, match="stable description") as error:
            evaluate(tiny_vit, images, labels, CLASSES, Attack.untargeted(), defence=defence, cache_dir=tmp_path)
        assert error.value.parameter == "defence"
        evaluate(tiny_vit, images, labels, CLASSES, Attack.untargeted(), defence=defence)  # fine without a cache

    def test_each_block_is_cached_on_its_own(self, tiny_vit, tmp_path, monkeypatch):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        images = make_images(9, size=64)
        images.insert(3, str(bad))
        labels = ["cat", "dog"] * 5
        attack = Attack.untargeted(TextStyle(size=0.25))
        plain = evaluate(tiny_vit, images, labels, CLASSES, attack, batch_size=4)
        cached = evaluate(tiny_vit, images, labels, CLASSES, attack, batch_size=4, cache_dir=tmp_path / "c")
        blocks = sorted((tmp_path / "c").glob("evaluate_*.json"))
        assert len(blocks) == 3                                   # positions 0-3, 4-7, 8-9
        blocks[1].unlink()
        encoded = []
        original = tiny_vit.model.encode_image
        monkeypatch.setattr(tiny_vit.model, "encode_image",
                            lambda x, *a, **k: encoded.append(len(x)) or original(x, *a, **k))
        resumed = evaluate(tiny_vit, images, labels, CLASSES, attack, batch_size=4, cache_dir=tmp_path / "c")
        assert len(encoded) == 2 and encoded[0] == encoded[1] <= 4  # one block (up to 4 images), clean and attacked
        for result in (cached, resumed):
            pd.testing.assert_frame_equal(result.frame, plain.frame, check_exact=True)
            assert result.skipped == plain.skipped and len(result.skipped) == 1
            assert [e.index for e in result.examples] == [e.index for e in plain.examples]


class TestDataSets:
    def test_export_then_load_round_trip_with_a_data_card(self, tmp_path):
        images, labels = make_images(5, size=40), ["cat", "dog", "cat", "ipod", "dog"]
        folder = export_attack_set(tmp_path / "set", images, labels, CLASSES, Attack.untargeted(), seed=2,
                                   source="generated noise")
        csv = pd.read_csv(folder / "attack_set.csv")
        assert len(csv) == 5 and (csv["text"] != csv["label"]).all()
        assert "generated noise" in (folder / "data_card.md").read_text()
        loaded = load_label_text_folder(folder)
        assert len(loaded) == 5 and loaded.skipped == []
        assert sorted(zip(loaded.frame["label"], loaded.frame["text"])) == sorted(zip(csv["label"], csv["text"]))

    def test_paint_and_rta100_names_with_spaces_and_malformed_names(self, tmp_path):
        make_images(1)[0].save(tmp_path / "label=tennis_ball_text=apple.jpg")
        make_images(1)[0].save(tmp_path / "label=pen_text=ruler__00003.png")
        make_images(1)[0].save(tmp_path / "IMG_0001.png")
        for loader in (load_paint, load_rta100):
            tset = loader(tmp_path)
            assert sorted(zip(tset.frame["label"], tset.frame["text"])) == [("pen", "ruler"), ("tennis ball", "apple")]
            assert len(tset.skipped) == 1 and "IMG_0001" in tset.skipped[0][0]

    def test_scam_folder_with_variants_missing_files_and_labels(self, tmp_path):
        for name in ("a.png", "b.png", "c.png"):
            make_images(1)[0].save(tmp_path / name)
        pd.DataFrame({"file_name": ["a.png", "b.png", "c.png", "gone.png", "a.png"],
                      "type": ["SCAM", "NoSCAM", "SynthSCAM", "SCAM", "SCAM"],
                      "object_label": ["ball", "ball", "chair", "cup", ""],
                      "attack_word": ["car", "car", "zebra", "bed", "car"]}).to_csv(tmp_path / "metadata.csv", index=False)
        tset = load_scam(tmp_path)
        assert list(tset.frame["label"]) == ["ball", "ball", "chair"]
        assert list(tset.frame["attacked"]) == [True, False, True]
        assert sorted(r for _, r in tset.skipped) == ["file is missing", "missing object_label"]
        assert len(load_scam(tmp_path, variants=["NoSCAM"])) == 1

    def test_scam_as_a_datasets_table(self):
        import datasets
        table = datasets.Dataset.from_dict({
            "image": make_images(2), "type": ["SCAM", "NoSCAM"], "object_label": ["ball", "chair"],
            "attack_word": ["car", "car"], "id": ["SCAM_img_0001", "NoSCAM_img_0001"]},
            features=datasets.Features({"image": datasets.Image(), "type": datasets.Value("string"),
                                        "object_label": datasets.Value("string"),
                                        "attack_word": datasets.Value("string"), "id": datasets.Value("string")}))
        tset = load_scam(table)
        assert list(tset.frame["label"]) == ["ball", "chair"] and list(tset.frame["attacked"]) == [True, False]

    def test_materzynska_annotations_in_both_json_shapes(self, tmp_path):
        make_images(1)[0].save(tmp_path / "IMG_1.JPG")
        make_images(1)[0].save(tmp_path / "IMG_2.JPG")
        entries = [{"IMG_1.JPG": {"true object": "cup", "typographic attack label": "good"}},
                   {"IMG_2.JPG": {"true object": "cup", "typographic attack label": ""}},
                   {"IMG_3.JPG": {"true object": "pen", "typographic attack label": "bad"}},
                   {"IMG_4.JPG": {"typographic attack label": "bad"}}]
        (tmp_path / "annotation.json").write_text(json.dumps(entries))
        tset = load_materzynska(tmp_path)
        assert list(tset.frame["text"]) == ["good", None] and list(tset.frame["attacked"]) == [True, False]
        assert dict(tset.skipped) == {"IMG_3.JPG": "file is missing", "IMG_4.JPG": "annotation lacks 'true object'"}
        merged = {k: v for e in entries for k, v in e.items()}
        (tmp_path / "annotation.json").write_text(json.dumps(merged))
        assert len(load_materzynska(tmp_path)) == 2

    def test_evaluating_a_loaded_set_counts_corrupt_images(self, tiny_vit, tmp_path):
        make_images(1)[0].save(tmp_path / "label=cat_text=ipod.png")
        (tmp_path / "label=dog_text=cat.png").write_bytes(b"corrupt")
        frame, metrics = load_paint(tmp_path).evaluate(tiny_vit)
        assert metrics["n"] == 1 and metrics["n_skipped"] == 1
        assert set(frame.columns) >= {"prediction", "correct", "fooled"}


class TestCommandLine:
    def test_attack_over_an_imagefolder_with_a_sweep_and_defences(self, tmp_path, capsys):
        from clipscope.cli import main
        for seed, label in enumerate(("cat", "dog")):
            (tmp_path / "data" / label).mkdir(parents=True)
            for i, im in enumerate(make_images(3, seed=seed, size=64)):
                im.save(tmp_path / "data" / label / f"{i}.png")
        config = tmp_path / "attack.yaml"
        config.write_text("classes: [cat, dog, ipod]\nattack: {target: ipod, size: 0.25}\n"
                          "ablation_site: visual.transformer.resblocks.1\n")
        out = tmp_path / "report"
        code = main(["attack", str(tmp_path / "data"), "--config", str(config), "--model", "clipscope-tiny-vit",
                     "--sweep", "size=0.1,0.3", "--defence", "prompt", "--defence", "ablation", "--out", str(out)])
        assert code == 0 and str(out.resolve()) in capsys.readouterr().out
        summary = pd.read_csv(out / "summary.csv")
        assert len(summary) == 3 and summary["n"].eq(6).all()
        assert len(pd.read_csv(out / "sweep.csv")) == 2
        page = (out / "index.html").read_text()
        assert page.count("data:image/png;base64") == 4 and "ablation of 8 unit(s)" in page

    def test_attack_on_a_public_set_layout(self, tmp_path):
        from clipscope.cli import main
        make_images(1)[0].save(tmp_path / "label=cat_text=ipod.png")
        assert main(["attack", str(tmp_path), "--format", "paint", "--model", "clipscope-tiny-vit",
                     "--out", str(tmp_path / "r")]) == 0
        assert pd.read_csv(tmp_path / "r" / "summary.csv")["set"].tolist() == ["PAINT"]

    def test_config_mistakes_are_one_line_errors(self, tmp_path, capsys):
        from clipscope.cli import main
        (tmp_path / "a").mkdir()
        make_images(1)[0].save(tmp_path / "a" / "x.png")
        assert main(["attack", str(tmp_path), "--defence", "prompt", "--model", "clipscope-tiny-vit",
                     "--config", str(self._write(tmp_path, "attack: {fontsize: 3}"))]) == 2
        assert "unknown attack key(s) ['fontsize']" in capsys.readouterr().err

    @staticmethod
    def _write(tmp_path, text):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return path
