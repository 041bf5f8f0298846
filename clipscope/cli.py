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
    except (UnknownModelError, WeightsNotAvailableError, UnsafeCheckpointError, RequestError) as exc:
        print(f"clipscope: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
