"""Batch zero-shot scoring in the request/response format of the CLIP zero-shot endpoint.

Request::

    {"input_data": {"columns": ["image", "text"],
                    "index": [0, 1],
                    "data": [[IMAGE, "label1, label2, label3"], [IMAGE2]]}}

``IMAGE`` is base64-encoded image bytes or a local file path. The first row's
text sets the candidate labels for every row (comma-separated). Response: one
``{"probs": [...], "labels": [...]}`` per row, in order; a row whose image cannot
be read gets ``{"probs": null, "labels": [...], "error": "..."}`` and the other
rows are still scored.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from .data import ImageLoadError, load_image


class RequestError(ValueError):
    """The request as a whole is malformed (no row can be scored)."""


def parse_labels(text: str) -> list[str]:
    """Split a comma-separated label string into stripped, non-empty labels."""
    return [part.strip() for part in text.split(",") if part.strip()]


def decode_image(value: Any):
    """Return the RGB PIL image for a base64 string or a local path; raises ImageLoadError."""
    if not isinstance(value, str) or not value:
        raise ImageLoadError(f"image must be a base64 string or a file path, got {type(value).__name__}")
    if os.path.isfile(value):
        return load_image(value)
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError("neither an existing file path nor valid base64") from None
    return load_image(raw)


def _rows(request: dict) -> tuple[list[list[Any]], int, int | None]:
    if not isinstance(request, dict) or "input_data" not in request:
        raise RequestError("request must be a JSON object with an 'input_data' key")
    body = request["input_data"]
    if not isinstance(body, dict):
        raise RequestError("'input_data' must be an object with 'columns' and 'data'")
    columns = body.get("columns", ["image", "text"])
    if "image" not in columns:
        raise RequestError(f"'columns' must include 'image'; got {columns}")
    data = body.get("data")
    if not isinstance(data, list) or not data:
        raise RequestError("'input_data.data' must be a non-empty list of rows")
    text_col = columns.index("text") if "text" in columns else None
    return data, columns.index("image"), text_col


def score(request: dict | str | os.PathLike, model, *, batch_size: int = 64) -> list[dict[str, Any]]:
    """Score a batch request (a dict, a JSON string, or a path to a JSON file) with ``model``.

    Returns one dict per row: ``probs`` (floats summing to 1, one per label, or
    ``None`` for a bad row), ``labels`` and, for bad rows, ``error``.
    """
    if isinstance(request, (str, os.PathLike)):
        text = Path(request).read_text() if os.path.isfile(request) else str(request)
        try:
            request = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"request is not valid JSON ({exc})") from None
    data, image_col, text_col = _rows(request)
    first = data[0]
    if text_col is None or not isinstance(first, list) or len(first) <= text_col \
            or not isinstance(first[text_col], str) or not parse_labels(first[text_col]):
        raise RequestError("the first row must carry the labels as text, e.g. [IMAGE, \"cat, dog\"]")
    labels = parse_labels(first[text_col])
    images, positions, results = [], [], []
    for i, row in enumerate(data):
        try:
            if not isinstance(row, list) or len(row) <= image_col:
                raise ImageLoadError("row has no image")
            images.append(decode_image(row[image_col]))
            positions.append(i)
            results.append(None)
        except ImageLoadError as exc:
            results.append({"probs": None, "labels": labels, "error": f"row {i}: {exc}"})
    if images:
        probs = model.zero_shot(images, labels, batch_size=batch_size, progress=False).probs
        for pos, p in zip(positions, probs.tolist()):
            results[pos] = {"probs": p, "labels": labels}
    return results


def encode_file(path: str | os.PathLike) -> str:
    """Return the base64 text of a file's bytes (to build requests)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
