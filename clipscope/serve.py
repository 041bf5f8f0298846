"""``clipscope serve``: any model clipscope loads, behind the zero-shot endpoint format over HTTP.

``POST /score`` (also ``POST /``) takes the request of :mod:`clipscope.scoring` and answers one
``{"probs": [...], "labels": [...]}`` per row (``{"probs": null, ..., "error": "row i: ..."}`` for a row
whose image cannot be read); ``GET /health`` answers ``{"status": "ok", "model": ID}``. It is what
``clipscope.load("endpoint:http://HOST:PORT/score")`` talks to, so an audit or an attack can run
in-process and through HTTP and be compared.

Built on Starlette (ASGI) served by uvicorn. Requests are untrusted: the body must be a JSON object (a
JSON string is refused, never read as the path of a request file), and image cells may be base64,
``data:`` URIs or http(s) URLs of public hosts only (:func:`clipscope.scoring.decode_image` with
``allow_local_files=False``), never local paths. A request body above ``max_request_bytes``, or with more
than ``max_rows`` rows, ``max_url_rows`` URL rows, ``max_labels`` labels or a label longer than
``max_label_chars`` characters, is refused (HTTP 413) before any image is decoded; a malformed request gets
HTTP 400 naming the bad field; beyond ``max_in_flight`` requests at once the server answers HTTP 503 with
``Retry-After: 1`` (the endpoint client retries). Bodies are parsed and images decoded on worker threads,
never on the event loop. Concurrent requests with the same labels are scored together: the first waits up
to ``window_ms`` for others (or until ``max_batch`` rows), and one model pass serves them all.
The image embeddings of the last ``embedding_cache`` images sent as base64 are kept (keyed by the model's
``id`` and the SHA-256 of the cell), so an image scored again under other labels (an audit's next taxonomy)
skips the image tower; probabilities are those of ``model.zero_shot`` either way. The served model must not
be used meanwhile under :meth:`~clipscope.ClipModel.ablate` or hook contexts, which change its answers without
changing its ``id`` (a :meth:`~clipscope.ClipModel.transform_embeddings` block does change it).
With ``key_env`` set, requests must carry ``Authorization: Bearer KEY`` (HTTP 401 otherwise); give the
server TLS (``ssl_certfile``, ``ssl_keyfile``) when it listens beyond loopback, since the client never sends
a key over plain http to another host. Binds 127.0.0.1 by default.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .endpoint import is_black_box, is_loopback
from .data import ImageLoadError
from .scoring import (MAX_URL_BYTES, URL_TIMEOUT_S, ParsedRequest, RequestError, decode_image,
                      parse_request)
from .validate import InvalidArgumentError, check_int, check_number

#: Largest request body (bytes): about 100 base64 PNG photos at 224 px (~160 KB each), three client batches
#: of 32; bounds the memory one request holds before it is parsed.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Rows per request: 32 client batches of the default 32; bounds the decoded images one request holds
#: (1024 x 224 x 224 x 3 bytes = 147 MiB).
MAX_ROWS = 1024
#: Labels per request: ImageNet's 1000 classes (the largest common zero-shot taxonomy) with room; every
#: distinct label set is encoded by the text tower, so this bounds the work one request can ask for.
MAX_LABELS = 1024
#: Characters per label: CLIP's text tower reads 77 tokens, about 300 characters of English text (BPE averages
#: ~4 characters a token), so a longer label is truncated by the tokenizer anyway.
MAX_LABEL_CHARS = 300
#: Rows with an http(s) URL per request: each fetch may take ``url_timeout`` (10 s), so 32 URLs on
#: ``DECODE_THREADS`` threads hold the decoders for at most 80 s.
MAX_URL_ROWS = 32
#: Requests being read, decoded or scored at once (more get HTTP 503 with Retry-After): 32 bodies of
#: ``MAX_REQUEST_BYTES`` are 512 MiB, and 8x the default client's 4 requests in flight.
MAX_IN_FLIGHT = 32
#: Batching window (ms): the latency a lone request pays waiting for company, a tenth of one model pass (the
#: organism scores 32 rows in ~57 ms on one loaded CPU thread: bench/endpoint_throughput.py, 2026-12-02).
WINDOW_MS = 5.0
#: Rows scored in one model pass: 8 client batches of 32 (the default client's 4 requests in flight, twice),
#: so concurrent clients share passes while one pass's activations stay bounded.
MAX_BATCH = 256
#: Image embeddings kept by default (a ViT-L/14 embedding is 3 KiB: 12 MiB for 4096).
EMBEDDING_CACHE = 4096
#: Threads parsing bodies and decoding images (base64 and PNG decoding release the GIL for most of their
#: work): the default client's 4 requests in flight each get one.
DECODE_THREADS = 4
#: JSON names of the Python types ``json.loads`` returns (for the error on a body that is not an object).
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class RequestRefused(Exception):
    """A request the server will not score: ``status`` is the HTTP status to answer, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    labels: tuple[str, ...]
    images: list  # (cache key or None, PIL image) per row
    future: asyncio.Future = field(repr=False)


