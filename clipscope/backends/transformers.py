"""The transformers backend: ``CLIPModel`` checkpoints (``"hf:ORG/REPO"`` or ``"hf:/local/folder"``).

Needs the ``hf`` extra (``pip install 'clipscope-toolkit[hf]'``). Sites are named like
open_clip's and mean the same: ``visual`` and ``text`` are the projected embeddings (what
``encode_image`` / ``encode_text`` return before normalization), ``vision_model.*`` becomes
``visual.*``, ``text_model.*`` becomes ``text.*``, and the projections are ``visual.projection``
and ``text.projection`` (e.g. ``visual.encoder.layers.11.mlp.fc1``).

``preprocessor_config.json`` is read as transformers reads it: a ``size`` given as height and
width resizes to exactly that size, a ``shortest_edge`` (or a bare number) resizes the shorter side
keeping the aspect ratio, every PIL resample code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic,
4 box, 5 hamming) is honoured, and the centre crop is applied when ``do_center_crop`` is on.
Without the crop a shortest-edge resize would give images of varying size, which the model does
not take: the image is then resized to the model's input size (its whole content, squashed).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..hooks import AttentionHeads, Tower
from ..validate import InvalidArgumentError
from . import Architecture, LoadedModel, Readout, relu_paths
from .attention import clip_attention, output_projection

#: Files a transformers CLIP repository must provide (alternatives in order of preference).
REQUIRED_FILES = (["config.json"], ["model.safetensors", "pytorch_model.bin"], ["preprocessor_config.json"],
                  ["tokenizer.json", "vocab.json"])
OPTIONAL_FILES = ("merges.txt", "tokenizer_config.json", "special_tokens_map.json")

#: PIL resample codes, as ``preprocessor_config.json`` writes them, by torchvision's name for the filter.
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class _Embedding(nn.Module):
    """A tower's projected embedding as a module, so that the site ``visual`` / ``text`` is the embedding
    (as on open_clip). Holds the feature function, not the tower: no parameters of its own."""

    def __init__(self, features: Callable[[torch.Tensor], object]):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return getattr(out, "pooler_output", out)


class TransformersCLIP(nn.Module):
    """Gives a transformers ``CLIPModel`` open_clip's ``encode_image`` / ``encode_text`` / ``logit_scale``."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.visual = _Embedding(lambda x: clip.get_image_features(pixel_values=x))
        # CLIP's text transformer is causal and pools at the first end-of-text token,
        # so padding after it needs no attention mask.
        self.text = _Embedding(lambda ids: clip.get_text_features(input_ids=ids))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)


def preprocess_from_config(path: str | os.PathLike, input_size: int, cfg: Mapping[str, Any] | None = None):
    """Return ``(transform, (height, width), mean, std)`` for a ``preprocessor_config.json``.

    ``transform`` maps a PIL image to a normalized float tensor ``(3, height, width)``; ``input_size``
    is the model's input side (the vision config's ``image_size``), used when no crop fixes the size;
    ``cfg`` is the file's content where it was read already (``path`` then only names it in errors).
    Raises :class:`~clipscope.hub.CheckpointError` naming the file for a file that is not a JSON object
    or a resample code PIL does not have.
    """
    from torchvision import transforms as T
    cfg = hub.read_json_object(path) if cfg is None else cfg
    code = cfg.get("resample", 3)
    if code not in RESAMPLE:
        raise hub.CheckpointError(f"Cannot load {str(path)!r}: resample={code!r} is not a PIL resample code "
                                  f"(valid: {', '.join(f'{k} {v.lower()}' for k, v in RESAMPLE.items())}).")
    interpolation = T.InterpolationMode[RESAMPLE[code]]
    size = cfg.get("size", input_size)
    if isinstance(size, dict) and "height" in size and "width" in size:
        resize: int | tuple[int, int] = (int(size["height"]), int(size["width"]))
    else:
        resize = int(size.get("shortest_edge", input_size) if isinstance(size, dict) else size)
    steps = [T.Lambda(lambda im: im.convert("RGB"))]
    if cfg.get("do_center_crop", True):
        crop = cfg.get("crop_size", resize)
        out = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else \
            (crop if isinstance(crop, tuple) else (int(crop), int(crop)))
        steps += [T.Resize(resize, interpolation=interpolation), T.CenterCrop(out)]
    else:
        out = resize if isinstance(resize, tuple) else (input_size, input_size)
        steps.append(T.Resize(out, interpolation=interpolation))
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps), out, mean, std


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


