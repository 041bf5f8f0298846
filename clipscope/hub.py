"""Finding model weights: the local Hugging Face cache first, the hub second, one clear error last.

open_clip and transformers fetch weights through ``huggingface_hub``. Left to
themselves, offline, they retry each file for about half a minute, print every
retry, and (for open_clip's ``hf-hub:`` ids) may carry on with a randomly
initialised model. clipscope therefore resolves the files a model needs itself:
it looks in the cache, makes one short connection check when something is
missing, downloads only then, and otherwise raises :class:`WeightsNotAvailableError`
with one message that says what was looked for, where, and how to get it.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: How long the one connectivity check may take, in seconds.
PROBE_TIMEOUT_S = 3.0


class UnknownModelError(ValueError):
    """The model name (or pretrained tag) is not one clipscope can load."""


class WeightsNotAvailableError(RuntimeError):
    """The weights are neither cached locally nor reachable on the hub."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint would need arbitrary code execution (pickle) to load; it was refused."""


class CheckpointError(ValueError):
    """A weights file or model folder is malformed: empty, truncated, in another format, or its tensors
    do not fit the architecture. The message names the file and what is wrong with it."""


def suggest(name: str, candidates: Sequence[str], n: int = 5) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest ``candidates``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in candidates if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> str:
    """Return the Hugging Face hub cache folder in use."""
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def hub_unreachable_reason() -> str | None:
    """Return why the hub cannot be reached now, or ``None`` if a TCP connection to it opens.

    Never takes longer than :data:`PROBE_TIMEOUT_S`.
    """
    if hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE is set)"
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {constants.ENDPOINT} ({exc.strerror or exc})"


