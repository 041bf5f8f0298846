"""Benchmark a bias audit through the endpoint backend on loopback against the same audit in-process.

    python bench/endpoint_throughput.py [--n 600] [--batch 32] [--concurrency 4] [--server process] [--repeats 3]
                                        [--embedding-cache 4096]

Both arms run the organism's planted-bias audit (clipscope/audit/specs/organism_planted_bias.yaml: two
taxonomies, harm rate and accuracy, 1000 bootstrap resamples; retrieval left out, since a black-box model
has no embeddings for it) on ``--n`` figures at batch ``--batch``:

- in-process: ``run_audit`` with the organism loaded here (each image embedded once, classified per taxonomy);
- endpoint: ``run_audit`` with ``endpoint:http://127.0.0.1:PORT/score`` served by ``clipscope serve organism``
  (``--server process``: a separate process, as a deployed endpoint is; ``thread``: a thread of this
  process, sharing its interpreter), each image sent once per taxonomy as base64 PNG in requests of
  ``--batch`` rows, ``--concurrency`` requests in flight, on an empty answer cache; the server keeps
  ``--embedding-cache`` image embeddings, so the second taxonomy's images skip its image tower.

Prints images audited per second of each arm, and the endpoint's throughput as a fraction of the
in-process one (goal: >= 0.5), for the whole audit and for the zero-shot stage alone (embedding or
endpoint scoring, without the metrics both arms share). Figures are the median of ``--repeats``
interleaved repeats (min and max beside them), arms in alternating order, fresh cache folders each time.
Torch uses one thread in this process and in the server process.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=600, help="organism figures audited (default 600)")
    ap.add_argument("--batch", type=int, default=32, help="rows per forward pass and per request (default 32)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--server", choices=["process", "thread"], default="process",
                    help="run `clipscope serve` as a separate process (default) or a thread of this one")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--embedding-cache", type=int, default=4096,
                    help="the server's image-embedding cache (default 4096, as `clipscope serve`; 0: off, so every "
                         "taxonomy runs the image tower again)")
    args = ap.parse_args(argv)
    if min(args.n, args.batch, args.concurrency, args.repeats) < 1:
        ap.error("--n, --batch, --concurrency and --repeats must be at least 1")
    return args


#: The organism's zero-shot templates, which `clipscope serve organism` applies (declared to the endpoint model).
TEMPLATES = ["a photo of a {}."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server(batch: int, embedding_cache: int) -> tuple[subprocess.Popen, str]:
    """``clipscope serve organism`` in a child process with one torch thread; returns it and its scoring URL."""
    import httpx
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipscope", "serve", "organism", "--port", str(port),
                             "--batch-size", str(batch), "--device", "cpu", "--embedding-cache", str(embedding_cache)],
                            env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}/score"
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("clipscope serve did not start within 300 s")
            time.sleep(0.2)


def spread(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.2f}{unit} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import fairlearn.metrics  # noqa: F401  (library import time is not audit time)
    import scipy.stats  # noqa: F401
    import yaml

    import clipscope
    from clipscope.audit import load_data, load_spec, run_audit
    from clipscope.endpoint import load_endpoint
    from clipscope.serve import ServerThread

    spec = yaml.safe_load((Path(clipscope.__file__).parent / "audit" / "specs" / "organism_planted_bias.yaml")
                          .read_text())
    spec.pop("retrieval")
    spec["data"]["n"] = args.n
    spec["batch_size"] = args.batch
    model = clipscope.load("organism", device="cpu")
    if args.server == "process":
        proc, url = start_process_server(args.batch, args.embedding_cache)
        thread = None
    else:
        thread = ServerThread(model, batch_size=args.batch, embedding_cache=args.embedding_cache)
        proc, url = None, thread.url
    try:
        warm_up = load_data(load_spec(spec).data).fetch([0])
        load_endpoint(url, cache=False).zero_shot(warm_up, ["a", "b"])  # the server's first pass is not timed
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                arms = ["in-process", "endpoint"] if r % 2 == 0 else ["endpoint", "in-process"]
                run = {}
                for arm in arms:
                    folder = Path(tmp) / f"{arm}-{r}"
                    m = model if arm == "in-process" else load_endpoint(url, cache_dir=folder / "answers",
                                                                       batch_size=args.batch,
                                                                       concurrency=args.concurrency,
                                                                       templates=TEMPLATES)
                    t0 = time.perf_counter()
                    result = run_audit(spec, models=[m], cache_dir=folder / "embeddings", write=False, progress=False)
                    seconds = time.perf_counter() - t0
                    prov = result.provenance["models"][0]
                    assert prov["images_embedded"] == args.n, prov
                    run[arm] = seconds
                    run[f"{arm} stage"] = prov["embed_seconds"] + sum(prov["taxonomy_seconds"].values())
                    run[f"{arm} predictions"] = result.predictions
                same = run["in-process predictions"].equals(run["endpoint predictions"])
                assert same, "the endpoint's predictions differ from the in-process ones"
                runs.append(run)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if thread is not None:
            thread.stop()
    n = args.n
    print(f"organism, {n} figures x 2 taxonomies, batch {args.batch}, concurrency {args.concurrency}, server in a "
          f"{args.server} (embedding cache {args.embedding_cache}), 1 torch thread each; median [min, max] of "
          f"{args.repeats} interleaved repeat(s); predictions identical in every repeat")
    for arm in ("in-process", "endpoint"):
        print(f"{arm:<11} whole audit {spread([n / r[arm] for r in runs], ' images/s')}; zero-shot stage "
              f"{spread([n / r[arm + ' stage'] for r in runs], ' images/s')}")
    whole = [r["in-process"] / r["endpoint"] for r in runs]
    stage = [r["in-process stage"] / r["endpoint stage"] for r in runs]
    print(f"endpoint / in-process throughput: whole audit {spread(whole)} (goal >= 0.5); zero-shot stage alone "
          f"{spread(stage)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
