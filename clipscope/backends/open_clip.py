"""The open_clip backend: every name that is not a transformers id, the organism included.

Name forms: ``"organism"``; an open_clip model name with a pretrained tag, a checkpoint path or
``None`` (random weights); ``"hf-hub:ORG/REPO"``; a local folder with ``open_clip_config.json``.
:mod:`clipscope.hub` resolves the files (cache, one probe, download); open_clip builds the model from
local paths, its parameters on the meta device when a checkpoint will fill them, and converts the
checkpoint, whose tensors are then assigned to the model (no throwaway random initialisation).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub, prompts
from ..hooks import AttentionHeads, Tower
from . import Architecture, LoadedModel, Readout, relu_paths
from .attention import multihead_attention, output_projection

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
_ORGANISM_DIR = _PACKAGE_DIR / "organism"
ORGANISM_ARCH = "clipscope-organism"
_LOCAL_DIR = "local-dir:"


@functools.cache
def register_configs() -> None:
    """Register clipscope's model configs (tiny test architectures, the organism) with open_clip, once."""
    import open_clip
    for folder in (_CONFIG_DIR, _ORGANISM_DIR):  # every *.json holding a model config registers by its stem
        open_clip.add_model_config(folder)


def load(name: str, pretrained: str | None, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load an open_clip model by any of the module docstring's name forms (see :func:`clipscope.load`)."""
    if not isinstance(name, str) or not name:
        raise unknown_model(name)
    register_configs()
    if name in ORGANISMS:
        return _organism(name, pretrained, dev, dtype)
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        files = hub.ensure_files(name, repo, [["open_clip_config.json"],
                                              ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]])
        folder = os.path.dirname(files["open_clip_config.json"])
        return _open_clip_model(_LOCAL_DIR + folder, None, dev, dtype, display=name)
    if os.path.isdir(name):
        if not (Path(name) / "open_clip_config.json").is_file():
            raise unknown_model(name, extra=f" The folder {name!r} has no open_clip_config.json.")
        return _open_clip_model(_LOCAL_DIR + str(Path(name).resolve()), None, dev, dtype, display=name)
    if os.path.isfile(name):
        raise hub.UnknownModelError(
            f"{name!r} is a checkpoint file, which does not say which architecture it holds. "
            f"Load it as clipscope.load(ARCH, pretrained={name!r}) with ARCH an open_clip model name "
            "(e.g. 'ViT-B-32'), or put it in a folder with its open_clip_config.json and load the folder.")
    return _load_name(name, pretrained, dev, dtype)


#: The built-in organisms: name -> (open_clip architecture, weights file in the organism folder, --arch).
ORGANISMS = {"organism": (ORGANISM_ARCH, "organism.safetensors", "resnet"),
             "organism-vit": ("clipscope-organism-vit", "organism-vit.safetensors", "vit")}


