"""Convert an open_clip ViT CLIP to a transformers ``CLIPModel`` folder (``clipscope.load("hf:/folder")``).

The tensor mapping is the one of transformers' former conversion script for OpenAI's CLIP
(``src/transformers/models/clip/convert_clip_original_pytorch_to_hf.py``, Hugging Face, 2021; removed
from later releases): each block's ``ln_1``/``ln_2`` become ``layer_norm1``/``layer_norm2``, the packed
``attn.in_proj_weight``/``in_proj_bias`` split in three (query, key, value) into
``self_attn.q_proj``/``k_proj``/``v_proj``, ``attn.out_proj`` stays, ``mlp.c_fc``/``c_proj`` become
``mlp.fc1``/``fc2``; ``ln_pre``/``ln_post``/``ln_final`` become ``pre_layrnorm``/``post_layernorm``/
``final_layer_norm``; ``conv1``, ``class_embedding`` and the positional embeddings go to the embeddings
modules; the projections ``visual.proj`` and ``text_projection``, stored ``(in, out)``, are transposed
into ``nn.Linear`` weights. open_clip's state dict keys are those of OpenAI's CLIP, so the same mapping
serves both. The code here is ours.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..validate import InvalidArgumentError

#: CLIP's normalization constants (OpenAI), open_clip's default preprocessing.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_BOS, _EOS = 49406, 49407  # CLIP's BPE vocabulary: <|startoftext|>, <|endoftext|>

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip ViT CLIP state dict to transformers ``CLIPModel`` keys (see the module docstring).

    Returns new contiguous tensors. Raises :class:`~clipscope.validate.InvalidArgumentError` listing the
    keys the mapping does not know (layer scale, attentional pooling, a ResNet tower, a custom text tower:
    models transformers' ``CLIPModel`` cannot hold).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        tensor = tensor.detach()
        match = _RESBLOCK.fullmatch(key)
        if key in _TOP:
            out[_TOP[key]] = tensor
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = tensor.T
        elif match:
            tower = "vision_model" if match[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match[2]}", match[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                    out[f"{prefix}.self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = part
                continue
            module, _, leaf = rest.rpartition(".")
            if module not in _BLOCK:
                unknown.append(key)
                continue
            out[f"{prefix}.{_BLOCK[module]}.{leaf}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise InvalidArgumentError("model_or_state_dict", f"<state dict with {len(unknown)} unmapped keys>",
                                   "an open_clip ViT CLIP with OpenAI's layout (no layer scale, attentional "
                                   "pooling or custom text tower), which transformers' CLIPModel holds; these keys "
                                   f"have no place there: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def clip_config(state: Mapping[str, torch.Tensor], vision_heads: int, text_heads: int, quick_gelu: bool):
    """The transformers ``CLIPConfig`` of an open_clip ViT CLIP state dict; sizes are read from the tensors'
    shapes, the head counts and the activation (QuickGELU or GELU) are given."""
    from transformers import CLIPConfig
    act = "quick_gelu" if quick_gelu else "gelu"
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))

    def layers(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    vision = dict(hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=layers("visual.transformer.resblocks."), num_attention_heads=vision_heads,
                  image_size=grid * patch, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5)
    vocab, text_width = state["token_embedding.weight"].shape
    text = dict(vocab_size=vocab, hidden_size=text_width,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=layers("transformer.resblocks."), num_attention_heads=text_heads,
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=act,
                layer_norm_eps=1e-5, bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_EOS)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1],
                      logit_scale_init_value=float(state["logit_scale"]))


def open_clip_to_transformers(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], folder: str | os.PathLike, *,
                              heads: tuple[int, int] | None = None, quick_gelu: bool | None = None,
                              image_mean: tuple[float, float, float] | None = None,
                              image_std: tuple[float, float, float] | None = None) -> Path:
    """Write an open_clip ViT CLIP as a transformers CLIP folder; returns the folder.

    ``model_or_state_dict`` is an open_clip ``CLIP`` (a ViT image tower and the built-in text tower) or
    its state dict. The folder gets ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    (resize the shorter side to the input size, bicubic, centre crop, ``image_mean``/``image_std``) and
    CLIP's BPE tokenizer files (from the vocabulary open_clip ships), each written atomically, so that
    ``clipscope.load(f"hf:{folder}")`` loads it. From a model, ``heads`` (vision, text), ``quick_gelu``
    and the normalization are read from it; a state dict needs ``heads`` (shapes do not say them) and
    takes ``quick_gelu=False`` and OpenAI's normalization unless given.

    Raises :class:`~clipscope.validate.InvalidArgumentError` for a model transformers' ``CLIPModel``
    cannot hold (naming the keys it does not know, or for a model the setting it does not compute:
    :func:`_check_settings`) or a state dict without ``heads``. A state dict does not tell its settings
    (pooling, causal mask): it must come from a model with transformers' ones.
    """
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        state = model.state_dict()
        blocks = [getattr(model.visual, "transformer", None), getattr(model, "transformer", None)]
        if not all(hasattr(b, "resblocks") for b in blocks):
            raise InvalidArgumentError("model_or_state_dict", type(model).__name__,
                                       "an open_clip CLIP with a ViT image tower and the built-in text tower")
        _check_settings(model)
        heads = heads or (blocks[0].resblocks[0].attn.num_heads, blocks[1].resblocks[0].attn.num_heads)
        if quick_gelu is None:
            quick_gelu = type(blocks[0].resblocks[0].mlp.gelu).__name__ == "QuickGELU"
        preprocess = getattr(model.visual, "preprocess_cfg", {})
        image_mean = image_mean or tuple(preprocess.get("mean", OPENAI_MEAN))
        image_std = image_std or tuple(preprocess.get("std", OPENAI_STD))
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
        if heads is None:
            raise InvalidArgumentError("heads", None, "(vision heads, text heads) for a state dict, whose tensor "
                                                      "shapes do not tell the number of heads")
    else:
        raise InvalidArgumentError("model_or_state_dict", type(model_or_state_dict).__name__,
                                   "an open_clip CLIP model or its state dict")
    tensors = convert_state_dict(state)
    config = clip_config(state, heads[0], heads[1], bool(quick_gelu))
    _check_against(config, tensors)
    folder = io.ensure_folder(folder)
    from safetensors.torch import save
    io.write_bytes_atomic(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    io.write_text_atomic(folder / "config.json", config.to_json_string())
    size = config.vision_config.image_size
    io.write_text_atomic(folder / "preprocessor_config.json", json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(image_mean or OPENAI_MEAN), "image_std": list(image_std or OPENAI_STD)}, indent=2))
    write_tokenizer(folder)
    return folder


def _check_settings(model: nn.Module) -> None:
    """Raise :class:`~clipscope.validate.InvalidArgumentError` naming the first setting of the open_clip ``CLIP``
    ``model`` that transformers' ``CLIPModel`` does not compute, though the tensors would fit: it pools the
    class token after ``ln_post``, has no attentional pooler, no layer scale and no projection bias, and
    its text tower is causal and pools the end-of-text token (the largest id: ``argmax``)."""
    visual = model.visual
    pool, pooler = getattr(visual, "pool_type", "tok"), getattr(visual, "attn_pool", None)
    after, text_pool = bool(getattr(visual, "final_ln_after_pool", False)), getattr(model, "text_pool_type", None)
    projection = getattr(model, "text_projection", None)
    blocks = [*visual.transformer.resblocks, *model.transformer.resblocks]
    scaled = any(not isinstance(getattr(b, name, nn.Identity()), nn.Identity) for b in blocks for name in ("ls_1", "ls_2"))
    found = [  # (setting, its value, whether CLIPModel computes it)
        ("visual.pool_type", pool, pool == "tok"), ("visual.final_ln_after_pool", after, not after),
        ("visual.attn_pool", type(pooler).__name__, pooler is None),
        ("text_pool_type", text_pool, text_pool == "argmax"),
        ("attn_mask (no_causal_mask)", None, getattr(model, "attn_mask", None) is not None),
        ("proj_bias", True, not (isinstance(projection, nn.Linear) and projection.bias is not None)),
        ("ls_init_value (layer scale)", "set", not scaled)]
    for setting, value, supported in found:
        if not supported:
            raise InvalidArgumentError("model_or_state_dict", f"<{type(model).__name__} with {setting}={value!r}>",
                                       "an open_clip ViT CLIP that transformers' CLIPModel computes: class-token "
                                       "pooling (pool_type='tok', final_ln_after_pool=False, no attn_pool), "
                                       "text_pool_type='argmax', a causal text tower, no proj_bias, no layer scale")


def _check_against(config, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`~clipscope.validate.InvalidArgumentError` unless ``tensors`` are exactly the tensors (names
    and shapes) of the ``CLIPModel`` that ``config`` describes (built on the meta device: no memory)."""
    from transformers import CLIPModel
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise InvalidArgumentError("model_or_state_dict", f"<{len(wrong)} tensors that do not fit CLIPModel>",
                                   "an open_clip ViT CLIP whose tensors map one to one onto transformers' CLIPModel "
                                   f"(these do not: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''})")


def write_tokenizer(folder: str | os.PathLike) -> None:
    """Write CLIP's BPE tokenizer (transformers' ``CLIPTokenizer`` files) into ``folder``, built from the
    vocabulary and merges open_clip ships, with OpenAI's spelling of the special tokens."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    simple = SimpleTokenizer()
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in simple.encoder.items()}
    with tempfile.TemporaryDirectory() as scratch:
        CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(scratch)
        for path in sorted(Path(scratch).iterdir()):
            io.write_bytes_atomic(Path(folder) / path.name, path.read_bytes())
