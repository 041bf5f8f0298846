"""Batch zero-shot scoring in the request/response format of the CLIP zero-shot endpoint.

Request::

    {"input_data": {"columns": ["image", "text"],
                    "index": [0, 1],
                    "data": [[IMAGE, "label1, label2, label3"], [IMAGE2]]}}

``IMAGE`` is base64-encoded image bytes (optionally as a ``data:`` URI), a public
``http``/``https`` URL, or a local file path (trusted requests only: pass
``allow_local_files=False`` for a request from someone else, and no local file is
ever read or even looked up). The first row's text sets the candidate labels for
every row (comma-separated). Response: one ``{"probs": [...], "labels": [...]}``
per row, in order; a row whose image cannot be read or fetched gets
``{"probs": null, "labels": [...], "error": "row i: ..."}`` and the other rows are
still scored.

The request's shape is validated once, up front (:func:`parse_request`): a
malformed request raises :class:`RequestError` naming the bad field, e.g.
``input_data.data[3][0]: Input should be a valid string (got 5)``.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import json
import os
import re
import reprlib
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .data import ImageLoadError, load_image, ordered_map
from .validate import InvalidArgumentError, check_int, check_number

#: Largest image body fetched from a URL, in bytes; a bigger response is a per-row error.
MAX_URL_BYTES = 20 * 1024 * 1024
#: Seconds allowed for fetching one URL (connecting, waiting and reading, all together).
URL_TIMEOUT_S = 10.0
#: URL schemes an image cell may use; redirects may only lead to these too.
URL_SCHEMES = ("http", "https")
#: Rows decoded (and URLs fetched) at the same time.
DECODE_WORKERS = 8
#: Schema problems listed in one RequestError before the rest are counted.
MAX_LISTED_PROBLEMS = 5

_UNTRUSTED_PATH = ("not valid base64, and local file paths are not allowed in an untrusted request "
                   "(send the image as base64, a data: URI or an http(s) URL)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_READ_CHUNK = 64 * 1024


class RequestError(ValueError):
    """The request as a whole is malformed (no row can be scored)."""


class _InputData(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    columns: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"])
    index: list[Any] = Field(default_factory=list)
    data: list[list[str]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_data: _InputData


_FIELDS = {(): list(_Request.model_fields), ("input_data",): list(_InputData.model_fields)}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: the candidate ``labels`` and each row's image cell (``None`` if the row has none)."""

    labels: list[str]
    images: list[str | None]


