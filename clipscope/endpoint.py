"""A deployed zero-shot endpoint as a black-box model: ``clipscope.load("endpoint:https://HOST/score")``.

The endpoint speaks the CLIP zero-shot format of :mod:`clipscope.scoring` (the managed CLIP endpoint's
format, and what ``clipscope serve`` answers)::

    POST {"input_data": {"columns": ["image", "text"], "index": [0, 1],
                         "data": [[BASE64_PNG, "label1, label2"], [BASE64_PNG2]]}}
    ->   [{"probs": [...], "labels": ["label1", "label2"]}, ...]

An :class:`EndpointModel` supports zero-shot classification only (:meth:`EndpointModel.zero_shot`,
:meth:`EndpointModel.zero_shot_head`): every other :class:`~clipscope.ClipModel` capability (embeddings,
hooks, ablation, site listing) raises :class:`BlackBoxError` naming it. Images go as base64 PNG of the
decoded RGB image (the pixels the model would see in-process) in requests of ``batch_size`` rows, at
most ``concurrency`` at a time, each with a ``timeout``. Transient faults (a dropped or refused
connection, a timeout, a broken HTTP exchange, HTTP 5xx, and HTTP 429 and 503 honouring ``Retry-After``)
are retried ``retries`` times with exponential backoff; authentication (401/403), other 4xx answers,
permanent transport faults (an unsupported protocol, a proxy error) and responses that are not the format
raise :class:`EndpointAuthError`, :class:`EndpointError` and :class:`EndpointSchemaError`. When one request
fails for good, the requests still in flight stop before their next attempt and the error is raised at once.

The key, if the endpoint needs one, is read only from the environment variable ``key_env``
(default ``CLIPSCOPE_ENDPOINT_KEY``) and sent as ``Authorization: Bearer KEY``; never from an argument
or a file, and never over plain ``http`` to a host other than loopback.

Answers are cached on disk per (endpoint URL, image digest, labels) (:class:`ResponseCache`), one small
JSON file each, written atomically: a run that failed halfway resumes without sending the rows it
already has. The cache is keyed by the URL, not by the model behind it (the format does not name the
model): when a new model is deployed behind the same URL, clear the cache folder, or use another
``cache_dir`` or ``cache=False``, or the old model's answers are returned for images already scored.
The endpoint's prompt templates are its own; templates asked for by a caller cannot be sent in the
format and are reported in one warning (the audit is of what the endpoint does).
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import ipaddress
import json
import math
import os
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from PIL import Image

from .data import ImageLoadError, iter_images, list_image_files, source_length
from .io import write_text_atomic
from .model import ClipModel, ZeroShotResult
from .progress import manual_bar
from .validate import InvalidArgumentError, check_int, check_names, check_number

PREFIX = "endpoint:"
#: Environment variable holding the endpoint key by default.
KEY_ENV = "CLIPSCOPE_ENDPOINT_KEY"
#: Environment variable naming the response cache folder (default ``~/.cache/clipscope/endpoint``).
CACHE_ENV = "CLIPSCOPE_ENDPOINT_CACHE"
#: Bumped when the cached answer's format changes (old entries are then never read).
CACHE_VERSION = 1
#: What a :class:`~clipscope.ClipModel` holds per instance (its methods and properties are found on the class):
#: a black-box model has none of them.
CLIP_MODEL_ATTRIBUTES = frozenset({"model", "preprocess", "device", "dtype", "image_size", "image_mean", "image_std",
                                   "architecture"})
#: Characters of a bad response body quoted in an error.
_QUOTED = 200
#: How far a row's probabilities may sum from 1: a float32 softmax is off by ~1e-6; an endpoint rounding to
#: 4 decimal places over 200 labels is off by at most 200 x 5e-5 = 0.01.
PROB_SUM_TOLERANCE = 0.01
#: Defaults of :class:`EndpointModel`. Rows per request: the batch of ``clipscope serve`` and of audit specs;
#: 32 base64 PNGs at 224 px (~5 MiB) stay well under common request-size limits (``clipscope serve``: 16 MiB).
BATCH_SIZE = 32
#: Requests in flight: the decoding threads of ``clipscope serve`` (4), a load a single endpoint instance takes.
CONCURRENCY = 4
#: Seconds a whole request may take (connect, send, wait, read): a large batch on a CPU endpoint takes tens
#: of seconds.
TIMEOUT_S = 60.0
#: Retries after the first attempt, waiting ``BACKOFF_S * 2**attempt``: 0.5 + 1 + 2 + 4 + 8 = 15.5 s in all
#: (jittered), which rides out a restarting endpoint instance or a short burst of 429s.
RETRIES = 5
BACKOFF_S = 0.5
#: Longest single wait (s), whatever a ``Retry-After`` asks: a server asking for more is treated as down after
#: the retries rather than stalling a run for hours.
MAX_WAIT_S = 60.0


class BlackBoxError(InvalidArgumentError, AttributeError):
    """A capability that needs the model's internals (embeddings, hooks) was asked of a black-box model.

    ``capability`` names it (``"encode_image"``, ``"capture"``, ``"ablation defence"``, ...). It is also an
    :class:`AttributeError`, so ``hasattr(model, "encode_image")`` is ``False`` and ``getattr`` with a default
    returns the default: code that probes for a capability works.
    """

    def __init__(self, model: Any, capability: str):
        self.capability = capability
        super().__init__("model", model, f"{capability} needs the model's internals (embeddings or hooks), and "
                                         f"{getattr(model, 'name', model)} is a black-box endpoint that supports "
                                         "zero-shot classification only (model.zero_shot); load the model's weights "
                                         f"in-process with clipscope.load(...) for {capability}")


class EndpointError(OSError):
    """The endpoint could not answer: refused, unreachable after every retry, or an HTTP error."""


class EndpointAuthError(EndpointError):
    """The endpoint refused the credentials (HTTP 401 or 403)."""


class EndpointSchemaError(EndpointError):
    """The endpoint's response is not the zero-shot format (not JSON, wrong shape, wrong labels)."""


