"""The ``clipscope`` command line."""
from __future__ import annotations

import argparse
import json
import os
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
    results = score(args.request, _load(args), batch_size=args.batch_size, allow_local_files=not args.untrusted,
                    url_timeout=args.url_timeout, max_url_bytes=args.max_url_bytes)
    text = json.dumps(results, indent=2)
    bad = sum(1 for r in results if "error" in r)
    if args.output:
        from .io import write_text_atomic
        write_text_atomic(args.output, text)
        print(f"scored {len(results) - bad} row(s), {bad} bad row(s) -> {args.output}")
    else:
        print(text)
    if bad == len(results):
        print(f"clipscope: error: every row failed ({bad} of {len(results)} row(s)); first: {results[0]['error']}",
              file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    import clipscope

    from .serve import serve
    model = clipscope.load(args.model, pretrained=args.pretrained, device=args.device)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"clipscope serve: {model.id} on {scheme}://{args.host}:{args.port}/score (Ctrl-C stops)", file=sys.stderr)
    serve(model, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
          batch_size=args.batch_size, window_ms=args.window_ms, max_batch=args.max_batch,
          max_request_bytes=args.max_request_bytes, max_rows=args.max_rows, max_labels=args.max_labels,
          max_label_chars=args.max_label_chars, max_url_rows=args.max_url_rows, max_in_flight=args.max_in_flight,
          key_env=args.key_env, embedding_cache=args.embedding_cache)
    return 0


def cmd_layers(args) -> int:
    layers = _load(args).layers()
    if args.tower:
        layers = layers.filter(tower=args.tower)
    print(layers)
    return 0


def cmd_attack(args) -> int:
    import pandas as pd

    from .typographic.run import run_attack_config
    if args.benchmark:
        return _attack_benchmark(args)
    config = _attack_config_file(args.config) if args.config else {}
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
    if isinstance(attack.get("position"), str) and "," in attack["position"]:
        attack["position"] = tuple(_number(v) for v in attack["position"].split(","))
    config["attack"] = attack
    if args.classes is not None:
        config["classes"] = [c.strip() for c in args.classes.split(",")]
    if args.sweep:
        config["sweep"] = _sweep_flag(args.sweep)
    flags = {"defences": args.defence, "out": args.out, "model": args.model, "pretrained": args.pretrained,
             "ablation_site": args.ablation_site, "ablation_units": args.ablation_units, "seed": args.seed,
             "cache_dir": args.cache_dir}
    config.update({key: value for key, value in flags.items() if value is not None})
    index = _leaving_group(run_attack_config, config)
    if index is None:  # a rank other than 0 under a launcher: rank 0 writes and prints
        return 0
    skipped = pd.read_csv(index.parent / "skipped.csv")
    print(f"report: {index.resolve()}")
    if len(skipped):
        print(f"skipped {len(skipped)} unreadable image(s), listed with reasons in {index.parent / 'skipped.csv'}")
    return 0


def _attack_benchmark(args) -> int:
    """``clipscope attack --benchmark CONFIG``: attack sets x defences; --model, --pretrained, --seed, --out and
    the folder (as the data of the generated attacks) override the file."""
    from .distributed import launched
    from .typographic.run import run_benchmark_config
    from .validate import InvalidArgumentError
    if launched():  # every rank would fit every defence and write the same report
        raise InvalidArgumentError("--benchmark", args.benchmark, "a run in one process: launch `clipscope attack "
                                   "--benchmark` without torchrun (evaluate, sweep, audit and mine run distributed)")
    config = _attack_config_file(args.benchmark, "--benchmark")
    if args.folder:
        config["data"] = {"path": args.folder}
    flags = {"out": args.out, "model": args.model, "pretrained": args.pretrained, "seed": args.seed}
    config.update({key: value for key, value in flags.items() if value is not None})
    index = run_benchmark_config(config)
    print(f"report: {index.resolve()}")
    return 0


