"""Train the clipscope model organism from scratch on CPU.

    python -m clipscope.organism.train --out clipscope/organism/organism.safetensors [--seed 0 --steps 1500 --batch-size 192]

Data are generated on the fly by :mod:`clipscope.organism.scenes`: batch ``b`` is scenes
``b*B .. (b+1)*B-1`` of the stream with the training seed, so the data order is fixed and the
run is deterministic given ``--seed`` (and the thread count).  The loss is open_clip's
``ClipLoss``.  Writes the safetensors state dict to ``--out`` and a JSON with the training
settings and wall time next to it (same stem, ``.json``).
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

import numpy as np
import torch

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clipscope-organism.json")
MODEL_NAME = "clipscope-organism"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def register_config() -> None:
    import open_clip
    open_clip.add_model_config(CONFIG_PATH)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images already at the model resolution -> normalised float tensor (same as the val transform)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


class SceneBatches(torch.utils.data.Dataset):
    """Batch ``b`` = scenes b*B..(b+1)*B-1 of the seeded stream, as (images, tokens)."""

    def __init__(self, seed: int, batch_size: int, n_batches: int, context_length: int, scene_config=None):
        from .scenes import SceneConfig
        self.seed, self.batch_size, self.n_batches = seed, batch_size, n_batches
        self.context_length = context_length
        self.scene_config = scene_config or SceneConfig()
        self._tok = None
        self._cache = {}

    def __len__(self):
        return self.n_batches

    def _tokens(self, captions):
        if self._tok is None:
            import open_clip
            self._tok = open_clip.get_tokenizer(MODEL_NAME) if MODEL_NAME in open_clip.list_models() else None
            if self._tok is None:
                register_config()
                self._tok = open_clip.get_tokenizer(MODEL_NAME)
        missing = [c for c in set(captions) if c not in self._cache]
        if missing:
            toks = self._tok(missing, context_length=self.context_length)
            for c, t in zip(missing, toks):
                self._cache[c] = t
        return torch.stack([self._cache[c] for c in captions])

    def __getitem__(self, b):
        from .scenes import generate
        scenes = list(generate(self.batch_size, seed=self.seed, config=self.scene_config, start=b * self.batch_size))
        return images_to_tensor([s.image for s in scenes]), self._tokens([s.caption for s in scenes])


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=1, help="data-generation worker processes (0 = in process)")
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    import open_clip
    from safetensors.torch import save_file
    from .scenes import SceneConfig

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    register_config()
    model = open_clip.create_model(MODEL_NAME)
    model.train()
    ctx = model.context_length
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[organism] {MODEL_NAME}: {n_params:,} parameters; steps={args.steps} batch={args.batch_size} "
          f"lr={args.lr} threads={args.threads} seed={args.seed}", flush=True)

    scene_config = SceneConfig()
    data = SceneBatches(args.seed, args.batch_size, args.steps, ctx, scene_config)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers > 0 else None,
                                         persistent_workers=False)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * args.lr * (1 + math.cos(math.pi * p))

    t0 = time.time()
    history = []
    running = None
    for step, (images, tokens) in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        lv = loss.item()
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            el = time.time() - t0
            rate = (step + 1) / el
            eta = (args.steps - step - 1) / rate
            print(f"[organism] step {step + 1:5d}/{args.steps} loss {lv:.3f} (ema {running:.3f}) "
                  f"lr {lr_at(step):.2e} scale {model.logit_scale.exp().item():.1f} "
                  f"{rate:.2f} it/s elapsed {el / 60:.1f}m eta {eta / 60:.1f}m", flush=True)
            history.append({"step": step + 1, "loss": lv, "loss_ema": running, "elapsed_s": round(el, 1)})
    wall = time.time() - t0

    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    save_file(state, args.out, metadata={"model": MODEL_NAME, "seed": str(args.seed), "steps": str(args.steps)})
    info = {
        "model": MODEL_NAME,
        "config": json.load(open(CONFIG_PATH)),
        "n_parameters": n_params,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "samples_seen": args.steps * args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), cosine schedule, logit_scale clamped to 100",
        "loss": "open_clip.loss.ClipLoss",
        "threads": args.threads,
        "workers": args.workers,
        "scene_config": scene_config.to_dict(),
        "wall_time_s": round(wall, 1),
        "final_loss_ema": running,
        "loss_history": history,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "command": " ".join(["python -m clipscope.organism.train"] + (sys.argv[1:] if argv is None else list(argv))),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
    print(f"[organism] done in {wall / 60:.1f} min -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
