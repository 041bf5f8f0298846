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
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

#: How long the one connectivity check may take, in seconds.
PROBE_TIMEOUT_S = 3.0


class UnknownModelError(ValueError):
    """The model name (or pretrained tag) is not one clipscope can load."""


class WeightsNotAvailableError(RuntimeError):
    """The weights are neither cached locally nor reachable on the hub."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint would need arbitrary code execution (pickle) to load; it was refused."""


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
                 optional: Sequence[str] = (), revision: str | None = None) -> dict[str, str]:
    """Make sure one file of each group in ``required`` is available locally; return ``{filename: path}``.

    Each group lists alternatives in order of preference (e.g. safetensors before
    a pickle). Files come from the cache when present; otherwise, if the hub is
    reachable, they are downloaded; otherwise :class:`WeightsNotAvailableError`
    is raised. ``optional`` files are fetched when possible and silently left out
    when not.
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
            raise WeightsNotAvailableError(_not_available_message(display_name, repo_id, missing, reason))
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


def _not_available_message(display_name: str, repo_id: str, missing: Sequence[Sequence[str]],
                           reason: str) -> str:
    wanted = "; ".join(" or ".join(group) for group in missing)
    return (
        f"The weights for {display_name!r} are not in the local cache and cannot be downloaded: {reason}.\n"
        f"  Looked for: {wanted} in the Hugging Face repository {repo_id!r}.\n"
        f"  Cache location: {cache_dir()} (set HF_HOME or HF_HUB_CACHE to use another).\n"
        "  To get them:\n"
        f"    - on a machine with internet, run clipscope.load({display_name!r}) once (or "
        f"`hf download {repo_id}`), then copy the cache folder here; with the files cached, set "
        "HF_HUB_OFFLINE=1 to skip the network entirely;\n"
        "    - or load a local file: clipscope.load(ARCH, pretrained='/path/to/weights.safetensors'), "
        "or a folder holding open_clip_config.json and the weights;\n"
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