def _attack_config_file(path: str, flag: str = "--config") -> dict:
    """The settings mapping in the YAML file ``path``."""
    import yaml

    from .validate import InvalidArgumentError
    with open(path) as fh:
        try:
            config = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(flag, path, f"a YAML file ({exc})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InvalidArgumentError(flag, path, "a YAML mapping of settings (model, data, attack, ...)")
    return config


def _sweep_flag(text: str) -> dict:
    """``--sweep NAME=V1,V2,...`` as ``{NAME: [V1, V2, ...]}`` (numbers where they parse)."""
    from .validate import InvalidArgumentError
    name, equals, values = text.partition("=")
    if not equals or not name.strip() or not values.strip():
        raise InvalidArgumentError("--sweep", text, "NAME=V1,V2,... e.g. size=0.1,0.2,0.3")
    return {name.strip(): [_number(v) for v in values.split(",")]}


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _leaving_group(run, *args):
    """``run(*args)``, then leave the process group it joined under a launcher (``torchrun -m clipscope``)."""
    from .distributed import shutdown
    try:
        return run(*args)
    finally:
        shutdown()


def cmd_audit(args) -> int:
    from .audit.run import cli_audit
    return _leaving_group(cli_audit, args.spec, args.out)


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
        raise ValueError(f"--units={text!r} selects no unit; use e.g. 0-7 or 3,17,42")
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
    os.makedirs(args.out, exist_ok=True)  # an unwritable --out fails now, not after the optimization
    model = _load(args)
    if args.prompt:
        objective = optvis.text_direction(model, args.prompt)
        items, batch, what = objective, args.batch, f"text direction {args.prompt}"
    else:
        # render optimizes at the site's pre-activation unless --exact-site; unknown names raise with close matches
        target = args.site if args.exact_site else optvis.optimization_site(model, args.site)
        items = [Unit.channel(args.site, u) for u in _unit_list(args.units)]
        batch, what = None, f"{len(items)} unit(s) of {args.site}" + ("" if target == args.site else f" (at {target})")
    start = time.perf_counter()
    result = optvis.render(model, items, param=args.param, steps=args.steps, size=args.size, seed=args.seed,
                           batch=batch, exact_site=args.exact_site)
    seconds = time.perf_counter() - start
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


def cmd_mine(args) -> int:
    """``clipscope mine``: dataset examples of ``--sites`` over ``--data`` into the atlas cache ``--cache-dir``;
    under ``torchrun`` every rank mines its shard and rank 0 reports."""
    import time

    import clipscope

    from .distributed import context, shutdown
    from .io import ensure_folder, write_text_atomic
    from .neurons import dataset_examples
    from .validate import check_int
    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--checkpoint-every", args.checkpoint_every)):
        check_int(flag, value, low=1)
    ctx = context()
    try:
        start = time.perf_counter()
        model = clipscope.load(args.model, pretrained=args.pretrained,
                               device=ctx.device if ctx.distributed and args.device == "auto" else args.device)
        units = None if args.units is None else _unit_list(args.units)
        sites = [name.strip() for text in args.sites for name in text.split(",") if name.strip()]
        cache = ensure_folder(args.cache_dir)
        result = dataset_examples(model, _mine_source(args.data), sites, k=args.k, units=units,
                                  batch_size=args.batch_size, cache_dir=cache, progress=None if ctx.is_main else False,
                                  checkpoint_every=args.checkpoint_every, fingerprint=args.fingerprint)
        seconds = time.perf_counter() - start
        if ctx.is_main:
            summary = {"model": model.id, "data": str(args.data), "sites": sites, "k": args.k, "units": units,
                       "n_seen": result.n_seen, "n_skipped": result.n_skipped,
                       "skipped": [[str(key), reason] for key, reason in result.skipped],
                       "processes": ctx.world_size, "seconds": round(seconds, 3), "cache_files": result.cache_files}
            path = write_text_atomic(cache / "mine-summary.json", json.dumps(summary, indent=2))
            print(f"{model.id}: top/bottom {args.k} examples of {len(sites)} site(s) over {result.n_seen} image(s)"
                  f" ({result.n_skipped} unreadable skipped), {ctx.world_size} process(es), {seconds:.1f} s")
            print(f"atlas cache: {cache.resolve()} (summary: {path.name})")
    finally:
        shutdown(ctx)
    return 0


def _mine_source(data: str):
    """The data set ``--data`` names: a ``datasets`` folder (``save_to_disk``) or a folder of images."""
    from pathlib import Path
    if (Path(data) / "state.json").is_file() and (Path(data) / "dataset_info.json").is_file():
        import datasets
        return datasets.load_from_disk(data)
    if not Path(data).is_dir():
        from .validate import InvalidArgumentError
        raise InvalidArgumentError("--data", data, "a folder of images or a datasets folder (save_to_disk)")
    return data


def _mine_args(p: argparse.ArgumentParser) -> None:
    """Add the ``mine`` sub-command's arguments to its parser ``p``."""
    p.add_argument("model", help="model name: 'organism', an open_clip name, 'hf-hub:ORG/REPO', 'hf:ORG/REPO' or a "
                                 "local folder")
    p.add_argument("--data", required=True, help="a folder of images (searched recursively) or a datasets folder "
                                                 "written by save_to_disk")
    p.add_argument("--sites", nargs="+", required=True,
                   help="image-tower sites, e.g. visual.layer3 visual.layer4 (or comma-separated)")
    p.add_argument("--k", type=int, default=8, help="examples kept per unit and side (default 8, the Atlas's k)")
    p.add_argument("--units", default=None,
                   help="channel indices, e.g. 0-63 or 3,17 (default: every unit, which is what the Atlas reads)")
    p.add_argument("--cache-dir", required=True, help="the atlas cache folder: Atlas(..., cache_dir=DIR) reads it")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--checkpoint-every", type=int, default=8,
                   help="batches between checkpoints of a rank's state (default 8); a killed run resumes from them")
    p.add_argument("--fingerprint", default=None, help="identifies the data set in the cache (default: computed)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--device", default="auto",
                   help="cuda, mps, cpu or auto (default; under torchrun: cuda:LOCAL_RANK when there is CUDA)")


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.model, pretrained=args.pretrained, device=args.device, out=args.out, steps=args.steps)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    """Add the ``demo`` sub-command's arguments to its parser ``p``."""
    _model_args(p)
    p.add_argument("--out", default="clipscope-demo", help="report folder (default: clipscope-demo)")
    p.add_argument("--steps", type=int, default=256, help="optimization steps per feature visualization (default 256)")