def _cached(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    return path if isinstance(path, str) else None


def ensure_files(display_name: str, repo_id: str, required: Sequence[Sequence[str]],
                 optional: Sequence[str] = (), revision: str | None = None, *,
                 load_call: str | None = None, local_call: str | None = None) -> dict[str, str]:
    """Make sure one file of each group in ``required`` is available locally; return ``{filename: path}``.

    Each group lists alternatives in order of preference (e.g. safetensors before
    a pickle). Files come from the cache when present; otherwise, if the hub is
    reachable, they are downloaded; otherwise :class:`WeightsNotAvailableError`
    is raised. ``optional`` files are fetched when possible and silently left out
    when not. ``load_call`` is the Python call that loads the model and ``local_call`` the one that loads
    a local copy of its weights (see :func:`python_call`), quoted in the error message; they default to
    ``clipscope.load(display_name)`` and an example with a placeholder architecture.
    """
    found: dict[str, str] = {}
    missing: list[Sequence[str]] = []
    for group in required:
        hit = next(((f, p) for f in group if (p := _cached(repo_id, f, revision))), None)
        if hit:
            found[hit[0]] = hit[1]
        else:
            missing.append(group)
    if missing:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise WeightsNotAvailableError(_not_available_message(
                display_name, repo_id, missing, reason, load_call or python_call("clipscope.load", display_name),
                local_call))
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
        for group in missing:
            errors = []
            for filename in group:
                try:
                    found[filename] = hf_hub_download(repo_id, filename, revision=revision)
                    break
                except EntryNotFoundError:
                    errors.append(f"{filename}: not in the repository")
                except (HfHubHTTPError, OSError) as exc:
                    errors.append(f"{filename}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            else:
                raise WeightsNotAvailableError(
                    f"Could not download {' or '.join(group)} for {display_name!r} from the hub repository "
                    f"{repo_id!r}: " + "; ".join(errors))
    for filename in optional:  # fetched only when the hub was needed anyway
        path = found.get(filename) or _cached(repo_id, filename, revision)
        if path is None and missing:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
            try:
                path = hf_hub_download(repo_id, filename, revision=revision)
            except (EntryNotFoundError, HfHubHTTPError, OSError):
                path = None
        if path:
            found[filename] = path
    return found


def python_call(function: str, *args: Any, **kwargs: Any) -> str:
    """Return the Python source of the call ``function(*args, **kwargs)``, arguments written with ``repr``.

    E.g. ``python_call("clipscope.load", "RN50", pretrained="openai")`` is
    ``"clipscope.load('RN50', pretrained='openai')"``: valid code a user can paste.
    """
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{function}({', '.join(parts)})"


def _not_available_message(display_name: str, repo_id: str, missing: Sequence[Sequence[str]],
                           reason: str, load_call: str, local_call: str | None) -> str:
    wanted = "; ".join(" or ".join(group) for group in missing)
    local = local_call or (python_call("clipscope.load", "ViT-B-32", pretrained="/path/to/weights.safetensors")
                           + " with your model's architecture name")
    return (
        f"The weights for {display_name!r} are not in the local cache and cannot be downloaded: {reason}.\n"
        f"  Looked for: {wanted} in the Hugging Face repository {repo_id!r}.\n"
        f"  Cache location: {cache_dir()} (set HF_HOME or HF_HUB_CACHE to use another).\n"
        "  To get them:\n"
        f"    - on a machine with internet, run {load_call} once (or "
        f"`hf download {repo_id}`), then copy the cache folder here; with the files cached, set "
        "HF_HUB_OFFLINE=1 to skip the network entirely;\n"
        f"    - or load a local file: {local}, "
        "or a folder holding open_clip_config.json and the weights: clipscope.load('/path/to/folder');\n"
        "    - or work offline with the built-in model organism: clipscope.load('organism')."
    )


def url_cache_path(url: str) -> Path:
    """Where open_clip keeps a checkpoint downloaded from a plain URL."""
    return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)


def refuse_unsafe(exc: BaseException, path: str) -> UnsafeCheckpointError:
    """Return the error to raise when ``torch.load(weights_only=True)`` refused ``path``."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnsafeCheckpointError(
        f"Refused to load {path!r}: it is a pickle that needs more than plain tensors to load "
        f"(torch.load(weights_only=True) said: {first}). Loading it could run arbitrary code. "
        "If you trust its source, convert it to safetensors first "
        "(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and load that."
    )


#: Suffixes of weights files looked at when a model folder fails to load.
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth")


def is_unsafe_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is ``torch.load(weights_only=True)`` refusing a pickle that needs more than tensors."""
    return "Weights only load failed" in str(exc)


def checkpoint_error(exc: BaseException, path: str, target: str,
                     expected: Callable[[], Mapping[str, tuple[int, ...]]] | None = None) -> Exception:
    """Return the one error to raise when loading the weights at ``path`` into ``target`` failed with ``exc``.

    A refused pickle gives :class:`UnsafeCheckpointError`; anything else a :class:`CheckpointError` that names
    the file and says what is wrong: the file's own defect if it has one (see :func:`checkpoint_problem`),
    otherwise how its tensors fail to fit ``target`` (an architecture's name): compared with the tensor
    shapes ``expected()`` returns when given (missing, unexpected, wrong shape), else as ``exc`` says.
    """
    if is_unsafe_refusal(exc):
        return refuse_unsafe(exc, path)
    problem = checkpoint_problem(path)
    if problem is not None:
        return problem
    summary = ""
    if expected is not None and Path(path).is_file():
        try:
            summary = shape_differences(tensor_shapes(path), expected())
        except Exception:  # noqa: BLE001 - an error path: fall back to what ``exc`` says
            summary = ""
    return CheckpointError(f"Cannot load {path!r}: its tensors do not fit {target} "
                           f"({summary or _fit_summary(exc)}). Is it a checkpoint of another architecture?")


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Return ``{name: shape}`` of the tensors in a readable weights file (a ``state_dict`` entry unwrapped,
    a ``module.`` prefix dropped, as open_clip does); safetensors files are read by their header only."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    else:
        import torch
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(Path(path)))
        content = content.get("state_dict", content) if isinstance(content, dict) else content
        shapes = {k: tuple(v.shape) for k, v in content.items()}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}