class EndpointCancelled(EndpointError):
    """A request given up because another request of the same call failed for good (never raised to callers:
    the other request's error is)."""


def is_black_box(model: Any) -> bool:
    """True for a model that supports zero-shot classification only (an :class:`EndpointModel`)."""
    return bool(getattr(model, "black_box", False))


def check_labels(classes: Any) -> list[str]:
    """Return ``classes`` as a list if they can travel in the format's comma-separated text: unique,
    non-empty, no comma, no leading or trailing space; else raise
    :class:`~clipscope.validate.InvalidArgumentError` naming ``classes``."""
    classes = check_names("classes", classes)
    bad = [c for c in classes if "," in c or c != c.strip()]
    if bad:
        raise InvalidArgumentError("classes", bad, "class names without commas or surrounding spaces (the endpoint "
                                                   "format sends the labels as one comma-separated text)")
    return classes


def png_base64(image: Image.Image) -> str:
    """Base64 text of ``image`` (RGB) as PNG: lossless, so the endpoint decodes the very pixels sent."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ResponseCache:
    """Answers of one endpoint on disk, content-addressed: ``FOLDER/ab/abcd....json`` per (URL, image digest,
    labels), each holding ``{"probs": [...]}`` and written atomically (a crash never leaves half an entry;
    an unreadable entry is treated as missing)."""

    def __init__(self, folder: str | os.PathLike, url: str):
        self.folder, self.url = Path(folder), url

    def path(self, digest: str, labels: Sequence[str]) -> Path:
        key = hashlib.sha256(json.dumps([CACHE_VERSION, self.url, digest, list(labels)]).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.json"

    def get(self, digest: str, labels: Sequence[str]) -> list[float] | None:
        """The cached probabilities (one per label), or ``None``."""
        try:
            probs = json.loads(self.path(digest, labels).read_text(encoding="utf-8"))["probs"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return probs if isinstance(probs, list) and len(probs) == len(labels) else None

    def put(self, digest: str, labels: Sequence[str], probs: list[float]) -> None:
        write_text_atomic(self.path(digest, labels), json.dumps({"probs": probs}))


@dataclass(frozen=True)
class EndpointHead:
    """The zero-shot head of a black-box model for ``classes``: it scores images, not embeddings.

    ``templates`` are the prompt templates the caller asked for (the endpoint applies its own; see
    :meth:`EndpointModel.zero_shot`); made by :meth:`EndpointModel.zero_shot_head`.
    """

    model: "EndpointModel"
    classes: tuple[str, ...]
    templates: tuple[str, ...]

    def image_probs(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Class probabilities of PIL ``images``, float32 ``(n, n_classes)``; raises
        :class:`EndpointError` if the endpoint could not score one of them."""
        result = self.model.zero_shot(list(images), list(self.classes), progress=False, warn=False)
        if result.skipped:
            key, reason = result.skipped[0]
            raise EndpointError(f"{self.model.name} could not score image {key}: {reason}")
        return result.probs