def _visualize_args(p: argparse.ArgumentParser) -> None:
    """Add the ``visualize`` sub-command's arguments to its parser ``p``."""
    p.add_argument("--site", help="image-tower site, e.g. visual.layer4 (see `clipscope layers`)")
    p.add_argument("--units", default="0-7", help="channel indices: 0-7 (default), 3,17,42 or a mix")
    p.add_argument("--prompt", action="append",
                   help="render the text direction of this prompt instead (repeat to average prompts)")
    p.add_argument("--batch", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=256, help="optimization steps (default 256)")
    p.add_argument("--param", choices=["fourier", "maco", "pixels"], default="fourier",
                   help="image parameterization: fourier (default), maco (only the Fourier phase is optimized) "
                        "or pixels")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial images and the random transforms (default 0)")
    p.add_argument("--exact-site", action="store_true",
                   help="optimize at --site itself, not before its block's final ReLU")
    p.add_argument("--out", default="visualize-out", help="output folder (default: visualize-out)")
    _model_args(p)


def _score_args(p: argparse.ArgumentParser) -> None:
    """Add the ``score`` sub-command's arguments to its parser ``p``."""
    from .scoring import MAX_URL_BYTES, URL_TIMEOUT_S
    p.add_argument("request", help="path to the request JSON file, or the JSON text itself")
    p.add_argument("-o", "--output", help="write the response JSON here instead of printing it")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--untrusted", action="store_true",
                   help="the request comes from someone else: refuse local file paths as images "
                        "(base64, data: URIs and http(s) URLs still work)")
    p.add_argument("--url-timeout", type=float, default=URL_TIMEOUT_S,
                   help=f"seconds allowed for fetching one image URL (default {URL_TIMEOUT_S:g})")
    p.add_argument("--max-url-bytes", type=int, default=MAX_URL_BYTES,
                   help=f"largest image fetched from a URL, in bytes (default {MAX_URL_BYTES})")
    _model_args(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    """Add the ``serve`` sub-command's arguments to its parser ``p``."""
    from .serve import (EMBEDDING_CACHE, MAX_BATCH, MAX_IN_FLIGHT, MAX_LABEL_CHARS, MAX_LABELS, MAX_REQUEST_BYTES,
                        MAX_ROWS, MAX_URL_ROWS, WINDOW_MS)
    p.add_argument("model", nargs="?", default="organism",
                   help="model to serve: 'organism' (default, offline), an open_clip name, 'hf-hub:ORG/REPO', "
                        "'hf:ORG/REPO' or a local folder")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--window-ms", type=float, default=WINDOW_MS,
                   help=f"how long a request waits for others to batch with, in ms (default {WINDOW_MS:g})")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"most rows scored in one model pass (default {MAX_BATCH})")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help=f"largest request body, in bytes (default {MAX_REQUEST_BYTES}; larger: HTTP 413)")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS,
                   help=f"most rows per request (default {MAX_ROWS}; more: HTTP 413)")
    p.add_argument("--max-labels", type=int, default=MAX_LABELS,
                   help=f"most labels per request (default {MAX_LABELS}; more: HTTP 413)")
    p.add_argument("--max-label-chars", type=int, default=MAX_LABEL_CHARS,
                   help=f"longest label, in characters (default {MAX_LABEL_CHARS}; longer: HTTP 413)")
    p.add_argument("--max-url-rows", type=int, default=MAX_URL_ROWS,
                   help=f"most rows with an http(s) image URL per request (default {MAX_URL_ROWS}; more: HTTP 413)")
    p.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                   help=f"requests in progress at once (default {MAX_IN_FLIGHT}; more: HTTP 503 with Retry-After)")
    p.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve https (needed with --key-env "
                                                        "beyond loopback, unless behind a TLS proxy)")
    p.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    p.add_argument("--embedding-cache", type=int, default=EMBEDDING_CACHE,
                   help=f"image embeddings kept, so an image scored again under other labels skips the image tower "
                        f"(default {EMBEDDING_CACHE}; 0: none)")
    p.add_argument("--key-env", default=None,
                   help="require 'Authorization: Bearer KEY' with KEY read from this environment variable "
                        "(default: no key)")