def shape_differences(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str:
    """Return one line naming the tensors missing from ``found``, the unexpected ones and those of the wrong
    shape (a few of each, with counts), or ``""`` when the two agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} is {found[k]} in the file, {expected[k]} in the model"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = [f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
             for what, items in (("of the wrong shape", wrong), ("missing", missing), ("unexpected", unexpected))
             if items]
    return "; ".join(parts)


def checkpoint_problem(path: str) -> Exception | None:
    """Return a :class:`CheckpointError` saying what is wrong with the weights file or model folder ``path``,
    or ``None`` when every weights file in it reads as a non-empty dict of tensors.

    A refused pickle gives :class:`UnsafeCheckpointError`. Reads the file again (safetensors: the header only).
    """
    target = Path(path)
    if target.is_dir():
        return _folder_problem(target)
    if not target.is_file():
        return CheckpointError(f"Cannot load {path!r}: no such file.")
    try:
        reason = _file_problem(target)
    except UnsafeCheckpointError as exc:
        return exc
    return CheckpointError(f"Cannot load {path!r}: {reason}.") if reason else None


def _folder_problem(folder: Path) -> Exception | None:
    config = folder / "open_clip_config.json"
    if config.is_file():
        try:
            ok = "model_cfg" in read_json_object(config)
        except CheckpointError as exc:
            return exc
        if not ok:
            return CheckpointError(f"Cannot load {str(config)!r}: it has no 'model_cfg' entry.")
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHTS_SUFFIXES and p.is_file())
    if not weights:
        return CheckpointError(f"Cannot load {str(folder)!r}: the folder holds no weights file "
                               f"({', '.join('*' + s for s in WEIGHTS_SUFFIXES)}).")
    for file in weights:
        problem = checkpoint_problem(str(file))
        if problem is not None:
            return problem
    return None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Return the JSON object in the file ``path`` (a model's config file) as a dict.

    Raises :class:`CheckpointError` naming the file when it cannot be read, is not valid JSON, or holds
    another JSON value than an object.
    """
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"Cannot load {str(path)!r}: cannot read it ({describe_error(exc)}).") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply to parse
        raise CheckpointError(f"Cannot load {str(path)!r}: not valid JSON ({describe_error(exc)}).") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"Cannot load {str(path)!r}: it does not hold a JSON object.")
    return content


def _file_problem(path: Path) -> str | None:
    """What is wrong with one weights file, as a phrase, or ``None`` if it reads; raises a refusal."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    import torch
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # torch raises many types for a corrupt file; each is reported
        if is_unsafe_refusal(exc):
            raise refuse_unsafe(exc, str(path)) from None
        return f"not a readable PyTorch checkpoint, perhaps truncated or in another format ({describe_error(exc)})"
    return _state_dict_problem(content)


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            n_tensors = len(list(handle.keys()))
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        with open(path, "rb") as fh:
            head = fh.read(2)
        hint = " (it is a PyTorch pickle renamed to .safetensors)" if head[:2] in (b"PK", b"\x80\x02") else \
            ", perhaps truncated or in another format"
        return f"not a valid safetensors file{hint}: {describe_error(exc)}"
    return None if n_tensors else "the file holds no tensors"


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _state_dict_problem(content: Any) -> str | None:
    import torch
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        return f"it holds a {type(content).__name__}, not a dict of tensors"
    if not content:
        return "the file holds no tensors"
    bad = next((k for k, v in content.items() if not isinstance(v, torch.Tensor)), None)
    return None if bad is None else f"its entry {bad!r} is a {type(content[bad]).__name__}, not a tensor"


def _fit_summary(exc: BaseException) -> str:
    """The first few problems of a failed ``load_state_dict`` (missing, unexpected, mismatched tensors), one line."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if isinstance(exc, RuntimeError) and lines:
        return "; ".join(_clip(line, 200) for line in lines[:3])
    return f"{type(exc).__name__}: {describe_error(exc)}"


def describe_error(exc: BaseException) -> str:
    """Return ``exc`` as one line, ``"TypeName: message"``, at most 300 characters."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return _clip(f"{type(exc).__name__}: {text}", 300) if text else type(exc).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
