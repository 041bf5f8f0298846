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


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.model, pretrained=args.pretrained, device=args.device, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscope", description="Look inside CLIP models and test them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the main job on a model and write a report folder")
    _model_args(p)
    p.add_argument("--out", default="clipscope-demo", help="report folder (default: clipscope-demo)")
    p.set_defaults(func=cmd_demo)

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
