"""ClipModel: encoding any image source, zero-shot with prompt ensembles and a class-embedding cache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipscope import EmbeddedImages, ImageLoadError, Unit
from clipscope.prompts import OPENAI_IMAGENET_TEMPLATES



class TestEncoding:
    def test_every_image_source_gives_the_same_embedding(self, tiny, images, tmp_path):
        paths = []
        for i, im in enumerate(images):
            paths.append(tmp_path / f"{i}.png")
            im.save(paths[-1])
        from_pil = tiny.encode_image(images)
        assert from_pil.shape == (5, 32)
        assert torch.allclose(tiny.encode_image([str(p) for p in paths]), from_pil, atol=1e-5)
        assert torch.allclose(tiny.encode_image(str(tmp_path)), from_pil, atol=1e-5)  # a folder
        batch = torch.stack([tiny.preprocess(im) for im in images])
        out = tiny.encode_image(batch)
        assert out.device == batch.device  # a tensor's embeddings come back where the tensor was
        assert torch.allclose(out, from_pil, atol=1e-5)

    def test_image_and_text_embeddings_multiply_whatever_the_models_device(self, tiny, images):
        texts = tiny.encode_text(["a cat", "a dog"])
        assert texts.device.type == "cpu" and tiny.class_embeddings(["cat"]).device.type == "cpu"
        assert (tiny.encode_image(images) @ texts.T).shape == (5, 2)
        on_model = torch.stack([tiny.preprocess(im) for im in images]).to(tiny.device)
        assert tiny.encode_image(on_model).device.type == tiny.device.type
        tokens = tiny.tokenize(["a cat"]).to(tiny.device)
        assert tiny.encode_text(tokens).device.type == tiny.device.type

    def test_datasets_tables_are_read_through_their_image_column(self, tiny, images):
        import datasets
        table = datasets.Dataset.from_dict({"img": images, "label": list(range(5))},
                                           features=datasets.Features({"img": datasets.Image(),
                                                                       "label": datasets.Value("int64")}))
        assert torch.allclose(tiny.encode_image(table), tiny.encode_image(images), atol=1e-5)

    def test_greyscale_rgba_and_cmyk_images_are_converted(self, tiny, images):
        odd = [images[0].convert("L"), images[1].convert("RGBA"), images[2].convert("CMYK"), images[3].convert("P")]
        as_rgb = [im.convert("RGB") for im in odd]
        assert torch.allclose(tiny.encode_image(odd), tiny.encode_image(as_rgb), atol=1e-6)

    def test_embeddings_are_unit_norm_unless_asked_otherwise(self, tiny, images):
        assert torch.allclose(tiny.encode_image(images).norm(dim=-1), torch.ones(5), atol=1e-5)
        assert torch.allclose(tiny.encode_text(["a", "b"]).norm(dim=-1), torch.ones(2), atol=1e-5)
        raw = tiny.encode_image(images, normalize=False)
        assert torch.allclose(F.normalize(raw, dim=-1), tiny.encode_image(images), atol=1e-5)

    def test_unreadable_images_are_all_named_by_encode_and_skipped_by_embed(self, tiny, images, tmp_path):
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not a png")
        source = [images[0], str(bad), images[1], str(tmp_path / "missing.jpg")]
        with pytest.raises(ImageLoadError) as info:
            tiny.encode_image(source)
        assert len(info.value.skipped) == 2 and "broken.png" in str(info.value) and "missing.jpg" in str(info.value)
        result = tiny.embed(source)
        assert isinstance(result, EmbeddedImages)
        assert result.keys == [0, 2] and result.n_skipped == 2 and result.embeddings.shape == (2, 32)

    def test_gradients_flow_to_a_tensor_input(self, tiny):
        x = torch.randn(2, 3, *tiny.image_size, requires_grad=True)
        tiny.encode_image(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in tiny.model.parameters())


class TestZeroShot:
    CLASSES = ["cat", "dog", "red square"]

    def test_probabilities_sum_to_one_and_match_a_hand_computation(self, tiny, images):
        result = tiny.zero_shot(images, self.CLASSES, templates=["a photo of a {}.", "a drawing of a {}."])
        assert result.probs.shape == (5, 3)
        assert torch.allclose(result.probs.sum(dim=1), torch.ones(5), atol=1e-6)
        with torch.no_grad():
            x = torch.stack([tiny.preprocess(i) for i in images]).to(tiny.device, tiny.dtype)
            img = F.normalize(tiny.model.encode_image(x).float(), dim=-1)
            per_class = []
            for c in self.CLASSES:
                tokens = tiny.tokenize([f"a photo of a {c}.", f"a drawing of a {c}."]).to(tiny.device)
                text = F.normalize(tiny.model.encode_text(tokens).float(), dim=-1)
                per_class.append(F.normalize(text.mean(0), dim=-1))
            expected = (tiny.model.logit_scale.exp().float() * img @ torch.stack(per_class).T).softmax(dim=-1).cpu()
        assert torch.allclose(result.probs, expected, atol=1e-5 if tiny.dtype == torch.float32 else 1e-2)
        assert result.predictions == [self.CLASSES[i] for i in expected.argmax(1)]

    def test_the_80_openai_templates_are_available_by_name(self, tiny, images):
        assert len(OPENAI_IMAGENET_TEMPLATES) == 80
        named = tiny.zero_shot(images, self.CLASSES, templates="openai_imagenet")
        listed = tiny.zero_shot(images, self.CLASSES, templates=list(OPENAI_IMAGENET_TEMPLATES))
        assert named.templates == OPENAI_IMAGENET_TEMPLATES and torch.allclose(named.probs, listed.probs)

    def test_class_embeddings_are_cached_by_classes_and_templates(self, tiny, images, monkeypatch):
        tiny.zero_shot(images, self.CLASSES)
        calls = []
        original = tiny.model.encode_text
        monkeypatch.setattr(tiny.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
        tiny.zero_shot(images, self.CLASSES)
        assert calls == []
        tiny.zero_shot(images, self.CLASSES, templates="a sketch of a {}.")
        assert len(calls) == 1

    def test_the_cache_keeps_only_the_most_recently_used_class_lists(self, tiny, monkeypatch):
        import clipscope.model as model_module
        monkeypatch.setattr(model_module, "CLASS_CACHE_SIZE", 2)
        tiny._class_cache.clear()
        for classes in (["a"], ["b"], ["a"], ["c"]):  # "a" used again before "c" arrives: "b" is dropped
            tiny.class_embeddings(classes)
        assert [key[1] for key in tiny._class_cache] == [("a",), ("c",)]

    def test_transformed_embeddings_are_used_everywhere_and_named_in_the_id(self, tiny, images):
        plain_image, plain_text, plain_id = tiny.encode_image(images), tiny.class_embeddings(self.CLASSES), tiny.id
        flip = torch.ones(tiny.embed_dim)
        flip[: tiny.embed_dim // 2] = -1  # an orthogonal map: unit norms stay unit norms

        def transform(x):
            return x * flip.to(x.device, x.dtype)
        with pytest.raises(RuntimeError, match="inside"):
            with tiny.transform_embeddings(transform, "flip"):
                assert tiny.id == plain_id + "|flip"
                assert torch.allclose(tiny.encode_image(images), plain_image * flip, atol=1e-6)
                assert torch.allclose(tiny.class_embeddings(self.CLASSES), plain_text * flip, atol=1e-6)
                raise RuntimeError("an error inside the block")
        assert tiny.id == plain_id and "encode_image" not in vars(tiny.model)  # restored after the error
        assert torch.equal(tiny.encode_image(images), plain_image)
        with pytest.raises(ValueError, match="tag"):
            tiny.transform_embeddings(transform, "a|b").__enter__()

    def test_the_cache_is_bypassed_while_the_text_tower_is_ablated(self, tiny, images):
        clean = tiny.class_embeddings(self.CLASSES)
        with tiny.ablate(Unit.neuron("text.ln_final", 0)):
            ablated = tiny.class_embeddings(self.CLASSES)
        assert not torch.allclose(clean, ablated)
        assert torch.equal(tiny.class_embeddings(self.CLASSES), clean)

    @pytest.mark.parametrize("classes,error", [([], "at least 1 non-empty"), (["a", "a"], "'a' appears twice"),
                                               ("cat", "a list of")])
    def test_bad_class_lists_are_refused(self, tiny, images, classes, error):
        with pytest.raises((ValueError, TypeError), match=error):
            tiny.zero_shot(images, classes)

    def test_bad_templates_are_refused_with_the_valid_choices(self, tiny, images):
        with pytest.raises(ValueError, match="openai_imagenet"):
            tiny.zero_shot(images, self.CLASSES, templates="imagenet")
        with pytest.raises(ValueError, match="exactly one"):
            tiny.zero_shot(images, self.CLASSES, templates=["no slot"])

    def test_result_renders_as_a_frame_html_and_plot(self, tiny, images):
        result = tiny.zero_shot(images, self.CLASSES)
        frame = result.to_frame()
        assert list(frame.columns) == ["prediction", *self.CLASSES] and len(frame) == 5
        assert "<table" in result._repr_html_()
        assert len(result.plot(max_images=3).axes) == 3


def test_open_binary_files_are_read(tiny, images, tmp_path):
    images[0].save(tmp_path / "a.png")
    with open(tmp_path / "a.png", "rb") as fh:
        from_file = tiny.encode_image([fh])
    with open(tmp_path / "a.png", "rb") as fh:
        alone = tiny.encode_image(fh)
    assert torch.allclose(from_file, tiny.encode_image([images[0]]), atol=1e-5)
    assert torch.allclose(alone, from_file, atol=1e-5)


class TestOrderedMap:
    """``clipscope.data.ordered_map``: the thread pool behind rendering and preprocessing."""

    def test_keeps_the_order_and_runs_at_most_a_window_ahead(self):
        import threading
        import time

        from clipscope.data import ordered_map
        consumed = []

        def source():
            for i in range(20):
                consumed.append(i)
                yield i

        def slow_square(i):
            time.sleep(0.002 * (i % 3))   # later items often finish first
            return i * i, threading.current_thread().name

        out, threads = [], set()
        for value, thread in ordered_map(slow_square, source(), workers=3, window=4):
            out.append(value)
            threads.add(thread)
            assert len(consumed) <= len(out) + 4
        assert out == [i * i for i in range(20)]
        assert all(t.startswith("clipscope") for t in threads) and 1 < len(threads) <= 3
        assert [v for v, _ in ordered_map(slow_square, range(5), workers=1)] == [0, 1, 4, 9, 16]

    def test_an_error_is_raised_at_its_item(self):
        from clipscope.data import ordered_map

        def fail_at_3(i):
            if i == 3:
                raise ValueError("item 3")
            return i
        got = []
        with pytest.raises(ValueError, match="item 3"):
            for v in ordered_map(fail_at_3, range(10), workers=2):
                got.append(v)
        assert got == [0, 1, 2]