def _organism(name: str, pretrained: str | None, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    from ..validate import InvalidArgumentError
    if pretrained is not None:
        raise InvalidArgumentError("pretrained", pretrained, f"None: the {name} has one set of weights")
    arch, filename, train_arch = ORGANISMS[name]
    weights = _ORGANISM_DIR / filename
    if not weights.is_file():
        raise hub.WeightsNotAvailableError(
            f"The {name}'s weights are missing from the installed package ({weights}). "
            f"Reinstall clipscope-toolkit, or rebuild them with `python -m clipscope.organism.train --arch {train_arch} "
            f"--out {weights}`.")
    from ..organism import ZERO_SHOT_TEMPLATES
    return _open_clip_model(arch, str(weights), dev, dtype, display=name, default_templates=ZERO_SHOT_TEMPLATES)


def unknown_model(name: Any, extra: str = "") -> hub.UnknownModelError:
    """The error for a model name that matches nothing, with close matches and the valid forms."""
    import open_clip
    register_configs()
    candidates = open_clip.list_models() + list(ORGANISMS)
    return hub.UnknownModelError(
        f"Unknown model {name!r}.{extra}{hub.suggest(str(name), candidates)} Valid forms: 'organism' or "
        "'organism-vit' (built in, offline); an open_clip name (open_clip.list_models()) with pretrained=TAG "
        "(open_clip.list_pretrained()) or a checkpoint path; 'hf-hub:ORG/REPO'; a folder with "
        "open_clip_config.json; 'hf:ORG/REPO' for transformers CLIP models.")


def _load_name(name: str, pretrained: str | None, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    import open_clip
    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise unknown_model(name)
    if pretrained is None:
        if not arch.startswith("clipscope-"):
            warnings.warn(f"{arch} is randomly initialised (pretrained=None).", stacklevel=5)
        return _open_clip_model(arch, None, dev, dtype, display=arch)
    if os.path.isfile(pretrained):
        return _open_clip_model(arch, pretrained, dev, dtype, display=arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))
        what = "no such checkpoint file" if looks_like_path else "unknown pretrained tag"
        raise hub.UnknownModelError(
            f"{what} {pretrained!r} for {arch!r}.{hub.suggest(pretrained, tags)} "
            f"Tags for {arch}: {tags or 'none (load a local file instead)'}.")
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    return _open_clip_model(arch, _pretrained_file(arch, pretrained, cfg), dev, dtype, display=arch, tag=pretrained,
                            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                            image_mean=cfg.get("mean"), image_std=cfg.get("std"),
                            image_interpolation=cfg.get("interpolation"),
                            image_resize_mode=cfg.get("resize_mode"))


def _pretrained_file(arch: str, tag: str, cfg: dict) -> str:
    """The local path of the weights of ``arch`` / ``tag`` (open_clip's pretrained ``cfg``), downloaded if
    missing and reachable; raises :class:`~clipscope.hub.WeightsNotAvailableError` otherwise."""
    display = f"{arch} (pretrained={tag!r})"
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        filename = filename or "open_clip_pytorch_model.bin"
        stem = filename.rsplit(".", 1)[0]
        candidates = ["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else []
        candidates += [stem + ".safetensors", filename]  # safetensors first, as open_clip does
        files = hub.ensure_files(display, repo, [list(dict.fromkeys(candidates))],
                                 load_call=hub.python_call("clipscope.load", arch, pretrained=tag),
                                 local_call=hub.python_call("clipscope.load", arch,
                                                            pretrained="/path/to/weights.safetensors"))
        return next(iter(files.values()))
    path = str(hub.url_cache_path(cfg["url"]))
    if os.path.isfile(path):
        return path
    reason = hub.hub_unreachable_reason()
    if reason is not None:
        raise hub.WeightsNotAvailableError(
            f"The weights for {display} are not cached at {path} and cannot be downloaded "
            f"from {cfg['url']}: {reason}. Download the file on a machine with internet and put it "
            "there, or load a local copy: "
            f"{hub.python_call('clipscope.load', arch, pretrained='/path/to/file')}.")
    from open_clip.pretrained import download_pretrained_from_url
    return download_pretrained_from_url(cfg["url"])


def architecture_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Return ``{name: shape}`` of the tensors of the open_clip architecture ``arch`` (built on the meta
    device: no memory, no weights)."""
    import open_clip
    register_configs()
    with torch.device("meta"), _quiet_root_logger():
        model = open_clip.create_model(arch, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _build(arch: str, checkpoint: str | None, kwargs: dict[str, Any]) -> tuple[nn.Module, Callable]:
    """Return open_clip's model ``arch`` (fp32, on the CPU) and its preprocessing transform, with the weights
    of ``checkpoint`` (a file; for ``local-dir:`` names the folder's weights file).

    Without weights the model is initialised randomly exactly as open_clip does (same seed, same weights).
    With weights, its parameters are built on the meta device (no memory, no initialisation) and the
    checkpoint's tensors, converted by open_clip's ``load_checkpoint``, are then assigned to them: no
    throwaway random weights, no second copy. Buffers are built as usual, so those a checkpoint does not
    hold (the text tower's causal mask) are what open_clip computes. The tensors of a safetensors file
    stay memory-mapped from it (copy-on-write, as transformers keeps them) while the model is fp32 on
    the CPU: a file rewritten in place meanwhile changes them; write new checkpoints to a new file.
    """
    import open_clip
    folder = arch[len(_LOCAL_DIR):] if arch.startswith(_LOCAL_DIR) else None
    if (checkpoint is None and folder is None) or Path(checkpoint or "").suffix in (".npz", ".npy"):
        # open_clip copies big_vision numpy weights into built tensors, so those are built first
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=checkpoint, device="cpu", precision="fp32", weights_only=True,
            require_pretrained=checkpoint is not None, **kwargs)
        return model, preprocess
    with _parameters_on_meta():  # device=None: create_model's `.to(device)` moves nothing
        # no tower's base weights either (a transformers text tower would download and discard them)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, load_weights=False, device=None, precision="fp32", pretrained_image=False,
            pretrained_text=False, **kwargs)
    if checkpoint is None:
        checkpoint = _folder_checkpoint(Path(folder))
        if checkpoint is None:
            raise FileNotFoundError(f"{folder!r} holds no weights file")
    with _assigning_loads(model):
        open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"the checkpoint left {len(on_meta)} tensors without a value: {', '.join(on_meta[:3])}")
    return model, preprocess


#: Weights file names open_clip prefers in a ``local-dir:`` folder, best first (open_clip 3.x factory).
_FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                   "model.pth")


def _folder_checkpoint(folder: Path) -> str | None:
    """The weights file open_clip loads from the ``local-dir:`` ``folder``, or ``None`` if it holds none: the
    first of :data:`_FOLDER_WEIGHTS` present, else the first ``*.safetensors``, ``*.bin`` or ``*.pth`` file by
    name, safetensors first."""
    files = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(pattern))
    preferred = [p for p in files if p.name in _FOLDER_WEIGHTS]
    if preferred:
        return str(min(preferred, key=lambda p: _FOLDER_WEIGHTS.index(p.name)))
    files.sort(key=lambda p: p.suffix != ".safetensors")  # stable: by name within each kind
    return str(files[0]) if files else None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the context, every ``nn.Parameter`` this thread registers is moved to the meta device, so
    the initialisation that follows does nothing; buffers stay where they were made."""
    thread = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != thread:
            return None
        return type(param)(param.to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _assigning_loads(model: nn.Module) -> Iterator[None]:
    """Within the context, ``model.load_state_dict`` assigns the given tensors to the model instead of
    copying them into its (meta) tensors. open_clip's ``load_checkpoint`` converts a checkpoint (a wrapped
    ``state_dict``, ``module.`` prefixes, other formats, resized position embeddings) and then calls it."""
    model.load_state_dict = functools.partial(type(model).load_state_dict, model, assign=True)
    try:
        yield
    finally:
        del model.load_state_dict


def _open_clip_model(arch: str, checkpoint: str | None, dev: torch.device, dtype: torch.dtype, *,
                     display: str, tag: str | None = None,
                     default_templates: Sequence[str] = prompts.DEFAULT_TEMPLATES, **kwargs) -> LoadedModel:
    import open_clip
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        with _quiet_root_logger():  # open_clip logs its own notices on the root logger
            model, preprocess = _build(arch, checkpoint, kwargs)
    except Exception as exc:  # open_clip and torch raise many types for a bad file; one error names it
        if checkpoint is not None:
            raise hub.checkpoint_error(exc, checkpoint, repr(arch), lambda: architecture_shapes(arch)) from None
        if arch.startswith(_LOCAL_DIR):
            raise hub.checkpoint_error(exc, arch[len(_LOCAL_DIR):], "its open_clip_config.json") from None
        raise  # a random initialisation reads no file
    model = model.to(dev, dtype)
    tokenizer = open_clip.get_tokenizer(arch)
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    pp = visual.preprocess_cfg
    towers = [Tower("visual", {"visual": "visual"}, lambda b: model.encode_image(
                  torch.zeros(b, 3, *size, device=dev, dtype=dtype))),
              Tower("text", {"text": "text"} if hasattr(model, "text") else {"": "text."},
                    lambda b: model.encode_text(tokenizer(["a photo"] * b).to(dev)))]
    return LoadedModel(model, preprocess, tokenizer, name=display, pretrained=tag or checkpoint,
                       image_size=tuple(size), image_mean=pp["mean"], image_std=pp["std"], towers=towers,
                       architecture=architecture(model, accept_short_text(model)), backend="open_clip", default_templates=default_templates)


def accept_short_text(model: nn.Module) -> Callable[[torch.Tensor], int] | None:
    """Let ``model.encode_text`` take token ids cut after the batch's last end-of-text token; returns the
    function giving that length for a batch ``(B, context)``, or ``None`` (model unchanged) where a cut
    would not be exact.

    open_clip's ``CLIP`` text tower is causal (position ``i`` attends to ``0..i``) and pools at the
    end-of-text token (the largest id, ``argmax`` pooling), so positions after the batch's last
    end-of-text token cannot change any embedding: for shorter ids the positional embedding and the
    causal mask are cut to match. Ids of the full context length take open_clip's own code path.
    """
    if hasattr(model, "text") or getattr(model, "text_pool_type", None) != "argmax" or model.attn_mask is None:
        return None
    from open_clip.transformer import text_global_pool
    full, context = model.encode_text, model.attn_mask.shape[0]

    def encode_text(text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        length = text.shape[1]
        if length == context:
            return full(text, normalize=normalize)
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, text, "argmax")
        projection = model.text_projection
        x = x if projection is None else projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1) if normalize else x

    model.encode_text = encode_text
    return lambda tokens: int(tokens.argmax(dim=-1).max()) + 1


# ---------------------------------------------------------------------------------------
# What the model's module tree means


def architecture(model: nn.Module, text_tokens_needed: Callable[[torch.Tensor], int] | None) -> "Architecture":
    """Describe an open_clip ``CLIP`` / ``CustomTextCLIP``: blocks, pre-activations, tokens, attention;
    ``text_tokens_needed`` is what :func:`accept_short_text` returned for it. Changes nothing in ``model``."""
    visual = model.visual
    text = getattr(model, "text", model)  # CLIP keeps its text tower's modules at the top level
    blocks = {"visual": (), "text": _transformer_blocks(text, "text")}
    attention = {"visual": (), "text": tuple(f"{b}.attn" for b in blocks["text"])}
    pre: dict[str, str] = {}
    prefix, grid, readout = 0, None, None
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet
        blocks["visual"] = tuple(f"visual.layer{i}" for i in range(1, 5))
        pre = _bottleneck_pre_activations(visual)
        attention["visual"] = ("visual.attnpool",) if getattr(visual, "attnpool", None) is not None else ()
    elif hasattr(visual, "grid_size"):  # VisionTransformer
        blocks["visual"] = _transformer_blocks(visual, "visual")
        attention["visual"] = tuple(f"{b}.attn" for b in blocks["visual"])
        grid = tuple(int(g) for g in visual.grid_size)
        prefix = int(visual.positional_embedding.shape[0]) - grid[0] * grid[1]
        readout = _vit_readout(visual)
    heads = {**_attention_heads(visual, blocks["visual"]), **_attention_heads(text, blocks["text"])}
    return Architecture(blocks=blocks, pre_activations=pre, prefix_tokens=prefix, patch_grid=grid,
                        attention=attention, redirectable=relu_paths(model, "visual"),
                        text_tokens_needed=text_tokens_needed, readout=readout, heads=heads)


def _vit_readout(visual: nn.Module) -> Readout:
    """A ``VisionTransformer``'s readout: ``ln_post`` on every token then the class token (``pool_type='tok'``)
    or the mean of the patch tokens (``'avg'``), or ``ln_post`` after pooling (``final_ln_after_pool``),
    then ``@ proj``. Its attentional pooler and ``pool_type='none'`` are named, not described."""
    if getattr(visual, "attn_pool", None) is not None:
        pool = "attn_pool (open_clip's attentional pooler)"
    else:
        pool = {"tok": "token", "avg": "mean"}.get(visual.pool_type, f"pool_type={visual.pool_type!r}")
    return Readout(pool=pool, norm="visual.ln_post", projection="visual.proj" if visual.proj is not None else None,
                   norm_after_pool=bool(visual.final_ln_after_pool))


def _attention_heads(tower: nn.Module, blocks: tuple[str, ...]) -> dict[str, AttentionHeads]:
    """``{attention site: AttentionHeads}`` for the transformer blocks of ``tower`` (block sites ``blocks``)
    whose attention is an ``nn.MultiheadAttention`` without extra key/value biases (open_clip's
    ``ResidualAttentionBlock``, either batch layout); its MLP starts at ``ln_2``. A block's layer scale
    after the attention (``ls_1``, a ``LayerScale``; the identity without) is folded into its heads'
    results and output projection, so that a head's result is what it adds to the residual stream."""
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None) or ()  # none in a ResNet
    heads = {}
    for name, block in zip(blocks, resblocks):
        attn, scale = getattr(block, "attn", None), getattr(block, "ls_1", None)
        if not (isinstance(attn, nn.MultiheadAttention) and attn.bias_k is None and not attn.add_zero_attn
                and isinstance(getattr(block, "ln_2", None), nn.Module)):
            continue
        forward, projection = multihead_attention, output_projection
        if isinstance(getattr(scale, "gamma", None), nn.Parameter):
            forward = functools.partial(multihead_attention, layer_scale=scale)
            projection = functools.partial(output_projection, layer_scale=scale)
        elif scale is not None and not isinstance(scale, nn.Identity):
            continue  # an unknown module between the attention and the residual stream: no heads declared
        heads[f"{name}.attn"] = AttentionHeads(f"{name}.attn", name, f"{name}.ln_2", attn.num_heads,
                                               forward, projection)
    return heads


def _transformer_blocks(tower: nn.Module, site_prefix: str) -> tuple[str, ...]:
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    return tuple(f"{site_prefix}.transformer.resblocks.{i}" for i in range(len(resblocks or ())))


def _bottleneck_pre_activations(visual: nn.Module) -> dict[str, str]:
    """``{bottleneck or stage: the input to its last ReLU}`` (``<block>.act3.pre``; a stage's is its last
    bottleneck's). A bottleneck that passes its input through unchanged (:func:`_passes_input_through`)
    has its predecessor's: ``relu(x) == x`` there, so its own ``act3.pre`` is never negative."""
    pre: dict[str, str] = {}
    for i in range(1, 5):
        stage = f"visual.layer{i}"
        for j, block in enumerate(getattr(visual, f"layer{i}")):
            if not isinstance(getattr(block, "act3", None), nn.ReLU):
                continue
            own = f"{stage}.{j}.act3.pre"
            pre[f"{stage}.{j}"] = pre[stage] = pre.get(stage, own) if j and _passes_input_through(block) else own
    return pre


def _passes_input_through(block: nn.Module) -> bool:
    """Whether a bottleneck returns its input: no downsampling and a residual branch that is exactly 0
    (its last batch norm's scale and shift all zero, as open_clip initialises them). Its input is the
    previous bottleneck's ReLU output, so ``relu(input + 0) == input``."""
    bn3 = getattr(block, "bn3", None)
    return (getattr(block, "downsample", None) is None and isinstance(bn3, nn.BatchNorm2d) and bn3.affine
            and not bool(bn3.weight.any()) and not bool(bn3.bias.any()))
