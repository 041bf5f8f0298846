"""transformers ``CLIPModel`` checkpoints (``"hf:ORG/REPO"``) behind the same :class:`ClipModel` interface.

Needs the ``hf`` extra (``pip install 'clipscope-toolkit[hf]'``). Sites are named
like open_clip's: ``vision_model.*`` becomes ``visual.*``, ``text_model.*``
becomes ``text.*``, and the projections are ``visual.projection`` and
``text.projection`` (e.g. ``visual.encoder.layers.11.mlp.fc1``).
"""
from __future__ import annotations

import json
import os
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


def _model_folder(name: str) -> Path:
    """Return the folder holding the files of ``"hf:ORG/REPO"`` (from the hub cache) or ``"hf:/local/folder"``.

    Raises :class:`~clipscope.hub.CheckpointError` for a local path that is not a folder.
    """
    repo = os.path.expanduser(name[len("hf:"):])
    if os.path.isdir(repo):
        return Path(repo)
    if repo.startswith((".", "/", "\\")) or repo.count("/") > 1 or os.path.isabs(repo):
        raise hub.CheckpointError(f"Cannot load {repo!r}: no such folder (a transformers CLIP folder, or a hub "
                                  "id 'ORG/REPO').")
    files = hub.ensure_files(name, repo, REQUIRED_FILES, OPTIONAL_FILES)
    return Path(files["config.json"]).parent


def _check_folder(folder: Path) -> None:
    """Raise :class:`~clipscope.hub.CheckpointError` unless ``folder`` holds every required file, with
    readable JSON configs."""
    missing = [" or ".join(group) for group in REQUIRED_FILES if not any((folder / f).is_file() for f in group)]
    if missing:
        raise hub.CheckpointError(f"Cannot load {str(folder)!r}: the folder has no {'; no '.join(missing)} "
                                  "(a transformers CLIP folder needs all of them).")
    for config in ("config.json", "preprocessor_config.json"):
        path = folder / config
        try:
            ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (ValueError, OSError) as exc:
            raise hub.CheckpointError(f"Cannot load {str(path)!r}: not valid JSON ({hub.describe_error(exc)}).") \
                from None
        if not ok:
            raise hub.CheckpointError(f"Cannot load {str(path)!r}: it does not hold a JSON object.")


def _load_clip(folder: Path) -> nn.Module:
    """Return the ``CLIPModel`` in ``folder``, every tensor loaded from its weights file.

    Raises :class:`~clipscope.hub.UnsafeCheckpointError` for a pickle that needs code and
    :class:`~clipscope.hub.CheckpointError` for a malformed file or tensors missing or of the wrong shape
    (transformers would initialise those randomly).
    """
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging
    has_safetensors = (folder / "model.safetensors").is_file()
    weights = str(folder / ("model.safetensors" if has_safetensors else "pytorch_model.bin"))
    target = "the CLIPModel its config.json describes"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is summarized in our error instead
    try:
        clip, info = CLIPModel.from_pretrained(folder, use_safetensors=has_safetensors, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
    except Exception as exc:  # transformers, torch and safetensors raise many types for a bad file
        raise hub.checkpoint_error(exc, weights, target) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    found = {key: tuple(file_shape) for key, file_shape, _ in info["mismatched_keys"]}
    expected = {key: tuple(model_shape) for key, _, model_shape in info["mismatched_keys"]}
    expected.update({key: () for key in info["missing_keys"]})
    if expected:
        raise hub.CheckpointError(f"Cannot load {weights!r}: its tensors do not fit {target} "
                                  f"({hub.shape_differences(found, expected)}).")
    return clip


def load_transformers(name: str, device: torch.device, dtype: torch.dtype):
    """Load ``"hf:ORG/REPO"`` (or ``"hf:/local/folder"``) as a :class:`~clipscope.model.ClipModel`."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("'hf:' models need transformers: pip install 'clipscope-toolkit[hf]'") from None
    from .model import ClipModel

    folder = _model_folder(name)
    _check_folder(folder)
    clip = _load_clip(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for unreadable tokenizer files
        raise hub.CheckpointError(f"Cannot load the tokenizer files in {str(folder)!r}: "
                                  f"{hub.describe_error(exc)}.") from None
    context = clip.config.text_config.max_position_embeddings
    preprocess, size, mean, std = _preprocess_from_config(str(folder / "preprocessor_config.json"))
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