def parse_labels(text: str) -> list[str]:
    """Split a comma-separated label string into stripped, non-empty labels."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_request(request: Mapping[str, Any] | str | os.PathLike) -> ParsedRequest:
    """Validate a request (a dict, JSON text, or the path of a JSON file) and return its labels and image cells.

    A string is read as JSON text when it looks like JSON (starts with ``{``, ``[`` or ``"``),
    else as a file path when such a file exists or it looks like a path (ends with ``.json``
    or contains a path separator). Raises :class:`RequestError` naming the problem.
    """
    if isinstance(request, (str, os.PathLike)):
        request = _parse_json(_request_text(request))
    try:
        body = _Request.model_validate(request).input_data
    except ValidationError as exc:
        raise RequestError(_schema_message(exc)) from None
    return _check_body(body)


def _request_text(source: str | os.PathLike) -> str:
    if isinstance(source, os.PathLike):
        return _read_request_file(Path(source))
    if _looks_like_json(source):
        return source
    if os.path.isfile(source) or _looks_like_path(source):
        return _read_request_file(Path(source))
    return source


def _looks_like_json(text: str) -> bool:
    stripped = text.lstrip()
    return stripped[:1] in ("{", "[", '"')


def _looks_like_path(text: str) -> bool:
    separators = {"/", os.sep, os.altsep} - {None}
    return text.lower().endswith(".json") or any(sep in text for sep in separators)


def _read_request_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RequestError(f"request file not found: {path}") from None
    except IsADirectoryError:
        raise RequestError(f"request path is a folder, not a JSON file: {path}") from None
    except (OSError, ValueError) as exc:
        raise RequestError(f"cannot read request file {path} ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request file {path} is not UTF-8 text "
                           f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError("request is not valid JSON (nested too deeply to parse)") from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python's digit limit
        raise RequestError(f"request is not valid JSON ({exc})") from None


def _schema_message(exc: ValidationError) -> str:
    problems = [f"{_location(err['loc'])}: {_describe(err)}" for err in exc.errors(include_url=False)]
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return "invalid request: " + listed + (f"; and {more} more problem(s)" if more > 0 else "")


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "request"


def _describe(err: dict) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return f"unknown field (valid fields: {', '.join(_FIELDS.get(loc[:-1], []))})"
    if kind == "model_type" and not loc:
        return f"the request must be a JSON object with an 'input_data' key (got {_short(err.get('input'))})"
    return f"{err['msg']} (got {_short(err.get('input'))})"


def _short(value: Any) -> str:
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, 60, 60
    return shortener.repr(value)


def _check_body(body: _InputData) -> ParsedRequest:
    columns, data = body.columns, body.data
    if "image" not in columns:
        raise RequestError(f"input_data.columns: must include 'image' (got {columns})")
    if len(set(columns)) != len(columns):
        raise RequestError(f"input_data.columns: each column may appear once (got {columns})")
    if not data:
        raise RequestError("input_data.data: must be a non-empty list of rows")
    if "index" in body.model_fields_set and len(body.index) != len(data):
        raise RequestError(f"input_data.index: has {len(body.index)} entries but input_data.data has "
                           f"{len(data)} rows")
    for i, row in enumerate(data):
        if len(row) > len(columns):
            raise RequestError(f"input_data.data[{i}]: the row has {len(row)} cells but columns {columns} "
                               f"name {len(columns)}")
    image_col = columns.index("image")
    images = [row[image_col] if len(row) > image_col else None for row in data]
    return ParsedRequest(_first_row_labels(data[0], columns), images)


def _first_row_labels(first: list[str], columns: list[str]) -> list[str]:
    text_col = columns.index("text") if "text" in columns else None
    labels = parse_labels(first[text_col]) if text_col is not None and len(first) > text_col else []
    if not labels:
        raise RequestError('input_data.data[0]: the first row must carry the labels as text, '
                           'e.g. [IMAGE, "cat, dog"]')
    dupes = sorted(label for label, n in Counter(labels).items() if n > 1)
    if dupes:
        raise RequestError(f"input_data.data[0][{text_col}]: each label may appear once; repeated: {dupes}")
    return labels


def decode_image(value: str, *, allow_local_files: bool = True, url_timeout: float = URL_TIMEOUT_S,
                 max_url_bytes: int = MAX_URL_BYTES) -> Image.Image:
    """Return the RGB PIL image for one image cell; raises :class:`~clipscope.data.ImageLoadError`.

    The cell is an ``http``/``https`` URL (fetched, see :func:`fetch_url`), a ``data:`` URI,
    base64 text or, when ``allow_local_files``, the path of a local image file. Without
    ``allow_local_files`` (an untrusted request) no path is looked up, so the error for a path does
    not depend on whether it exists, and URLs may only reach hosts on the public internet.
    """
    if not isinstance(value, str) or not value:
        raise ImageLoadError(f"the image must be a non-empty string, got {_short(value)}")
    scheme = _url_scheme(value)
    if scheme in URL_SCHEMES:
        return load_image(fetch_url(value, timeout=url_timeout, max_bytes=max_url_bytes,
                                    public_only=not allow_local_files))
    if scheme is not None:
        raise _unsupported_scheme(scheme)
    if value.startswith("data:"):
        raw = _base64_bytes(value.split(",", 1)[1] if "," in value else "")
        if raw is None:
            raise ImageLoadError("the data: URI does not carry valid base64")
        return load_image(raw)
    if allow_local_files and os.path.isfile(value):
        return load_image(value)
    raw = _base64_bytes(value)
    if raw is not None:
        return load_image(raw)
    raise ImageLoadError("neither an existing file path nor valid base64" if allow_local_files else _UNTRUSTED_PATH)


def _url_scheme(value: str) -> str | None:
    match = _SCHEME.match(value)
    return match.group(1).lower() if match else None


def _unsupported_scheme(scheme: str | None) -> ImageLoadError:
    return ImageLoadError(f"URL scheme {scheme!r} is not supported; image URLs must be {' or '.join(URL_SCHEMES)}")


def _base64_bytes(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) URLs (the standard handler also follows ftp: ones)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _url_scheme(newurl) not in URL_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"{msg} - Redirection to url {newurl!r} is not allowed",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def is_public_address(address: str) -> bool:
    """True when the IP ``address`` is globally routable: not loopback, private, link-local (cloud
    metadata services live there), shared, reserved or multicast; IPv4-mapped IPv6 is judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _NonPublicAddress(ImageLoadError):
    """An untrusted request's URL (or a redirect) led to a host that is not on the public internet."""


def _check_peer(connection: http.client.HTTPConnection) -> None:
    peer = connection.sock.getpeername()[0]
    if not is_public_address(peer):
        connection.close()
        raise _NonPublicAddress(f"the host {connection.host!r} is not a public address ({peer}); "
                                f"untrusted requests may only fetch URLs on the public internet")


class _PublicHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _check_peer(self)  # after the TCP connect (so DNS answers cannot be swapped), before any request is sent


class _PublicHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _check_peer(self)


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PublicHTTPSConnection, req)


def _http_opener(public_only: bool = False) -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()
    http_handler, https_handler = ((_PublicHTTPHandler(), _PublicHTTPSHandler()) if public_only
                                   else (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()))
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), http_handler,
                    https_handler, urllib.request.HTTPDefaultErrorHandler(), _HttpRedirectsOnly(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def fetch_url(url: str, *, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_URL_BYTES,
              public_only: bool = False) -> bytes:
    """Return the body of an ``http``/``https`` image URL; raises :class:`~clipscope.data.ImageLoadError`.

    The response must have an ``image/*`` content type and at most ``max_bytes`` bytes, and
    arrive within about ``timeout`` seconds (connecting, waiting and reading). Redirects are
    followed only to http(s) URLs. ``public_only`` (for untrusted requests) refuses hosts that are
    not on the public internet (:func:`is_public_address`, checked on the connected peer, redirects
    included), so a request cannot reach loopback, private or link-local services. Without network
    access this fails at once (or after ``timeout``) with "URLs need network access".
    """
    scheme = _url_scheme(url)
    if scheme not in URL_SCHEMES:
        raise _unsupported_scheme(scheme)
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "clipscope", "Accept": "image/*"})
        with _http_opener(public_only).open(request, timeout=timeout) as response:
            _check_headers(url, response.headers, max_bytes)
            return _read_capped(url, response, max_bytes, deadline, timeout)
    except _NonPublicAddress as exc:
        raise ImageLoadError(f"cannot fetch URL {url}: {exc}") from None
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageLoadError(f"cannot fetch URL {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ImageLoadError(f"cannot fetch URL {url}: URLs need network access ({reason})") from None
    except (http.client.HTTPException, ValueError) as exc:
        raise ImageLoadError(f"cannot fetch URL {url}: {type(exc).__name__} ({exc})") from None


def _check_headers(url: str, headers, max_bytes: int) -> None:
    kind = headers.get_content_type() if headers.get("Content-Type") else None
    if kind is None or not kind.startswith("image/"):
        raise ImageLoadError(f"URL {url} is not an image: content type {kind!r}, expected image/*")
    length = headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise ImageLoadError(f"URL {url} is larger than the cap of {max_bytes} bytes ({length} bytes declared)")


def _read_capped(url: str, response, max_bytes: int, deadline: float, timeout: float) -> bytes:
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise ImageLoadError(f"cannot fetch URL {url}: URLs need network access (timed out: the response "
                                 f"took longer than {timeout:g} s)")
        chunk = response.read1(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageLoadError(f"URL {url} is larger than the cap of {max_bytes} bytes")


def score(request: Mapping[str, Any] | str | os.PathLike | ParsedRequest, model, *, batch_size: int = 64,
          allow_local_files: bool = True, url_timeout: float = URL_TIMEOUT_S,
          max_url_bytes: int = MAX_URL_BYTES) -> list[dict[str, Any]]:
    """Score a batch request (a dict, JSON text, a path to a JSON file, or a :class:`ParsedRequest`) with ``model``.

    ``allow_local_files=False`` is for requests from someone else: image cells may then only be
    base64, ``data:`` URIs or http(s) URLs of hosts on the public internet (no loopback, private or
    link-local address, also not through a redirect). URLs are fetched with ``url_timeout`` seconds and at
    most ``max_url_bytes`` bytes each. Returns one dict per row: ``probs`` (floats summing to 1,
    one per label, or ``None`` for a bad row), ``labels`` and, for bad rows, ``error``
    (``"row i: reason"``). Raises :class:`RequestError` for a malformed request.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    if not isinstance(allow_local_files, bool):
        raise InvalidArgumentError("allow_local_files", allow_local_files, "True or False")
    url_timeout = check_number("url_timeout", url_timeout, low=0, low_open=True)
    max_url_bytes = check_int("max_url_bytes", max_url_bytes, low=1)
    parsed = request if isinstance(request, ParsedRequest) else parse_request(request)
    labels = parsed.labels

    def decode(cell: str | None) -> Image.Image | ImageLoadError:
        try:
            if cell is None:
                raise ImageLoadError("the row has no image")
            return decode_image(cell, allow_local_files=allow_local_files, url_timeout=url_timeout,
                                max_url_bytes=max_url_bytes)
        except ImageLoadError as exc:
            return exc

    workers = min(DECODE_WORKERS, len(parsed.images))
    decoded = list(ordered_map(decode, parsed.images, workers=workers))
    results: list[dict[str, Any] | None] = [
        _error_row(i, labels, item) if isinstance(item, ImageLoadError) else None for i, item in enumerate(decoded)]
    rows = [i for i, item in enumerate(decoded) if not isinstance(item, ImageLoadError)]
    if rows:
        scored = model.zero_shot([decoded[i] for i in rows], labels, batch_size=batch_size, progress=False)
        for key, probs in zip(scored.keys, scored.probs.tolist()):
            results[rows[key]] = {"probs": probs, "labels": labels}
        for key, reason in scored.skipped:
            results[rows[key]] = _error_row(rows[key], labels, reason)
    return results


def _error_row(i: int, labels: list[str], reason: Any) -> dict[str, Any]:
    return {"probs": None, "labels": labels, "error": f"row {i}: {reason}"}


def encode_file(path: str | os.PathLike) -> str:
    """Return the base64 text of a file's bytes (to build requests)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
