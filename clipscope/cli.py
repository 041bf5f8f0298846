"""The ``clipscope`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="organism",
                        help="model name: 'organism' (default, offline), an open_clip name, 'hf-hub:ORG/REPO', "
                             "'hf:ORG/REPO' or a local folder")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")


def _load(args):
    import clipscope
    return clipscope.load(args.model, pretrained=args.pretrained, device=args.device)


def cmd_score(args) -> int:
    from .scoring import score
    results = score(args.request, _load(args), batch_size=args.batch_size)
    text = json.dumps(results, indent=2)
    if args.output:
        from .io import write_text_atomic
        write_text_atomic(args.output, text)
        bad = sum(1 for r in results if "error" in r)
        print(f"scored {len(results) - bad} row(s), {bad} bad row(s) -> {args.output}")
    else:
        print(text)
    return 0


def cmd_layers(args) -> int:
    layers = _load(args).layers()
    if args.tower:
        layers = layers.filter(tower=args.tower)
    print(layers)
    return 0


def cmd_attack(args) -> int:
    import yaml

    from .typographic.run import run_attack_config
    config = {}
    if args.config:
        with open(args.config) as fh:
            config = yaml.safe_load(fh) or {}
    data = dict(config.get("data") or {})
    if args.folder:
        data["path"] = args.folder
    if args.format:
        data["format"] = args.format
    config["data"] = data
    attack = dict(config.get("attack") or {})
    for key in ("target", "size", "position", "colour", "opacity"):
        if getattr(args, key) is not None:
            attack[key] = getattr(args, key)
    config["attack"] = attack
    if args.classes:
        config["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.sweep:
        name, _, values = args.sweep.partition("=")
        config["sweep"] = {name: [_number(v) for v in values.split(",")]}
    if args.defence:
        config["defences"] = args.defence
    if args.out:
        config["out"] = args.out
    for key in ("model", "pretrained"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    index = run_attack_config(config)
    print(f"report: {index.resolve()}")
    return 0


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def cmd_audit(args) -> int:
    from .audit.run import cli_audit
    return cli_audit(args.spec, args.out)


def _unit_list(text: str) -> list[int]:
    """``"0-7"``, ``"3,17,42"`` or a mix (``"0-3,9"``) as a list of ints."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(part)])
        except ValueError:
            raise ValueError(f"--units: cannot read {part!r}; use e.g. 0-7 or 3,17,42") from None
    if not out:
        raise ValueError("--units is empty")
    return out


def cmd_visualize(args) -> int:
    import io
    import time

    from matplotlib.figure import Figure

    from . import optvis
    from .hooks import Unit
    from .io import figure_png, write_bytes_atomic
    if (args.site is None) == (not args.prompt):
        raise ValueError("give either --site (with --units) or --prompt, not both")
    model = _load(args)
    if args.prompt:
        objective = optvis.text_direction(model, args.prompt)
        items, batch, what = objective, args.batch, f"text direction {args.prompt}"
    else:
        model.site(args.site)  # unknown names raise with close matches
        target = args.site if args.exact_site else optvis.optimization_site(model, args.site)
        items = [Unit.channel(target, u) for u in _unit_list(args.units)]
        batch, what = None, f"{len(items)} unit(s) of {args.site}" + ("" if target == args.site else f" (at {target})")
    start = time.perf_counter()
    result = optvis.render(model, items, param=args.param, steps=args.steps, size=args.size, seed=args.seed,
                           batch=batch)
    seconds = time.perf_counter() - start
    if not args.prompt:
        result.units = [Unit.channel(args.site, u.index) for u in items]  # name the images by the site asked for
    paths = result.save(args.out)
    buf = io.BytesIO()
    result.grid().save(buf, format="PNG")
    grid = write_bytes_atomic(f"{args.out}/grid.png", buf.getvalue())
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.plot(result.trace.numpy(), lw=0.8)
    ax.set(xlabel="step", ylabel="objective", title=what)
    write_bytes_atomic(f"{args.out}/trace.png", figure_png(fig))
    final = result.trace[-1].tolist()
    print(f"{model.id}: {what}, {args.steps} steps in {seconds:.1f} s")
    for label, value in zip(result.labels, final):
        print(f"  {label}: final objective {value:.4g}")
    print(f"wrote {len(paths)} PNG(s), grid.png and trace.png to {grid.parent.resolve()}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.model, pretrained=args.pretrained, device=args.device, out=args.out, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscope", description="Look inside CLIP models and test them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the main job on a model and write a report folder")
    _model_args(p)
    p.add_argument("--out", default="clipscope-demo", help="report folder (default: clipscope-demo)")
    p.add_argument("--steps", type=int, default=256, help="optimization steps per feature visualization (default 256)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("visualize", help="feature visualization: render units of a site, or a text direction")
    p.add_argument("--site", help="image-tower site, e.g. visual.layer4 (see `clipscope layers`)")
    p.add_argument("--units", default="0-7", help="channel indices: 0-7 (default), 3,17,42 or a mix")
    p.add_argument("--prompt", action="append",
                   help="render the text direction of this prompt instead (repeat to average prompts)")
    p.add_argument("--batch", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--param", choices=["fourier", "maco", "pixels"], default="fourier")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-site", action="store_true",
                   help="optimize at --site itself, not before its block's final ReLU")
    p.add_argument("--out", default="visualize-out", help="output folder (default: visualize-out)")
    _model_args(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("score", help="zero-shot batch scoring of an endpoint-format JSON request")
    p.add_argument("request", help="path to the request JSON file")
    p.add_argument("-o", "--output", help="write the response JSON here instead of printing it")
    p.add_argument("--batch-size", type=int, default=64)
    _model_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("attack", help="run a typographic attack over a folder and write a report")
    p.add_argument("folder", nargs="?", help="image folder (labels = sub-folder names) or a public attack set")
    p.add_argument("--config", help="YAML file with the run's settings (flags override it)")
    p.add_argument("--format", choices=["imagefolder", "paint", "rta100", "scam", "materzynska"])
    p.add_argument("--classes", help="comma-separated class names (default: the folder's labels)")
    p.add_argument("--target", help="write this class name on every image (default: a wrong class per image)")
    p.add_argument("--size", type=float, help="text size: fraction of the shorter side (<1) or pixels")
    p.add_argument("--position", help="center, top-left, ..., random, fixed8:K")
    p.add_argument("--colour", help="text colour")
    p.add_argument("--opacity", type=float)
    p.add_argument("--sweep", help="one parameter and its values, e.g. size=0.1,0.2,0.3")
    p.add_argument("--defence", action="append", choices=["prompt", "ablation"], help="add a defence (repeatable)")
    p.add_argument("--out", help="report folder (default: attack-report)")
    p.add_argument("--model", default=None, help="model name (default: the config's, else 'organism')")
    p.add_argument("--pretrained", default=None)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("audit", help="run a bias audit spec (YAML) and write its report")
    p.add_argument("spec", help="audit spec, e.g. audits/organism_planted_bias.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the spec's)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("layers", help="list a model's hookable sites")
    p.add_argument("--tower", choices=["visual", "text"])
    _model_args(p)
    p.set_defaults(func=cmd_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .hub import UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
    from .scoring import RequestError
    try:
        return args.func(args)
    except (UnknownModelError, WeightsNotAvailableError, UnsafeCheckpointError, RequestError, ValueError,
            FileNotFoundError) as exc:
        print(f"clipscope: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
