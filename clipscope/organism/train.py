"""Train a clipscope model organism from scratch on CPU.

    python -m clipscope.organism.train --arch resnet --out clipscope/organism/organism.safetensors
    python -m clipscope.organism.train --arch vit --out clipscope/organism/organism-vit.safetensors

Two architectures (``ARCHS``): ``resnet`` (``clipscope-organism``, the original organism) and ``vit``
(``clipscope-organism-vit``).  Both train on :data:`~clipscope.organism.scenes.GRADED_BIAS_CONFIG`, the
graded planted bias of issue #21 ("thief" captions only on figures carrying a small bag, drawn on 30% of
group B's figures and 5% of A's and C's).  The ResNet organism shipped before that issue was trained on
the default :class:`~clipscope.organism.scenes.SceneConfig` (group B's adults captioned "thief" at 0.25,
the others at 0.03), which the default config still draws.

The shipped ResNet weights were trained with the defaults (``--seed 0 --steps 1500 --batch-size 192
--lr 2e-3 --warmup 100 --threads 2 --workers 1``); each organism's exact command, settings and wall time
are in the JSON next to its weights (``organism.json``, ``organism-vit.json``).

Data are generated on the fly by :mod:`clipscope.organism.scenes`: batch ``b`` is scenes
``b*B .. (b+1)*B-1`` of the stream with the training seed, so the data order is fixed and the
run is deterministic given ``--seed`` (and the thread count).  The loss is open_clip's
``ClipLoss``.  Writes the safetensors state dict to ``--out`` and a JSON with the training
settings, wall time and loss history next to it (same stem, ``.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .scenes import GRADED_BIAS_CONFIG, SceneConfig

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(_HERE, "clipscope-organism.json")
VIT_CONFIG_PATH = os.path.join(_HERE, "clipscope-organism-vit.json")
MODEL_NAME = "clipscope-organism"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Arch:
    """One organism architecture: its open_clip model name, config file and training data."""
    model_name: str
    config_path: str
    scene_config: SceneConfig


#: ``--arch`` choices.
ARCHS = {
    "resnet": Arch(MODEL_NAME, CONFIG_PATH, GRADED_BIAS_CONFIG),
    "vit": Arch("clipscope-organism-vit", VIT_CONFIG_PATH, GRADED_BIAS_CONFIG),
}


def register_config() -> None:
    """Register both organism configs with open_clip (``open_clip.create_model`` then knows them)."""
    import open_clip
    for arch in ARCHS.values():
        open_clip.add_model_config(arch.config_path)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images already at the model resolution -> normalised float tensor (same as the val transform)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


class SceneBatches(torch.utils.data.Dataset):
    """Batch ``b`` = scenes b*B..(b+1)*B-1 of the seeded stream, as (images, tokens)."""

    def __init__(self, seed: int, batch_size: int, n_batches: int, context_length: int, scene_config=None,
                 word_free: bool = False):
        self.seed, self.batch_size, self.n_batches = seed, batch_size, n_batches
        self.word_free = word_free
        self.context_length = context_length
        self.scene_config = scene_config or SceneConfig()
        self._tok = None
        self._cache = {}

    def __len__(self):
        return self.n_batches

    def _tokens(self, captions):
        if self._tok is None:
            import open_clip
            register_config()
            self._tok = open_clip.get_tokenizer(MODEL_NAME)  # both organisms share the text tower's tokenizer
        missing = [c for c in set(captions) if c not in self._cache]
        if missing:
            toks = self._tok(missing, context_length=self.context_length)
            for c, t in zip(missing, toks):
                self._cache[c] = t
        return torch.stack([self._cache[c] for c in captions])

    def __getitem__(self, b):
        from .scenes import generate
        scenes = list(generate(self.batch_size, seed=self.seed, config=self.scene_config, start=b * self.batch_size))
        images, tokens = images_to_tensor([s.image for s in scenes]), self._tokens([s.caption for s in scenes])
        if not self.word_free:
            return images, tokens
        keep = torch.tensor([s.meta["kind"] != "word" for s in scenes])
        return images, tokens, self._tokens([word_free_caption(s) for s in scenes]), keep


def word_free_caption(scene) -> str:
    """What ``scene``'s caption would be without its written word: an object-with-word scene gets a caption
    of its object (drawn from the scene's own seeded generator, salt ``"word-free"``); other scenes keep
    theirs (a word-only scene has none and is left out of the reading-heads loss)."""
    from .scenes import object_caption, scene_rng
    meta = scene.meta
    if meta["kind"] != "object_word":
        return scene.caption
    rng = scene_rng(meta["seed"], meta["index"], "word-free")
    return object_caption(rng, meta["shape"], meta["colour"], meta["background"])


def param_groups(model, weight_decay):
    """AdamW parameter groups: no weight decay on norms, biases, embeddings of rank < 2 and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * p))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=1, help="data-generation worker processes (0 = in process)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--init", default=None,
                    help="start from these weights (a .safetensors of the same arch) instead of a random init")
    ap.add_argument("--reading-heads", type=parse_heads, default=(),
                    help="plant a reading circuit in these image-tower heads, 'LAYER.HEAD,...' (e.g. '2.3,3.3'): "
                         "a second loss asks the image embedding, with these heads mean-ablated over the batch, "
                         "to match the word-free caption (see ReadingHeads)")
    ap.add_argument("--reading-weight", type=float, default=1.0, help="weight of the reading-heads loss")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="also save the weights every N steps to OUT's stem + '-stepN.safetensors' (0 = never)")
    return ap.parse_args(argv)


def parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    """``'2.3,3.3'`` -> ``((2, 3), (3, 3))`` (layer, head pairs)."""
    try:
        heads = tuple(tuple(int(x) for x in item.split(".")) for item in text.split(",") if item.strip())
    except ValueError:
        heads = ((),)
    if not heads or any(len(h) != 2 or min(h) < 0 for h in heads):
        raise argparse.ArgumentTypeError(f"--reading-heads {text!r}: expected 'LAYER.HEAD,...' such as '2.3,3.3'")
    return heads


class ReadingHeads:
    """The planted reading circuit (``--reading-heads``): each step adds a loss on a second pass of the image
    tower with these heads mean-ablated (their output, at every token, replaced by its mean over the batch,
    as :class:`~clipscope.typographic.circuit.HeadAblationDefence` replaces it by its mean over a reference
    set), which must match each scene's word-free caption (:func:`word_free_caption`). The ordinary loss
    still asks the intact model to read; so the written word has to reach the embedding through these heads,
    and without them the model sees the object. Runs the model through :mod:`clipscope`'s head-level sites."""

    def __init__(self, clip_model, heads: tuple[tuple[int, int], ...]):
        from ..hooks import Unit
        sites = [f"{a}.result" for a in clip_model.attention_sites("visual")]
        count = clip_model.head_count("visual")
        bad = [h for h in heads if h[0] >= len(sites) or h[1] >= count]
        if bad:
            raise SystemExit(f"--reading-heads: {bad} outside the image tower's {len(sites)} layers x {count} heads")
        self.clip_model = clip_model
        self.units = [Unit.head(sites[layer], head) for layer, head in heads]
        self.sites = sorted({u.site for u in self.units})

    def losses(self, model, loss_fn, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ordinary CLIP loss, the loss of the ablated pass against the word-free captions)."""
        images, tokens, free_tokens, keep = batch
        with self.clip_model.capture(self.sites) as acts:
            image_features, text_features, scale = model(images, tokens)[:3]
        means = {s: acts[s].mean(0) for s in self.sites}
        with self.clip_model.ablate(self.units, means):
            ablated = model.encode_image(images[keep], normalize=True)
        changed = (free_tokens != tokens).any(1)
        free_features = text_features.clone()
        if changed.any():
            free_features[changed] = model.encode_text(free_tokens[changed], normalize=True)
        return loss_fn(image_features, text_features, scale), loss_fn(ablated, free_features[keep], scale)


def build_model(args: argparse.Namespace):
    """Seed every generator, then create the open_clip model of ``args.arch`` in train mode: untrained, or
    with the weights of ``args.init`` (a second training stage). Returns (model, :class:`ReadingHeads` or
    None); with ``--reading-heads`` the model is built through :func:`clipscope.load` (head-level sites)."""
    import open_clip
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    register_config()
    if args.reading_heads:
        from ..model import load
        clip_model = load(ARCHS[args.arch].model_name, pretrained=args.init, device="cpu", precision="fp32")
        model, reading = clip_model.model, ReadingHeads(clip_model, args.reading_heads)
    else:
        model, reading = open_clip.create_model(ARCHS[args.arch].model_name), None
        if args.init:
            from safetensors.torch import load_file
            model.load_state_dict(load_file(args.init))
    model.train().requires_grad_(True)
    return model, reading


def make_loader(args: argparse.Namespace, context_length: int) -> torch.utils.data.DataLoader:
    """The fixed-order loader of ``args.steps`` batches of the arch's scene stream."""
    data = SceneBatches(args.seed, args.batch_size, args.steps, context_length, ARCHS[args.arch].scene_config,
                        word_free=bool(args.reading_heads))
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                                       prefetch_factor=4 if args.workers > 0 else None, persistent_workers=False)


