"""The model layer's primitives that capability modules build on, checked against independent computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipscope.validate import InvalidArgumentError

CLASSES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(params=["organism", "tiny_vit"])
def model(request):
    """The ResNet organism and the tiny random ViT: the head must not depend on the image tower."""
    return request.getfixturevalue(request.param)


class TestClassifier:
    def test_logits_are_the_scaled_cosine_to_each_prompt_ensemble(self, model):
        head = model.classifier(CLASSES, templates=["a photo of a {}.", "a drawing of a {}."])
        texts = [t.format(c) for c in CLASSES for t in ("a photo of a {}.", "a drawing of a {}.")]
        with torch.no_grad():
            prompt_emb = F.normalize(model.encode_text(texts, normalize=False).float(), dim=-1)
        class_emb = F.normalize(prompt_emb.view(3, 2, -1).mean(dim=1), dim=-1)
        images = torch.randn(5, model.embed_dim)
        expected = model.logit_scale * F.normalize(images, dim=-1) @ class_emb.T
        torch.testing.assert_close(head.logits(images), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(head.probs(images).sum(dim=-1), torch.ones(5))
        assert head.predict(images) == [CLASSES[i] for i in expected.argmax(dim=-1).tolist()]

    def test_zero_shot_is_the_classifier_on_image_embeddings(self, model):
        size = model.image_size
        x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(0))
        head = model.classifier(CLASSES)
        with torch.no_grad():
            emb = model.encode_image(x)
        torch.testing.assert_close(model.zero_shot(x, CLASSES).probs, head.probs(emb), atol=1e-5, rtol=1e-5)

    def test_bad_class_lists_name_the_parameter(self, organism):
        with pytest.raises(InvalidArgumentError, match="classes"):
            organism.classifier(["cat", ""])