class EndpointModel:
    """A deployed zero-shot endpoint (see the module docstring). Build it with :func:`load_endpoint` or
    ``clipscope.load("endpoint:URL")``.

    Options: ``key_env`` (the environment variable holding the key), ``batch_size`` (rows per request),
    ``concurrency`` (requests in flight), ``timeout`` (seconds a request may take in all: connecting,
    sending, waiting for the answer and reading it), ``retries`` (after the
    first attempt) with waits of ``backoff * 2**attempt`` seconds (jittered by up to 25%) or what a 429's or
    503's ``Retry-After`` says, each capped at ``max_wait`` seconds; ``cache`` and ``cache_dir`` (the answer
    cache; default folder ``$CLIPSCOPE_ENDPOINT_CACHE`` or ``~/.cache/clipscope/endpoint``; it is keyed by URL,
    not by the model behind it: clear it, or pass another ``cache_dir`` or ``cache=False``, when the
    deployment behind the URL changes); ``templates``
    (the prompt templates the endpoint is known to apply; ``None``: unknown).

    ``name`` is ``"endpoint:URL"``; ``id`` identifies it in cache keys. ``stats`` counts ``requests`` (HTTP
    requests sent, retries included), ``retries``, ``rows_sent`` and ``rows_cached`` (answered from the cache).
    """

    black_box = True
    backend = "endpoint"
    pretrained = None

    def __init__(self, url: str, *, key_env: str = KEY_ENV, batch_size: int = BATCH_SIZE,
                 concurrency: int = CONCURRENCY, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                 backoff: float = BACKOFF_S, max_wait: float = MAX_WAIT_S,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 templates: Sequence[str] | None = None):
        self.url = _check_url(url)
        self.name = PREFIX + self.url
        if not isinstance(key_env, str) or not key_env or "=" in key_env:
            raise InvalidArgumentError("key_env", key_env, "the name of an environment variable (e.g. "
                                                           f"{KEY_ENV!r}) holding the endpoint's key")
        self.key_env = key_env
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.concurrency = check_int("concurrency", concurrency, low=1)
        self.timeout = check_number("timeout", timeout, low=0, low_open=True)
        self.retries = check_int("retries", retries, low=0)
        self.backoff = check_number("backoff", backoff, low=0)
        self.max_wait = check_number("max_wait", max_wait, low=0)
        if not isinstance(cache, bool):
            raise InvalidArgumentError("cache", cache, "True or False")
        folder = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or \
            Path.home() / ".cache" / "clipscope" / "endpoint"
        self.cache = ResponseCache(folder, self.url) if cache else None
        self.templates = None if templates is None else tuple(check_names("templates", templates, unique=False))
        self.default_templates = self.templates
        self.stats: Counter = Counter()
        self._http = None
        self._lock = threading.Lock()
        self._warned: set = set()
        self._key()  # a key set for plain http to a remote host is refused now, not at the first request

    def __repr__(self) -> str:
        return f"EndpointModel({self.url!r}, batch_size={self.batch_size}, concurrency={self.concurrency})"

    @property
    def id(self) -> str:
        """A string that identifies the endpoint (for cache keys)."""
        return self.name

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and (hasattr(ClipModel, name) or name in CLIP_MODEL_ATTRIBUTES):
            raise BlackBoxError(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def close(self) -> None:
        """Close the HTTP connections (they are reopened on the next request)."""
        with self._lock:
            if self._http is not None:
                self._http.close()
            self._http = None

    # -- zero-shot ------------------------------------------------------------------------
    def zero_shot_head(self, classes: Sequence[str], templates: str | Sequence[str] | None = None) -> EndpointHead:
        """The :class:`EndpointHead` for ``classes`` (checked as :func:`check_labels` says)."""
        classes = check_labels(classes)
        return EndpointHead(self, tuple(classes), self._templates(templates))

    def zero_shot(self, images: Any, classes: Sequence[str], templates: str | Sequence[str] | None = None, *,
                  batch_size: int | None = None, progress: bool | None = None, warn: bool = True) -> ZeroShotResult:
        """Classify ``images`` among ``classes`` at the endpoint; returns a :class:`~clipscope.ZeroShotResult`
        like :meth:`ClipModel.zero_shot <clipscope.ClipModel.zero_shot>` (float32 probabilities as the endpoint
        sent them, rows keyed by path for path inputs, by position otherwise).

        ``images``: anything :func:`~clipscope.data.iter_images` reads except preprocessed tensors.
        Images that cannot be read here, and rows the endpoint answered with an ``error``, are skipped,
        listed in ``skipped`` and (with ``warn``) reported in one warning. ``templates``: the endpoint
        applies its own prompts; templates other than those it is known to apply (``templates=`` at
        load) are not sent and are reported in one warning. ``batch_size``: rows per request (default:
        the model's). Raises :class:`EndpointError` (and its subclasses) when the endpoint fails for good.
        """
        classes = check_labels(classes)
        self._templates(templates)
        batch_size = self.batch_size if batch_size is None else check_int("batch_size", batch_size, low=1)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            raise InvalidArgumentError("images", images, "images, paths or a data set: a black-box endpoint takes "
                                                         "images, not preprocessed tensors")
        items, total = _items(images)
        keys, skipped, probs = [], [], {}
        with manual_bar(progress, total is None or total > batch_size, "endpoint zero-shot", total=total) as bar:
            def rows_to_send():
                """``(position, digest, base64)`` of the images not in the cache; the others fill ``probs`` and
                ``skipped`` here."""
                for position, (key, item) in enumerate(items):
                    keys.append(_result_key(images, key))
                    if isinstance(item, (ImageLoadError, torch.Tensor)):
                        skipped.append((position, str(item) if isinstance(item, ImageLoadError) else
                                        "a preprocessed tensor: a black-box endpoint takes images"))
                        bar.update()
                        continue
                    cell = png_base64(item)
                    digest = hashlib.sha256(cell.encode("ascii")).hexdigest()
                    cached = self.cache.get(digest, classes) if self.cache is not None else None
                    if cached is not None:
                        probs[position] = cached
                        self.stats["rows_cached"] += 1
                        bar.update()
                        continue
                    yield position, digest, cell
            for position, value in self._send(rows_to_send(), classes, batch_size, bar):
                if isinstance(value, str):
                    skipped.append((position, value))
                else:
                    probs[position] = value
        order = sorted(probs)
        table = torch.tensor([probs[p] for p in order], dtype=torch.float32).reshape(len(order), len(classes))
        skipped_keyed = [(keys[p], reason) for p, reason in sorted(skipped)]
        if skipped_keyed and warn:
            listing = "; ".join(f"{k}: {r}" for k, r in skipped_keyed[:3])
            warnings.warn(f"zero_shot skipped {len(skipped_keyed)} of {len(keys)} image(s) (listed in the result's "
                          f".skipped): {listing}", UserWarning, stacklevel=2)
        return ZeroShotResult(table, classes, self.templates or (), [keys[p] for p in order], skipped_keyed, order)

    def _templates(self, templates: str | Sequence[str] | None) -> tuple[str, ...]:
        """The templates asked for, as a tuple (``()`` for the endpoint's own); warns once per set that the
        endpoint is not known to apply."""
        if templates is None:
            return self.templates or ()
        from .prompts import resolve_templates
        asked = resolve_templates(templates)
        if asked != self.templates and asked not in self._warned:
            self._warned.add(asked)
            warnings.warn(f"{self.name} applies its own prompt templates; the templates {list(asked)} cannot be sent "
                          "in the zero-shot format and were not used (declare what the endpoint applies with "
                          "load_endpoint(..., templates=...))", UserWarning, stacklevel=3)
        return asked

    def _send(self, rows: Iterator[tuple[int, str, str]], labels: list[str], batch_size: int,
              bar) -> Iterator[tuple[int, Any]]:
        """Send ``rows`` in requests of ``batch_size``, ``concurrency`` at a time (at most twice as many
        queued); yields ``(position, probs or error text)`` per row as requests complete. When a request fails
        for good, the others are cancelled (queued ones never start, running ones stop before their next
        attempt) and its error is raised without waiting for their retries."""
        cancel = threading.Event()
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="clipscope-endpoint")
        in_flight: set[Future] = set()

        def finished(block: bool) -> Iterator[tuple[int, Any]]:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED) if block else (
                {f for f in in_flight if f.done()}, None)
            for future in done:
                in_flight.discard(future)
                answered = future.result()
                bar.update(len(answered))
                yield from answered
        try:
            batch: list[tuple[int, str, str]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == batch_size:
                    in_flight.add(executor.submit(self._score_rows, batch, labels, cancel))
                    batch = []
                yield from finished(block=len(in_flight) > 2 * self.concurrency)
            if batch:
                in_flight.add(executor.submit(self._score_rows, batch, labels, cancel))
            while in_flight:
                yield from finished(block=True)
        finally:
            cancel.set()
            executor.shutdown(wait=True, cancel_futures=True)

    # -- HTTP -----------------------------------------------------------------------------
    def _score_rows(self, rows: list[tuple[int, str, str]], labels: list[str],
                    cancel: threading.Event) -> list[tuple[int, Any]]:
        """Send one request; returns ``(position, probs or error text)`` per row and caches the answers."""
        data = [[rows[0][2], ", ".join(labels)]] + [[cell] for _, _, cell in rows[1:]]
        body = json.dumps({"input_data": {"columns": ["image", "text"], "index": list(range(len(rows))),
                                          "data": data}}).encode()
        with self._lock:
            self.stats["rows_sent"] += len(rows)
        answers = check_response(self._post(body, cancel), len(rows), labels, self.name)
        out = []
        for (position, digest, _), answer in zip(rows, answers):
            if isinstance(answer, list) and self.cache is not None:
                self.cache.put(digest, labels, answer)
            out.append((position, answer))
        return out

    def _post(self, body: bytes, cancel: threading.Event) -> Any:
        """POST ``body``, retrying transient faults; returns the parsed JSON answer. Raises
        :class:`EndpointCancelled` once ``cancel`` is set (checked before each attempt and during each wait)."""
        import httpx
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(self.retries + 1):
            if cancel.is_set():
                raise EndpointCancelled(f"{self.name}: request cancelled (another request failed)")
            with self._lock:
                self.stats["requests"] += 1
                self.stats["retries"] += attempt > 0
            try:
                response = self._exchange(body, headers)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # transient
                last, wait_s = f"{type(exc).__name__}: {exc or 'connection failed'}", self._backoff(attempt)
            except httpx.TransportError as exc:  # unsupported protocol, proxy error, ...: retrying cannot help
                raise EndpointError(f"{self.name} cannot be reached: {type(exc).__name__}: {exc}") from None
            else:
                code = response.status_code
                if code in (401, 403):
                    raise EndpointAuthError(f"{self.name} refused the credentials (HTTP {code}): set the endpoint's "
                                            f"key in the environment variable {self.key_env}"
                                            + ("" if key else " (it is not set)"))
                if code == 429 or code >= 500:
                    last = f"HTTP {code} {_quote(response.text)}"
                    wait_s = retry_after(response.headers.get("Retry-After")) if code in (429, 503) else None
                    wait_s = self._backoff(attempt) if wait_s is None else wait_s
                elif code >= 400:
                    hint = " (the request is too large: lower batch_size)" if code == 413 else ""
                    raise EndpointError(f"{self.name} answered HTTP {code}{hint}: {_quote(response.text)}")
                else:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise EndpointSchemaError(f"{self.name}'s response is not JSON ({exc}): "
                                                  f"{_quote(response.text)}") from None
            if attempt < self.retries and cancel.wait(min(wait_s, self.max_wait)):
                raise EndpointCancelled(f"{self.name}: request cancelled (another request failed)")
        raise EndpointError(f"{self.name} failed {self.retries + 1} time(s); last: {last}")

    def _exchange(self, body: bytes, headers: dict[str, str]):
        """POST ``body`` and read the whole answer (an ``httpx.Response``); raises ``httpx.ReadTimeout`` when the
        exchange takes longer than ``timeout`` seconds in all (httpx's own timeout bounds each phase, so an
        endpoint trickling its answer a byte at a time would otherwise never time out)."""
        import httpx
        deadline = time.monotonic() + self.timeout
        with self._client().stream("POST", self.url, content=body, headers=headers) as response:
            chunks = []
            for chunk in response.iter_bytes():
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"the whole request took longer than {self.timeout:g} s",
                                            request=response.request)
                chunks.append(chunk)
        return httpx.Response(response.status_code, headers=response.headers, content=b"".join(chunks),
                              request=response.request)

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt + 1``: ``backoff * 2**attempt``, jittered by up to +-25%."""
        return self.backoff * 2 ** attempt * (0.75 + 0.5 * random.random())

    def _client(self):
        """The HTTP client, made once and shared by the worker threads (its connection pool is thread-safe)."""
        with self._lock:
            if self._http is None:
                import httpx
                self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=False,
                                          limits=httpx.Limits(max_connections=self.concurrency))
            return self._http

    def _key(self) -> str | None:
        key = os.environ.get(self.key_env) or None
        if key and urlsplit(self.url).scheme == "http" and not is_loopback(urlsplit(self.url).hostname or ""):
            raise InvalidArgumentError("url", self.url, f"an https URL: the key in {self.key_env} is never sent over "
                                                        "plain http to a host other than loopback")
        return key


def _check_url(url: Any) -> str:
    if isinstance(url, str) and url.startswith(PREFIX):
        url = url[len(PREFIX):]
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError("url", url, "the endpoint's http(s) URL, e.g. 'endpoint:https://HOST/score'")
    if parts.username or parts.password:
        raise InvalidArgumentError("url", f"{parts.scheme}://...@{parts.hostname}",
                                   f"a URL without credentials (put the key in ${KEY_ENV})")
    return url


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date); ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text[:_QUOTED] + ("..." if len(text) > _QUOTED else ""))


def check_response(answer: Any, n: int, labels: list[str], name: str) -> list[list[float] | str]:
    """Per row, the probabilities in the order of ``labels`` or the row's error text; raises
    :class:`EndpointSchemaError` for an answer that is not the format: not a list of ``n`` objects, labels that
    are not the (string) labels sent, or probabilities that are not finite numbers in [0, 1] summing to 1
    within :data:`PROB_SUM_TOLERANCE`. ``name`` names the endpoint in the error."""
    def bad(what: str) -> EndpointSchemaError:
        return EndpointSchemaError(f"{name}'s response is not the zero-shot format: {what}")

    if not isinstance(answer, list) or len(answer) != n:
        got = f"a list of {len(answer)}" if isinstance(answer, list) else type(answer).__name__
        raise bad(f"expected a list of {n} row(s), got {got}: {_quote(json.dumps(answer)[:400])}")
    out: list[list[float] | str] = []
    for i, row in enumerate(answer):
        if not isinstance(row, dict):
            raise bad(f"row {i} is {type(row).__name__}, not an object with 'probs' and 'labels'")
        if row.get("probs") is None and isinstance(row.get("error"), str):
            out.append(f"the endpoint could not score it: {row['error']}")
            continue
        got_labels, probs = row.get("labels"), row.get("probs")
        if not isinstance(got_labels, list) or not all(isinstance(label, str) for label in got_labels) or \
                sorted(got_labels) != sorted(labels):
            raise bad(f"row {i} labels {_quote(json.dumps(got_labels))} are not the labels sent {labels}")
        if not isinstance(probs, list) or len(probs) != len(labels) or \
                not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0 <= p <= 1
                        for p in probs):
            raise bad(f"row {i} probs {_quote(json.dumps(probs))} are not {len(labels)} probabilities in [0, 1]")
        if abs(math.fsum(probs) - 1) > PROB_SUM_TOLERANCE:
            raise bad(f"row {i} probs {_quote(json.dumps(probs))} sum to {math.fsum(probs):.6g}, not 1 (within "
                      f"{PROB_SUM_TOLERANCE})")
        index = {label: j for j, label in enumerate(got_labels)}
        out.append([float(probs[index[label]]) for label in labels])
    return out


def _items(images: Any) -> tuple[Any, int | None]:
    """``iter_images`` of ``images`` and their number (a folder listed once)."""
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        files = list_image_files(images)
        return ((str(path), item) for path, (_, item) in zip(files, iter_images(files))), len(files)
    return iter_images(images), source_length(images)


def _result_key(images: Any, key: Any) -> Any:
    """The path of a path item (as :meth:`ClipModel.zero_shot` keys it), else ``key``."""
    if isinstance(key, int):
        item = images if isinstance(images, (str, os.PathLike)) else \
            images[key] if isinstance(images, (list, tuple)) else None
        if isinstance(item, (str, os.PathLike)):
            return os.fspath(item)
    return key


def load_endpoint(url: str, **options: Any) -> EndpointModel:
    """An :class:`EndpointModel` for ``url`` (``"https://HOST/score"`` or ``"endpoint:https://HOST/score"``);
    ``options`` are its keyword arguments (``key_env``, ``batch_size``, ``concurrency``, ``timeout``, ``retries``,
    ``backoff``, ``max_wait``, ``cache``, ``cache_dir``, ``templates``)."""
    return EndpointModel(url, **options)


def load(name: str, pretrained: str | None) -> EndpointModel:
    """What :func:`clipscope.load` does with ``"endpoint:URL"``: the endpoint with default options.

    ``pretrained`` must be ``None``; ``device`` and ``precision`` are the endpoint's business and ignored.
    """
    if pretrained is not None:
        raise InvalidArgumentError("pretrained", pretrained, "None for an endpoint: the endpoint serves one model")
    return load_endpoint(name)