def _check_folder(folder: Path) -> dict[str, Any]:
    """Return the content of ``folder``'s ``preprocessor_config.json``; raise
    :class:`~clipscope.hub.CheckpointError` unless ``folder`` holds every required file, with readable JSON
    configs."""
    missing = [" or ".join(group) for group in REQUIRED_FILES if not any((folder / f).is_file() for f in group)]
    if missing:
        raise hub.CheckpointError(f"Cannot load {str(folder)!r}: the folder has no {'; no '.join(missing)} "
                                  "(a transformers CLIP folder needs all of them).")
    hub.read_json_object(folder / "config.json")
    return hub.read_json_object(folder / "preprocessor_config.json")


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


def load(name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``"hf:ORG/REPO"`` (or ``"hf:/local/folder"``); ``pretrained`` must be ``None`` (the id names the
    weights). Errors as for :func:`clipscope.load`."""
    if pretrained is not None:
        raise InvalidArgumentError("pretrained", pretrained, "None: an 'hf:' id names its own weights")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("'hf:' models need transformers: pip install 'clipscope-toolkit[hf]'") from None
    folder = _model_folder(name)
    preprocessor_config = _check_folder(folder)
    clip = _load_clip(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for unreadable tokenizer files
        raise hub.CheckpointError(f"Cannot load the tokenizer files in {str(folder)!r}: "
                                  f"{hub.describe_error(exc)}.") from None
    context = clip.config.text_config.max_position_embeddings
    preprocess, size, mean, std = preprocess_from_config(folder / "preprocessor_config.json",
                                                         clip.config.vision_config.image_size, preprocessor_config)
    model = TransformersCLIP(clip).to(device, dtype)

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", max_length=context, truncation=True,
                         return_tensors="pt")["input_ids"]

    towers = [Tower("visual", {"visual": "visual", "clip.vision_model.": "visual.",
                               "clip.visual_projection": "visual.projection"},
                    lambda b: model.encode_image(torch.zeros(b, 3, *size, device=device, dtype=dtype))),
              Tower("text", {"text": "text", "clip.text_model.": "text.", "clip.text_projection": "text.projection"},
                    lambda b: model.encode_text(tokenize(["a photo"] * b).to(device)))]
    return LoadedModel(model, preprocess, tokenize, name=name, pretrained=None, image_size=tuple(size),
                       image_mean=mean, image_std=std, towers=towers, architecture=architecture(model),
                       backend="transformers")


def architecture(model: TransformersCLIP) -> Architecture:
    """Describe a wrapped ``CLIPModel``: encoder layers as blocks, a class token before the patch grid."""
    vision, text = model.clip.vision_model, model.clip.text_model
    blocks = {"visual": tuple(f"visual.encoder.layers.{i}" for i in range(len(vision.encoder.layers))),
              "text": tuple(f"text.encoder.layers.{i}" for i in range(len(text.encoder.layers)))}
    embeddings = vision.embeddings
    side = embeddings.image_size // embeddings.patch_size
    return Architecture(blocks=blocks, prefix_tokens=int(embeddings.num_positions - side * side),
                        patch_grid=(side, side),
                        attention={tower: tuple(f"{b}.self_attn" for b in names) for tower, names in blocks.items()},
                        redirectable=relu_paths(model, "clip.vision_model"),
                        readout=Readout(pool="token", norm="clip.vision_model.post_layernorm",
                                        projection="clip.visual_projection.weight", norm_after_pool=True,
                                        projection_transposed=True),
                        heads={**_attention_heads(vision, blocks["visual"]), **_attention_heads(text, blocks["text"])})


def _attention_heads(tower: nn.Module, blocks: tuple[str, ...]) -> dict[str, AttentionHeads]:
    """``{attention site: AttentionHeads}`` for the encoder layers of ``tower`` (block sites ``blocks``):
    ``self_attn`` (``CLIPAttention``: eager, sdpa, flash) and ``layer_norm2`` before the MLP."""
    return {f"{name}.self_attn": AttentionHeads(f"{name}.self_attn", name, f"{name}.layer_norm2",
                                                layer.self_attn.num_heads, clip_attention, output_projection)
            for name, layer in zip(blocks, tower.encoder.layers)}
