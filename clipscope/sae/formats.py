"""Loading SAEs saved by the common public libraries, from local files, without unpickling anything.

:func:`load_sae` recognizes, from what a path holds:

- **clipscope**: a folder with ``sae.json`` + ``sae.safetensors`` (:meth:`SparseAutoencoder.save`);
- **SAELens** and **ViT-Prisma** (which saves in SAELens' layout): a folder with ``cfg.json`` (or ``config.json``)
  and ``sae_weights.safetensors`` (or one other ``*.safetensors``), tensors ``W_enc (d_in, d_sae)``,
  ``W_dec (d_sae, d_in)``, ``b_enc``, ``b_dec``; the site from the config's ``hook_name`` / ``hook_point``
  (TransformerLens-style names such as ``blocks.9.hook_resid_post``);
- **saev**: a JSON header (the first line of saev's checkpoint) in a ``.json`` file beside the state dict in
  safetensors. saev's own ``.pt`` file is a JSON line followed by a PyTorch pickle: it is refused with the
  three lines that convert it, to run once where the file is trusted.

Library hook names map onto clipscope's names for open_clip ViTs (:data:`HOOK_SITES`); with ``model`` the
mapping uses that model's blocks and the site's width is checked. Anything else needs ``site=``.
Encoders that do not subtract ``b_dec`` before encoding (SAELens with ``apply_b_dec_to_input=false``; the
``encode`` of saev's latest ``nn/modeling.py``, ``load_sae(..., saev_subtract_b_dec=False)``) are converted
exactly by moving ``b_dec @ W_enc`` into ``b_enc``; saev's earlier releases encode ``x - b_dec`` (the default).
saev trains on activations it may have rescaled (its data options): an SAE from such a run needs its inputs
scaled the same way (``sae.input_scale``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from clipscope.sae.autoencoder import CONFIG_NAME, SparseAutoencoder, read_tensors
from clipscope.validate import InvalidArgumentError

__all__ = ["HOOK_SITES", "load_sae", "site_for_hook"]

#: TransformerLens / ViT-Prisma hook name suffix of block ``l`` -> clipscope site under that block
HOOK_SITES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp",
    "hook_attn_out": "attn",
    "mlp.hook_pre": "mlp.c_fc",
    "mlp.hook_post": "mlp.gelu",
}
OPEN_CLIP_BLOCK = "visual.transformer.resblocks.{}"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
CONVERT_SAEV = ("import io, json, torch, safetensors.torch\n"
                "with open('{path}', 'rb') as fd: header = fd.readline(); state = torch.load(io.BytesIO(fd.read()), "
                "weights_only=True)\n"
                "open('{stem}.json', 'wb').write(header); safetensors.torch.save_file(state, '{stem}.safetensors')")


def site_for_hook(hook: str, model=None) -> str:
    """The clipscope site of a TransformerLens-style image-tower hook name (``blocks.9.hook_resid_post`` ->
    ``visual.transformer.resblocks.9.resid_post``); with ``model``, its blocks and sites. Unknown names raise
    :class:`InvalidArgumentError` saying to pass ``site=``."""
    match = re.fullmatch(r"(?:visual\.|vision_model\.)?blocks\.(\d+)\.(.+)", hook or "")
    suffix = match and HOOK_SITES.get(match.group(2))
    if not suffix:
        raise InvalidArgumentError("site", None, f"a clipscope site name: the hook {hook!r} has no known clipscope "
                                                 f"site (known: blocks.L.{{{', '.join(HOOK_SITES)}}}); pass site=")
    layer = int(match.group(1))
    if model is None:
        return f"{OPEN_CLIP_BLOCK.format(layer)}.{suffix}"
    blocks = model.blocks("visual")
    if layer >= len(blocks):
        raise InvalidArgumentError("site", None, f"a clipscope site name: {hook!r} names block {layer} but the "
                                                 f"image tower has {len(blocks)}; pass site=")
    if suffix == "mlp.gelu":   # the MLP's activation, whatever its module is called
        names = [s.name for s in model.layers().filter(tower="visual") if s.name.startswith(f"{blocks[layer]}.mlp.")]
        return next((n for n in names if "GELU" in model.site(n).module_type or n.endswith((".gelu", ".act"))),
                    f"{blocks[layer]}.{suffix}")
    return f"{blocks[layer]}.{suffix}"


def load_sae(path: str | os.PathLike, site: str | None = None, *, model=None,
             saev_subtract_b_dec: bool = True) -> SparseAutoencoder:
    """Read an SAE from ``path`` (a folder, or a saev file) in any format this module knows; on the CPU, float32.

    ``site`` overrides the site derived from the file's hook name (required where the file names none or one
    clipscope cannot map). With ``model`` the site is checked to exist and to have the SAE's width.
    Only safetensors and JSON are read: pickles are refused with how to convert them.
    ``saev_subtract_b_dec``: whether a saev SAE encodes ``x - b_dec`` (saev's ``forward`` in every release
    with a ``forward`` that encodes, "as per Anthropic") or ``x`` (the ``encode`` method of its latest
    ``nn/modeling.py``); set it to how the saev version that trained the file encodes.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidArgumentError("path", str(path), "an existing local file or folder")
    if path.is_file():
        sae = _load_saev_file(path, site, saev_subtract_b_dec)
    elif (path / CONFIG_NAME).is_file():
        sae = SparseAutoencoder.load(path)
        sae.site = site or sae.site
    elif _config_file(path) is not None:
        sae = _load_saelens(path, site, model)
    elif any(p.suffix == ".json" for p in path.iterdir()):
        sae = _load_saev_file(next(p for p in sorted(path.iterdir()) if p.suffix == ".json"), site,
                              saev_subtract_b_dec)
    else:
        raise InvalidArgumentError("path", str(path), "a folder holding an SAE: sae.json (clipscope), cfg.json or "
                                                      "config.json (SAELens, ViT-Prisma) or a saev header .json, "
                                                      "each with its .safetensors weights")
    if model is not None:
        info = model.site(sae.site)
        if info.n_units != sae.d_in:
            raise InvalidArgumentError("site", sae.site, f"a site with {sae.d_in} units, the SAE's input width "
                                                         f"(this one has {info.n_units})")
    return sae


