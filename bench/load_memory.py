"""Loading a checkpoint: peak memory and time, open_clip's own path against clipscope's, side by side.

Writes random-weight checkpoints to a temporary folder (open_clip models as ``.safetensors`` and
``.pt``; a ViT-B/32-sized transformers ``CLIPModel`` folder), then loads each one in a fresh Python
process per arm:

- *old*: what clipscope did before: ``open_clip.create_model_and_transforms(arch, pretrained=FILE)``
  (a random initialisation, then the checkpoint copied into it) and ``.to(device, dtype)``; for the
  transformers folder ``CLIPModel.from_pretrained(folder)``;
- *new*: ``clipscope.load(...)``: the module built on the meta device and the checkpoint's tensors
  assigned to it (transformers already builds on meta itself).

Each process first imports everything, then measures. ``peak/size`` is the peak resident set size
above that post-import baseline (the peak is reset after the imports, through Linux's
``/proc/self/clear_refs``) divided by the bytes of the loaded model's tensors (1.0 would be no
overhead at all); it is taken after every weight was read once, so memory-mapped weights count.
``load s`` is the time until the load returns, ``+read s`` the time to also read every weight once
(a memory-mapped load defers its reading to first use).

    python bench/load_memory.py [--models RN50 ViT-B-32 ViT-L-14] [--no-hf] [--repeats 1]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def resident_bytes() -> int:
    """This process's resident set size now, in bytes (psutil when installed, else /proc)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Make the peak resident set size the current one (Linux: ``/proc/self/clear_refs``); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """This process's peak resident set size since :func:`reset_peak`, in bytes (``VmHWM``; without /proc
    ``ru_maxrss``, the peak since the start, KiB on Linux and bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            line = next(line for line in fh if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def tensor_bytes(module) -> int:
    """Bytes held by the distinct storages of ``module``'s parameters and buffers."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(storages.values())


def read_all(module) -> float:
    """Read every tensor of ``module`` once (a sum), so that memory-mapped weights become resident."""
    import torch
    with torch.no_grad():
        return float(sum(t.float().sum() for t in [*module.parameters(), *module.buffers()]))


def measure(arm: str, kind: str, arch: str, path: str) -> dict:
    """Load ``path`` by ``arm`` in this process; return the figures (run in a fresh process)."""
    import open_clip
    import torch

    import clipscope
    from clipscope.backends import open_clip as open_clip_backend
    warnings.simplefilter("ignore")
    if kind == "hf":  # imported before the baseline, as open_clip is
        import transformers

        from clipscope.backends import transformers as transformers_backend  # noqa: F401
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    open_clip_backend.register_configs()
    gc.collect()
    baseline = resident_bytes()
    if not reset_peak():  # then imports' own peak may hide the load's
        print("note: cannot reset the peak RSS here; figures are upper bounds", file=sys.stderr)
    start = time.perf_counter()
    if arm == "new":
        name = f"hf:{path}" if kind == "hf" else arch
        module = clipscope.load(name, pretrained=None if kind == "hf" else path, device="cpu",
                                precision="fp32").model
    elif kind == "hf":
        module = transformers.CLIPModel.from_pretrained(path).to("cpu", torch.float32)
    else:
        module = open_clip.create_model_and_transforms(arch, pretrained=path, device="cpu",
                                                       precision="fp32")[0].to("cpu", torch.float32)
    loaded = time.perf_counter() - start
    read_all(module)
    read = time.perf_counter() - start
    return {"peak": peak_bytes() - baseline, "size": tensor_bytes(module), "load_s": loaded, "read_s": read}


def write_checkpoints(models: list[str], hf: bool, folder: Path) -> list[tuple[str, str, str]]:
    """Write random-weight checkpoints to ``folder``; return ``(kind, arch, path)`` for each."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" notice
    jobs = []
    for arch in models:
        state = open_clip.create_model(arch).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{arch}.safetensors"))
        torch.save(state, folder / f"{arch}.pt")
        jobs += [("safetensors", arch, str(folder / f"{arch}.safetensors")), ("pt", arch, str(folder / f"{arch}.pt"))]
        del state
    if hf:
        jobs.append(("hf", "ViT-B-32", str(write_transformers_folder(folder / "hf-vit-b-32"))))
    return jobs


def write_transformers_folder(folder: Path) -> Path:
    """A ViT-B/32-sized transformers CLIP folder: random weights, a real CLIP tokenizer (open_clip's vocabulary)."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.CLIPModel(transformers.CLIPConfig(projection_dim=512)).save_pretrained(folder)
    simple = SimpleTokenizer()
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in simple.encoder.items()}
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "do_center_crop": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3}))
    return folder


def run_arm(arm: str, kind: str, arch: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", arm, kind, arch, path],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{arm} {kind} {arch} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["RN50", "ViT-B-32"])
    parser.add_argument("--no-hf", action="store_true", help="leave out the transformers folder")
    parser.add_argument("--repeats", type=int, default=1, help="processes per arm (medians; arms interleaved)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="clipscope-load-") as tmp:
        hf = not args.no_hf and importlib.util.find_spec("transformers") is not None
        jobs = write_checkpoints(args.models, hf, Path(tmp))
        print(f"{'model':10} {'file':12} {'size MB':>8} | {'old peak/size':>13} {'load s':>7} {'+read s':>8} | "
              f"{'new peak/size':>13} {'load s':>7} {'+read s':>8}")
        for kind, arch, path in jobs:
            runs = {"old": [], "new": []}
            for _ in range(args.repeats):
                for arm in runs:
                    runs[arm].append(run_arm(arm, kind, arch, path))
            cells = []
            for arm, results in runs.items():
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                cells.append(f"{med['peak'] / med['size']:13.2f} {med['load_s']:7.2f} {med['read_s']:8.2f}")
            size = statistics.median(r["size"] for r in runs["new"]) / 1e6
            print(f"{arch:10} {kind:12} {size:8.0f} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
