"""Real pretrained weights: run when they are in the local cache, skipped with a reason otherwise."""
from __future__ import annotations

import pytest
from huggingface_hub import try_to_load_from_cache

import clipscope

pytestmark = pytest.mark.real_weights

CASES = [  # (name, pretrained, hub repo, weights file that must be cached)
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
    ("RN50", "openai", "timm/resnet50_clip.openai", "open_clip_model.safetensors"),
    ("hf-hub:timm/vit_base_patch16_clip_224.openai", None, "timm/vit_base_patch16_clip_224.openai",
     "open_clip_model.safetensors"),
    ("hf:openai/clip-vit-base-patch32", None, "openai/clip-vit-base-patch32", "model.safetensors"),
]


def _cached(repo: str, filename: str) -> bool:
    return isinstance(try_to_load_from_cache(repo, filename), str)


@pytest.mark.parametrize("name,pretrained,repo,filename", CASES, ids=[c[0] for c in CASES])
def test_a_real_clip_recognises_a_photo_of_a_person(name, pretrained, repo, filename):
    if not _cached(repo, filename):
        pytest.skip(f"{repo}/{filename} is not in the local Hugging Face cache")
    import matplotlib.cbook
    model = clipscope.load(name, pretrained=pretrained)
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    result = model.zero_shot([photo], ["a woman in uniform", "a cat", "a car", "a bowl of fruit"])
    assert result.predictions == ["a woman in uniform"] and result.probs[0, 0] > 0.5