def _config_file(folder: Path) -> Path | None:
    return next((folder / name for name in ("cfg.json", "config.json") if (folder / name).is_file()), None)


def _weights_file(folder: Path, preferred: str) -> Path:
    if (folder / preferred).is_file():
        return folder / preferred
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
        hint = (f"; {', '.join(pickles)} is a PyTorch pickle, which clipscope does not read: convert it once where "
                f"you trust it (safetensors.torch.save_file(torch.load(f, weights_only=True), "
                f"'{preferred}'))") if pickles else ""
        raise InvalidArgumentError("path", str(folder), f"a folder with {preferred} (or one *.safetensors file){hint}")
    return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("path", str(path), f"a readable JSON file ({exc})") from exc
    if not isinstance(value, dict):
        raise InvalidArgumentError("path", str(path), "a JSON object")
    return value


def _load_saelens(folder: Path, site: str | None, model) -> SparseAutoencoder:
    """SAELens / ViT-Prisma: ``cfg.json`` + ``sae_weights.safetensors``."""
    cfg = _read_json(_config_file(folder))
    architecture = cfg.get("architecture", "standard")
    activation = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or
                     ("topk" if architecture == "topk" else "relu")).lower()
    if architecture not in ("standard", "topk") or activation not in ("relu", "topk"):
        raise InvalidArgumentError("path", str(folder), f"a standard (ReLU) or TopK SAE; this one is {architecture} "
                                                        f"with activation {activation!r}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise InvalidArgumentError("path", str(folder), f"an SAE without input normalization (normalize_activations="
                                                        f"{norm!r} needs a scale the file does not hold)")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    tensors = read_tensors(_weights_file(folder, "sae_weights.safetensors"), TENSORS, parameter="path")
    hook = cfg.get("hook_name") or cfg.get("hook_point")
    tokens = "class" if cfg.get("cls_token_only") else "patches" if cfg.get("use_patches_only") else "all"
    return _build(tensors, site or site_for_hook(hook, model), "topk" if activation == "topk" else "relu", k,
                  tokens, subtract_b_dec=cfg.get("apply_b_dec_to_input", True), where=folder)


def _load_saev_file(path: Path, site: str | None, subtract_b_dec: bool) -> SparseAutoencoder:
    """saev: a JSON header (``.json``) beside its safetensors state dict; saev's own pickled file is refused."""
    if path.suffix != ".json":
        with open(path, "rb") as fd:
            first = fd.readline(1 << 20)
        try:
            json.loads(first)
        except ValueError:
            raise InvalidArgumentError("path", str(path), "an SAE folder or a saev header .json") from None
        stem = path.with_suffix("")
        raise InvalidArgumentError("path", str(path), "safetensors weights: this saev checkpoint holds a PyTorch "
                                                      "pickle after its JSON header, which clipscope does not read. "
                                                      "Convert it once, where you trust the file:\n" +
                                   CONVERT_SAEV.format(path=path, stem=stem) +
                                   f"\nthen load_sae('{stem}.json', site=...)")
    header = _read_json(path)
    cfg = header.get("cfg", header)
    activation = cfg.get("activation", {"cls": header.get("cls", "Relu")})
    kind = (activation.get("cls") if isinstance(activation, dict) else str(activation)) or "Relu"
    if kind not in ("Relu", "TopK"):
        raise InvalidArgumentError("path", str(path), f"a saev Relu or TopK SAE (this one is {kind})")
    params = activation.get("params", {}) if isinstance(activation, dict) else {}
    k = params.get("top_k", cfg.get("top_k")) if kind == "TopK" else None
    if site is None:
        raise InvalidArgumentError("site", None, "a clipscope site name: saev files do not say which layer they "
                                                 "read; pass site= (e.g. 'visual.transformer.resblocks.10.resid_post')")
    tensors = read_tensors(path.with_suffix(".safetensors"), TENSORS, parameter="path")
    return _build(tensors, site, "topk" if kind == "TopK" else "relu", k, "all", subtract_b_dec=subtract_b_dec,
                  where=path)


def _build(tensors: dict[str, torch.Tensor], site: str, activation: str, k: int | None, tokens: str, *,
           subtract_b_dec: bool, where: Path) -> SparseAutoencoder:
    """A :class:`SparseAutoencoder` holding ``tensors``; an encoder that reads ``x`` rather than ``x - b_dec``
    gets ``b_dec @ W_enc`` added to ``b_enc`` (the same pre-activations)."""
    tensors = {name: t.float() for name, t in tensors.items()}
    d_in, n_features = tensors["W_enc"].shape
    if activation == "topk" and k is None:
        raise InvalidArgumentError("path", str(where), "a TopK config that gives k")
    sae = SparseAutoencoder(site, d_in, n_features, activation=activation, k=k if activation == "topk" else None,
                            tokens=tokens)
    if not subtract_b_dec:
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    sae.load_tensors(tensors, where=str(where))
    return sae