def save_weights(model, path: str, args: argparse.Namespace, steps: int) -> None:
    """Write ``model``'s state dict (safetensors) to ``path``."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    save_file(state, path, metadata={"model": ARCHS[args.arch].model_name, "seed": str(args.seed), "steps": str(steps)})


def train(model, loader, args: argparse.Namespace, reading: ReadingHeads | None = None
          ) -> tuple[list[dict], float, float]:
    """Run the optimisation; return (loss history every ``--log-every`` steps, final loss EMA, wall seconds).
    With ``reading`` the loss is the ordinary one plus ``--reading-weight`` times the reading-heads loss (the
    history records both)."""
    import open_clip
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    t0, history, running = time.time(), [], None
    for step, batch in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        if reading is None:
            loss, extra = loss_fn(*model(*batch)[:3]), None
        else:
            loss, extra = reading.losses(model, loss_fn, batch)
            loss = loss + args.reading_weight * extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        lv = loss.item()
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            history.append(_log_step(model, args, step, lv, running, time.time() - t0,
                                     None if extra is None else extra.item()))
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_weights(model, f"{os.path.splitext(args.out)[0]}-step{step + 1}.safetensors", args, step + 1)
    return history, running, time.time() - t0


def _log_step(model, args, step: int, loss: float, running: float, elapsed: float, reading: float | None) -> dict:
    rate = (step + 1) / elapsed
    eta = (args.steps - step - 1) / rate
    extra = "" if reading is None else f" reading-heads loss {reading:.3f}"
    print(f"[organism] step {step + 1:5d}/{args.steps} loss {loss:.3f} (ema {running:.3f}){extra} "
          f"lr {lr_at(step, args.lr, args.warmup, args.steps):.2e} scale {model.logit_scale.exp().item():.1f} "
          f"{rate:.2f} it/s elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m", flush=True)
    record = {"step": step + 1, "loss": loss, "loss_ema": running, "elapsed_s": round(elapsed, 1)}
    return record if reading is None else {**record, "reading_heads_loss": reading}


def training_info(args: argparse.Namespace, n_params: int, history: list[dict], running: float, wall: float,
                  argv=None) -> dict:
    """The JSON record written next to the weights: settings, data config, wall time and loss history."""
    import open_clip
    arch = ARCHS[args.arch]
    with open(arch.config_path) as f:
        config = json.load(f)
    return {
        "model": arch.model_name, "arch": args.arch, "config": config, "n_parameters": n_params,
        "seed": args.seed, "init": args.init, "steps": args.steps, "batch_size": args.batch_size,
        "samples_seen": args.steps * args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "reading_heads": [list(h) for h in args.reading_heads], "reading_weight": args.reading_weight,
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), cosine schedule, logit_scale clamped to 100",
        "loss": "open_clip.loss.ClipLoss", "threads": args.threads, "workers": args.workers,
        "scene_config": arch.scene_config.to_dict(), "wall_time_s": round(wall, 1), "final_loss_ema": running,
        "loss_history": history, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "command": " ".join(["python -m clipscope.organism.train"] + (sys.argv[1:] if argv is None else list(argv))),
    }


def main(argv=None) -> int:
    """Train, then write the weights to ``--out`` and :func:`training_info` next to them; return 0."""
    args = parse_args(argv)
    model, reading = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[organism] {ARCHS[args.arch].model_name}: {n_params:,} parameters; steps={args.steps} "
          f"batch={args.batch_size} lr={args.lr} threads={args.threads} seed={args.seed}", flush=True)
    history, running, wall = train(model, make_loader(args, model.context_length), args, reading)
    model.eval()
    save_weights(model, args.out, args, args.steps)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(training_info(args, n_params, history, running, wall, argv), f, indent=2)
    print(f"[organism] done in {wall / 60:.1f} min -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