class ZeroShotServer:
    """The ASGI application (:attr:`app`) serving ``model`` (a :class:`~clipscope.ClipModel` or anything with
    its ``zero_shot``) in the endpoint format; see the module docstring for the options.

    ``stats`` counts ``requests`` (answered), ``rows`` (scored), ``passes`` (model calls: ``rows / passes`` is how
    many rows a pass batched), ``embedded`` (rows that ran through the image tower; the others came from the
    embedding cache), ``busy`` (requests refused with HTTP 503 because ``max_in_flight`` were in progress) and
    ``in_flight`` (requests in progress now; changed on the event loop only).
    """

    def __init__(self, model: Any, *, batch_size: int = 64, window_ms: float = WINDOW_MS, max_batch: int = MAX_BATCH,
                 max_request_bytes: int = MAX_REQUEST_BYTES, max_rows: int = MAX_ROWS, max_labels: int = MAX_LABELS,
                 max_label_chars: int = MAX_LABEL_CHARS, max_url_rows: int = MAX_URL_ROWS,
                 max_in_flight: int = MAX_IN_FLIGHT, url_timeout: float = URL_TIMEOUT_S,
                 max_url_bytes: int = MAX_URL_BYTES, key_env: str | None = None,
                 embedding_cache: int = EMBEDDING_CACHE):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.model = model
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.window = check_number("window_ms", window_ms, low=0) / 1000
        self.max_batch = check_int("max_batch", max_batch, low=1)
        self.max_request_bytes = check_int("max_request_bytes", max_request_bytes, low=1)
        self.max_rows = check_int("max_rows", max_rows, low=1)
        self.max_labels = check_int("max_labels", max_labels, low=1)
        self.max_label_chars = check_int("max_label_chars", max_label_chars, low=1)
        self.max_url_rows = check_int("max_url_rows", max_url_rows, low=0)
        self.max_in_flight = check_int("max_in_flight", max_in_flight, low=1)
        self.url_timeout = check_number("url_timeout", url_timeout, low=0, low_open=True)
        self.max_url_bytes = check_int("max_url_bytes", max_url_bytes, low=1)
        self.key_env = key_env
        self._key: bytes | None = None
        if key_env is not None:
            key = os.environ.get(key_env)
            if not key:
                raise InvalidArgumentError("key_env", key_env, "an environment variable that is set to the key "
                                                               "clients must send")
            self._key = f"Bearer {key}".encode()
        self.embedding_cache = check_int("embedding_cache", embedding_cache, low=0)
        self._embeddings: OrderedDict = OrderedDict()  # used by the model thread only
        self.stats = {"requests": 0, "rows": 0, "passes": 0, "embedded": 0, "busy": 0, "in_flight": 0}
        self._queue: asyncio.Queue | None = None
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="clipscope-serve-decode")
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="clipscope-serve-model")  # one model pass at a time
        self.app = Starlette(routes=[Route("/score", self._score, methods=["POST"]),
                                     Route("/", self._score, methods=["POST"]),
                                     Route("/health", self._health, methods=["GET"])],
                             lifespan=self._lifespan)

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        """Start the batcher with the server; stop it and the worker threads with it."""
        self._queue = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self._batcher())
        try:
            yield
        finally:
            task.cancel()
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._runner.shutdown(wait=False, cancel_futures=True)

    # -- routes ---------------------------------------------------------------------------
    async def _health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "ok", "model": str(getattr(self.model, "id", self.model))})

    async def _score(self, request):
        from starlette.responses import JSONResponse
        if self._key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                             self._key):
            return JSONResponse({"error": "missing or wrong key (send Authorization: Bearer KEY)"}, status_code=401)
        if self.stats["in_flight"] >= self.max_in_flight:
            self.stats["busy"] += 1
            return JSONResponse({"error": f"the server is busy ({self.max_in_flight} requests in progress); "
                                          "retry shortly"}, status_code=503, headers={"Retry-After": "1"})
        self.stats["in_flight"] += 1
        try:
            return JSONResponse(await self._answer(request))
        except RequestRefused as exc:
            return JSONResponse({"error": str(exc)[:500]}, status_code=exc.status)
        finally:
            self.stats["in_flight"] -= 1

    async def _answer(self, request) -> list[dict]:
        """The response rows of one request; raises :class:`RequestRefused`."""
        body = await self._read_body(request)
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(self._decoder, self._parse, body)
        decoded = await asyncio.gather(*(loop.run_in_executor(self._decoder, self._decode, cell)
                                         for cell in parsed.images))
        rows = [i for i, item in enumerate(decoded) if not isinstance(item, ImageLoadError)]  # item: (key, image)
        results: list[dict] = [None] * len(decoded)  # type: ignore[list-item]
        for i, item in enumerate(decoded):
            if isinstance(item, ImageLoadError):
                results[i] = _error_row(i, parsed.labels, item)
        if rows:
            future = loop.create_future()
            await self._queue.put(_Job(tuple(parsed.labels), [decoded[i] for i in rows], future))
            try:
                scored = await future
            except Exception as exc:  # noqa: BLE001 - the model failed on this batch: the client sees why
                raise RequestRefused(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
            for i, value in zip(rows, scored):
                results[i] = {"probs": value, "labels": parsed.labels} if isinstance(value, list) else \
                    _error_row(i, parsed.labels, value)
        self.stats["requests"] += 1
        return results

    async def _read_body(self, request) -> bytes:
        """The request body; raises :class:`RequestRefused` (413) when it is (or announces to be) larger than
        the limit."""
        too_big = RequestRefused(413, f"the request body is larger than this server's limit of "
                                      f"{self.max_request_bytes} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_big
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_request_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, body: bytes) -> ParsedRequest:
        """The request in ``body`` within this server's limits; raises :class:`RequestRefused` (400 for a
        malformed request, 413 for one over a limit). Only a JSON object reaches
        :func:`~clipscope.scoring.parse_request`, which reads a string as a file path: no request names a file
        this server opens."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestRefused(400, f"request is not valid JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(request, dict):
            raise RequestRefused(400, "the request must be a JSON object ({\"input_data\": {...}}), not a JSON "
                                      f"{_JSON_TYPES.get(type(request), type(request).__name__)}")
        try:
            parsed = parse_request(request)
        except RequestError as exc:
            raise RequestRefused(400, str(exc)) from None
        limits = [(len(parsed.images), self.max_rows, "rows"),
                  (len(parsed.labels), self.max_labels, "labels"),
                  (max(map(len, parsed.labels), default=0), self.max_label_chars, "characters in its longest label"),
                  (sum(_is_url(cell) for cell in parsed.images), self.max_url_rows, "rows with an image URL")]
        for value, limit, what in limits:
            if value > limit:
                raise RequestRefused(413, f"the request has {value} {what}; this server takes at most {limit}")
        return parsed

    def _decode(self, cell: str | None):
        """``(cache key, PIL image)`` for one image cell, or the :class:`ImageLoadError`; URLs get no key (what
        they point at may change)."""
        try:
            if cell is None:
                raise ImageLoadError("the row has no image")
            image = decode_image(cell, allow_local_files=False, url_timeout=self.url_timeout,
                                 max_url_bytes=self.max_url_bytes)
        except ImageLoadError as exc:
            return exc
        return (None if _is_url(cell) else hashlib.sha256(cell.encode()).hexdigest()), image
    # -- batching -------------------------------------------------------------------------
    async def _batcher(self) -> None:
        """Collect jobs for up to the window (or ``max_batch`` rows), then score each label set in one pass."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.window
            while sum(len(j.images) for j in jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple[str, ...], list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.labels, []).append(job)
            for labels, group in groups.items():
                images = [im for job in group for im in job.images]
                try:
                    scored = await loop.run_in_executor(self._runner, self._run, images, list(labels))
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in group:
                    if not job.future.done():
                        job.future.set_result(scored[start:start + len(job.images)])
                    start += len(job.images)

    def _run(self, rows: list, labels: list[str]) -> list:
        """One model pass over ``(cache key, image)`` rows: per row its probabilities (a list) or the reason it was
        skipped (a string)."""
        import torch
        out: list[Any] = [None] * len(rows)
        with torch.no_grad():
            if is_black_box(self.model) or not self.embedding_cache:
                result = self.model.zero_shot([image for _, image in rows], labels, batch_size=self.batch_size,
                                              progress=False)
                probs, scored, skipped = result.probs, list(result.keys), result.skipped
                self.stats["embedded"] += len(rows)
            else:
                probs, scored, skipped = self._cached_zero_shot(rows, labels)
        for i, p in zip(scored, probs.tolist()):
            out[i] = p
        for i, reason in skipped:
            out[i] = str(reason)
        self.stats["passes"] += 1
        self.stats["rows"] += len(rows)
        return out

    def _cached_zero_shot(self, rows: list, labels: list[str]):
        """``model.zero_shot`` computed as the model computes it (its classifier on image embeddings), with the
        embeddings of cached images (keyed by the model's ``id`` and the cell's digest) reused; returns
        ``(probs, scored row indices, [(row, reason)] skipped)``."""
        import torch
        embeddings: list = [None] * len(rows)
        todo = []
        model_id = str(getattr(self.model, "id", ""))  # read per pass: a transform_embeddings block changes it
        for i, (digest, _) in enumerate(rows):
            key = (model_id, digest)
            if digest is not None and key in self._embeddings:
                self._embeddings.move_to_end(key)
                embeddings[i] = self._embeddings[key]
            else:
                todo.append(i)
        skipped = []
        if todo:
            embedded = self.model.embed([rows[i][1] for i in todo], batch_size=self.batch_size, progress=False)
            self.stats["embedded"] += len(todo)
            for k, vector in zip(embedded.keys, embedded.embeddings):
                i, digest = todo[k], rows[todo[k]][0]
                embeddings[i] = vector.clone()
                if digest is not None:
                    self._embeddings[(model_id, digest)] = embeddings[i]
            skipped = [(todo[k], reason) for k, reason in embedded.skipped]
            while len(self._embeddings) > self.embedding_cache:
                self._embeddings.popitem(last=False)
        scored = [i for i, e in enumerate(embeddings) if e is not None]
        if not scored:
            return torch.zeros(0, len(labels)), scored, skipped
        return self.model.classifier(labels).probs(torch.stack([embeddings[i] for i in scored])), scored, skipped


def _error_row(i: int, labels: list[str], reason: Any) -> dict[str, Any]:
    """A row that could not be scored, as :func:`clipscope.scoring.score` writes it."""
    return {"probs": None, "labels": labels, "error": f"row {i}: {reason}"}


def _is_url(cell: str | None) -> bool:
    """Whether an image cell is an http(s) URL (fetched by the server)."""
    return isinstance(cell, str) and cell[:8].lower().startswith(("http://", "https://"))


def _uvicorn_options(host: str, port: int, key_env: str | None, ssl_certfile: str | None,
                     ssl_keyfile: str | None) -> dict[str, Any]:
    """uvicorn's host, port and TLS options; warns when a key is required on a non-loopback host without TLS."""
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InvalidArgumentError("ssl_keyfile", ssl_keyfile, "given together with ssl_certfile (both or neither)")
    if key_env is not None and ssl_certfile is None and not is_loopback(host):
        warnings.warn(f"clipscope serve requires a key on {host} over plain http: clients send the key in clear "
                      "text, and clipscope's endpoint client refuses to send it over http to a host other than "
                      "loopback; give ssl_certfile and ssl_keyfile (or put a TLS proxy in front)", UserWarning,
                      stacklevel=3)
    options: dict[str, Any] = {"host": host, "port": check_int("port", port, low=0, high=65535)}
    if ssl_certfile is not None:
        options.update(ssl_certfile=os.fspath(ssl_certfile), ssl_keyfile=os.fspath(ssl_keyfile))
    return options


class ServerThread:
    """``clipscope serve`` running in a background thread (for notebooks, tests and benchmarks).

    ``url`` is the scoring URL (``http://HOST:PORT/score``, ``https`` with ``ssl_certfile``); :meth:`stop` shuts
    it down. Use as a context manager: ``with ServerThread(model) as server: clipscope.load("endpoint:" +
    server.url)``. While it serves, do not use ``model`` under ablation or hook contexts in the notebook (see
    the module docstring).
    """

    def __init__(self, model: Any, *, host: str = "127.0.0.1", port: int = 0, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, **options: Any):
        import uvicorn
        self.server = ZeroShotServer(model, **options)
        config = uvicorn.Config(self.server.app, **_uvicorn_options(host, port, self.server.key_env, ssl_certfile,
                                                                    ssl_keyfile),
                                log_level="warning", access_log=False, lifespan="on")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, name="clipscope-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"clipscope serve could not start on {host}:{port}")
            time.sleep(0.01)
        bound = self._uvicorn.servers[0].sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self.url = f"{'https' if ssl_certfile else 'http'}://{self.host}:{self.port}/score"

    def stop(self) -> None:
        """Shut the server down and wait for its thread."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(model: Any, *, host: str = "127.0.0.1", port: int = 8000, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, **options: Any) -> None:
    """Serve ``model`` on ``host:port`` until interrupted (``options``: those of :class:`ZeroShotServer`);
    over https with ``ssl_certfile`` and ``ssl_keyfile`` (PEM files). Warns when ``key_env`` is set, the host
    is not loopback and there is no TLS."""
    import uvicorn
    server = ZeroShotServer(model, **options)
    uvicorn.run(server.app, **_uvicorn_options(host, port, server.key_env, ssl_certfile, ssl_keyfile),
                log_level="info", access_log=False)
