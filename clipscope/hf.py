"""transformers ``CLIPModel`` checkpoints (``"hf:ORG/REPO"``) behind the same :class:`ClipModel` interface.

Needs the ``hf`` extra (``pip install 'clipscope-toolkit[hf]'``). Sites are named
like open_clip's: ``vision_model.*`` becomes ``visual.*``, ``text_model.*``
becomes ``text.*``, and the projections are ``visual.projection`` and
``text.projection`` (e.g. ``visual.encoder.layers.11.mlp.fc1``).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from . import hub
from .hooks import Tower

#: Files a transformers CLIP repository must provide (alternatives in order of preference).
REQUIRED_FILES = (["config.json"], ["model.safetensors", "pytorch_model.bin"], ["preprocessor_config.json"],
                  ["tokenizer.json", "vocab.json"])
OPTIONAL_FILES = ("merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class TransformersCLIP(nn.Module):
    """Gives a transformers ``CLIPModel`` open_clip's ``encode_image`` / ``encode_text`` / ``logit_scale``."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # CLIP's text transformer is causal and pools at the first end-of-text token,
        # so padding after it needs no attention mask.
        out = self.clip.get_text_features(input_ids=input_ids)
        return getattr(out, "pooler_output", out)


def _preprocess_from_config(path: str):
    from torchvision import transforms as T
    cfg = json.loads(Path(path).read_text())
    size = cfg.get("size", 224)
    shortest = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", shortest)
    crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    interpolation = {0: T.InterpolationMode.NEAREST, 2: T.InterpolationMode.BILINEAR,
                     3: T.InterpolationMode.BICUBIC}.get(cfg.get("resample", 3), T.InterpolationMode.BICUBIC)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    steps = [T.Resize(shortest, interpolation=interpolation)]
    if cfg.get("do_center_crop", True):
        steps.append(T.CenterCrop(crop_hw))
    steps += [T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps), crop_hw, mean, std


def load_transformers(name: str, device: torch.device, dtype: torch.dtype):
    """Load ``"hf:ORG/REPO"`` (or ``"hf:/local/folder"``) as a :class:`~clipscope.model.ClipModel`."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise ImportError("'hf:' models need transformers: pip install 'clipscope-toolkit[hf]'") from None
    from .model import ClipModel

    repo = name[len("hf:"):]
    if os.path.isdir(repo):
        folder = repo
    else:
        files = hub.ensure_files(name, repo, REQUIRED_FILES, OPTIONAL_FILES)
        folder = os.path.dirname(files["config.json"])
    has_safetensors = (Path(folder) / "model.safetensors").is_file()
    try:
        clip = CLIPModel.from_pretrained(folder, use_safetensors=has_safetensors)
    except pickle.UnpicklingError as exc:
        raise hub.refuse_unsafe(exc, str(Path(folder) / "pytorch_model.bin")) from None
    except OSError as exc:
        if "Weights only load failed" in str(exc):
            raise hub.refuse_unsafe(exc, str(Path(folder) / "pytorch_model.bin")) from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = clip.config.text_config.max_position_embeddings
    preprocess, size, mean, std = _preprocess_from_config(str(Path(folder) / "preprocessor_config.json"))
    model = TransformersCLIP(clip).to(device, dtype)

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", max_length=context, truncation=True,
                         return_tensors="pt")["input_ids"]

    towers = [Tower("visual", {"clip.vision_model": "visual", "clip.visual_projection": "visual.projection"},
                    lambda b: model.encode_image(torch.zeros(b, 3, *size, device=device, dtype=dtype))),
              Tower("text", {"clip.text_model": "text", "clip.text_projection": "text.projection"},
                    lambda b: model.encode_text(tokenize(["a photo"] * b).to(device)))]
    return ClipModel(model, preprocess, tokenize, name=name, pretrained=None, device=device, dtype=dtype,
                     image_size=size, image_mean=mean, image_std=std, towers=towers, backend="transformers")