def _attack_args(p: argparse.ArgumentParser) -> None:
    """Add the ``attack`` sub-command's arguments to its parser ``p``."""
    p.add_argument("folder", nargs="?", help="image folder (labels = sub-folder names) or a public attack set")
    p.add_argument("--config", help="YAML file with the run's settings (flags override it)")
    p.add_argument("--benchmark", metavar="CONFIG",
                   help="run the defence benchmark described by this YAML file (attack sets x defences: clean and "
                        "attacked accuracy, attack success with Wilson intervals; see clipscope.typographic.run."
                        "BENCHMARK_CHECKS); --model, --pretrained, --seed, --out and FOLDER override it")
    p.add_argument("--format", choices=["imagefolder", "paint", "rta100", "scam", "materzynska"],
                   help="layout of the folder: imagefolder (default, one sub-folder per class) or a public set")
    p.add_argument("--classes", help="comma-separated class names (default: the folder's labels)")
    p.add_argument("--target", help="write this class name on every image (default: a wrong class per image)")
    p.add_argument("--size", type=float, help="text size: fraction of the shorter side (<1) or pixels "
                                              "(default 0.18)")
    p.add_argument("--position", help="where the text goes: center (default), top, bottom, left, right, top-left, "
                                      "top-right, bottom-left, bottom-right, random, fixed8:0..fixed8:7, or X,Y "
                                      "(fractions as floats in [0, 1], else pixels)")
    p.add_argument("--colour", help="text colour: a name (black, default), #rrggbb or rgb(r, g, b)")
    p.add_argument("--opacity", type=float, help="text and box opacity in [0, 1] (default 1)")
    p.add_argument("--sweep", help="vary one parameter over values, e.g. size=0.1,0.2,0.3 or position=center,fixed8:0")
    p.add_argument("--defence", action="append", choices=["prompt", "ablation"],
                   help="add a defence (repeatable): prompt adds 'text that says X' classes; ablation zeroes the "
                        "units of --ablation-site that respond most to rendered text")
    p.add_argument("--ablation-site", default=None,
                   help="site whose text units the ablation defence zeroes (default: the image tower's last block, "
                        "e.g. visual.layer4 on the organism; see `clipscope layers`)")
    p.add_argument("--ablation-units", type=int, default=None,
                   help="how many text units the ablation defence zeroes (default 8)")
    p.add_argument("--seed", type=int, default=None, help="seed for wrong-class choices and random positions (default 0)")
    p.add_argument("--out", help="report folder (default: attack-report)")
    p.add_argument("--cache-dir", default=None,
                   help="where per-block results are cached (default: OUT/cache); a killed or repeated run, also "
                        "under torchrun, recomputes only the missing blocks")
    p.add_argument("--model", default=None, help="model name (default: the config's, else 'organism')")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path for --model")


def _audit_args(p: argparse.ArgumentParser) -> None:
    """Add the ``audit`` sub-command's arguments to its parser ``p``."""
    p.add_argument("spec", help="audit spec, e.g. audits/organism_planted_bias.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the spec's)")


def _layers_args(p: argparse.ArgumentParser) -> None:
    """Add the ``layers`` sub-command's arguments to its parser ``p``."""
    p.add_argument("--tower", choices=["visual", "text"], help="list only this tower's sites (default: both)")
    _model_args(p)


#: The sub-commands: name, the function adding its arguments, the function running it, help, epilog.
_COMMANDS = (
    ("demo", _demo_args, cmd_demo, "run the main job on a model and write a report folder", None),
    ("visualize", _visualize_args, cmd_visualize,
     "feature visualization: render units of a site, or a text direction", None),
    ("score", _score_args, cmd_score, "zero-shot batch scoring of an endpoint-format JSON request",
     "Exit status: 0 when at least one row was scored (bad rows carry an 'error'), 1 when every row failed "
     "(the response is still written; the count goes to stderr), 2 when the request, the model or an option "
     "is invalid."),
    ("attack", _attack_args, cmd_attack, "run a typographic attack over a folder and write a report", None),
    ("audit", _audit_args, cmd_audit, "run a bias audit spec (YAML) and write its report", None),
    ("layers", _layers_args, cmd_layers, "list a model's hookable sites", None),
    ("mine", _mine_args, cmd_mine, "dataset examples of sites over a data set, written as a reusable atlas cache",
     "Runs on several processes under torchrun (torchrun --nproc-per-node N -m clipscope mine ...): each mines its "
     "shard and rank 0 merges exactly, prints the summary and writes DIR/mine-summary.json; a killed run resumes "
     "from DIR. Atlas(model, DATA, k=K, cache_dir=DIR) then reads the examples without a pass over the data."),
    ("serve", _serve_args, cmd_serve, "serve a model's zero-shot classification over HTTP in the endpoint format",
     "Requests are untrusted: image cells may be base64, data: URIs or public http(s) URLs, never local paths. "
     "Query it with clipscope.load('endpoint:http://HOST:PORT/score'), e.g. in an audit spec's models."),
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="clipscope", description="Look inside CLIP models and test them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version (clipscope X.Y.Z) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to run; `clipscope COMMAND --help` describes its options")

    for name, add_args, func, help_text, epilog in _COMMANDS:
        p = sub.add_parser(name, help=help_text, epilog=epilog)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def _os_error_text(exc: OSError) -> str:
    """``PATH: cause`` (``PATH -> PATH2: cause`` for two paths) when the error names a file, else its message."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    paths = os.fsdecode(exc.filename) + ("" if exc.filename2 is None else f" -> {os.fsdecode(exc.filename2)}")
    return f"{paths}: {exc.strerror}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the process exit code.

    The command's own code on success (0; see a command's ``--help`` for others); 2 for bad input
    (usage errors exit through argparse) or a resource fault (an ``OSError``: missing file,
    unwritable or full output folder), reported as one line ``clipscope: error: ...`` on stderr,
    without a traceback.
    """
    args = build_parser().parse_args(argv)
    from .hub import CheckpointError, UnknownModelError, UnsafeCheckpointError, WeightsNotAvailableError
    from .scoring import RequestError
    try:
        return args.func(args)
    except (UnknownModelError, WeightsNotAvailableError, UnsafeCheckpointError, CheckpointError, RequestError,
            ValueError) as exc:
        print(f"clipscope: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"clipscope: error: {_os_error_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
