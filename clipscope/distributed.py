"""Multi-process execution on ``torch.distributed``: who this process is, which part of the data it
reads, and how results come back together.

clipscope's big jobs (dataset examples, image embeddings, attack evaluation) are mergeable: every
item is processed alone and the per-item results combine exactly. Under a launcher (``torchrun``,
``accelerate launch``, or ``srun`` with ``MASTER_ADDR``/``MASTER_PORT`` exported) each process reads
one shard of the data, writes its own result atomically into the cache, and the results are
merged; a single process is the same code with a world of one and no process group.

    ctx = context()                        # detects the launcher; world of 1 without one
    shard = split_source(images, ctx)      # this rank's part, with each item's GLOBAL position
    for position, key, image in shard.items():
        ...
    parts = gather_objects(result, ctx)    # every rank's result, in rank order

The data are split by contiguous index ranges (:func:`shard_range`: folders, lists, tensors and
``datasets`` tables, cut as ``datasets.distributed.split_dataset_by_node`` cuts them, optionally in
whole batches) or, for streams, one item out of ``world_size`` (``split_dataset_by_node`` with
``strategy="examples"``): either way every item keeps its position in the whole source, so merges
order ties exactly as one process would, and keys are the ones one process gives (the path for
folders, the position otherwise).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .data import iter_images, list_image_files, load_image_or_error, source_length
from .progress import HiddenBar, ManualBar, manual_bar
from .validate import InvalidArgumentError

__all__ = ["Context", "Shard", "all_reduce_sum", "barrier", "context", "gather_objects", "launched", "main_bar",
           "shard_range", "shutdown", "split_source"]

#: How long a collective waits for the other ranks before failing (a dead rank is reported, not waited on forever):
#: ``$CLIPSCOPE_DIST_TIMEOUT`` seconds, default 30 minutes. torchrun stops the other ranks as soon as one fails;
#: under a bare ``srun`` launch they wait this long for a rank that raised.
TIMEOUT = timedelta(seconds=float(os.environ.get("CLIPSCOPE_DIST_TIMEOUT") or 1800))


@dataclass(frozen=True)
class Context:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node), the
    ``device`` it should compute on, and the process group's ``backend`` (``None``: a single process,
    no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that shows progress and writes reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part (results must be merged)."""
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _launcher_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` set by a launcher, or ``None``.

    torchrun and ``accelerate launch`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``srun`` alone sets
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, used when ``MASTER_ADDR`` is exported too.
    """
    world = _env_int("WORLD_SIZE")
    if world is not None:
        return _env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0
    world = _env_int("SLURM_NTASKS")
    if world is not None and world > 1 and os.environ.get("MASTER_ADDR"):
        return _env_int("SLURM_PROCID") or 0, world, _env_int("SLURM_LOCALID") or 0
    return None


def launched() -> bool:
    """Whether this process runs under a launcher with more than one process (or in a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    env = _launcher_env()
    return env is not None and env[1] > 1


def context(distributed: bool | None = None, *, backend: str | None = None,
            device: str | torch.device | None = None) -> Context:
    """This process's :class:`Context`, joining the process group on first use.

    ``distributed``: ``None`` (default) detects a launcher from the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` as torchrun and accelerate set
    them; ``SLURM_PROCID``/``SLURM_NTASKS`` under srun with ``MASTER_ADDR`` exported); ``True``
    requires one (or a process group already initialized); ``False`` runs as a single process even
    under a launcher. ``backend`` (default ``nccl`` on CUDA, ``gloo`` otherwise) and ``device``
    (default: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``) override the choices.
    An existing process group (e.g. made by ``accelerate``) is used as it is.
    """
    if distributed not in (None, True, False):
        raise InvalidArgumentError("distributed", distributed, "None (detect a launcher), True or False")
    if distributed is False or (distributed is None and not launched()):
        return Context(device=_default_device(device, 0))
    env = _launcher_env()
    if dist.is_initialized():
        local = env[2] if env else 0
        return Context(dist.get_rank(), dist.get_world_size(), local, _default_device(device, local),
                       str(dist.get_backend()))
    if env is None or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise InvalidArgumentError("distributed", distributed,
                                   "True only under a launcher (torchrun, accelerate launch, srun with MASTER_ADDR "
                                   "and MASTER_PORT exported) or after torch.distributed.init_process_group")
    rank, world, local = env
    dev = _default_device(device, local)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT,
                            device_id=dev if backend == "nccl" else None)
    return Context(rank, world, local, dev, backend)


def _default_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def shutdown(ctx: Context | None = None) -> None:
    """Leave the process group this process joined (at the end of a command-line job); nothing for a single
    process (``ctx`` without a backend) or when no group was joined."""
    if (ctx is None or ctx.backend is not None) and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Splitting the data


def shard_range(n: int, rank: int, world_size: int, block: int = 1) -> range:
    """The global positions ``rank`` reads of ``n`` items split over ``world_size`` ranks: contiguous
    ranges in rank order, made of whole blocks of ``block`` items (the last block may be short), the
    first ranks one block longer when the blocks do not divide evenly. With ``block=1`` these are the
    ranges of ``datasets``' ``split_dataset_by_node`` for tables; with ``block=batch_size`` every rank's
    batches are the batches one process would make (so batched results match it bit for bit)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError("rank", rank, f"0..{world_size - 1} with world_size >= 1")
    if block < 1:
        raise InvalidArgumentError("block", block, "a whole number >= 1")
    size, extra = divmod(-(-n // block), world_size)
    start = rank * size + min(rank, extra)
    stop = start + size + (1 if rank < extra else 0)
    return range(min(start * block, n), min(stop * block, n))


@dataclass(frozen=True)
class Shard:
    """One rank's part of a source: the items at global positions ``start, start + step, ...`` up to
    ``stop`` (a contiguous range, ``step`` 1), or, for streams (``stop`` ``None``), every ``world_size``-th
    item from position ``rank`` on.

    :meth:`items` yields ``(position, key, image_or_error)`` with the key one process would give
    (the path in a folder, the global position otherwise).
    """

    source: Any
    rank: int
    world_size: int
    start: int
    stop: int | None
    step: int = 1

    @property
    def positions(self) -> range | None:
        """The global positions of this shard's items, or ``None`` for a stream (unknown length)."""
        return None if self.stop is None else range(self.start, self.stop, self.step)

    def items(self, start: int | None = None) -> Iterator[tuple[int, Any, Any]]:
        """``(global position, key, image or ImageLoadError)`` of this shard's items from global position
        ``start`` on (default: the first; for resuming a partly done shard)."""
        start = self.start if start is None else max(start, self.start)
        if self.stop is None:
            yield from self._stream_items(start)
            return
        source, stop = self.source, self.stop
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            for pos, path in enumerate(list_image_files(source)[start:stop], start):
                yield pos, str(path), load_image_or_error(path)
            return
        if _is_table(source):
            yield from self._table_items(start)
            return
        if isinstance(source, (list, tuple)) or (isinstance(source, torch.Tensor) and source.ndim == 4):
            part = source[start:stop]
        else:                                   # a single image, or another sized iterable
            part = list(itertools.islice(iter_images(source), start, stop))
            for pos, (_key, item) in enumerate(part, start):
                yield pos, pos, item
            return
        for pos, (_key, item) in enumerate(iter_images(part), start):
            yield pos, pos, item

    def _table_items(self, start: int) -> Iterator[tuple[int, Any, Any]]:
        # the contiguous range of this rank (split_dataset_by_node's own cut for block=1; also for other blocks)
        part = self.source.select(range(start, self.stop))
        for i, (_key, item) in enumerate(iter_images(part)):
            yield start + i, start + i, item

    def _stream_items(self, start: int) -> Iterator[tuple[int, Any, Any]]:
        skip = -(-(start - self.rank) // self.step)       # local items already done
        if hasattr(self.source, "features"):
            from datasets.distributed import split_dataset_by_node
            part = split_dataset_by_node(self.source, rank=self.rank, world_size=self.world_size,
                                         strategy="examples")
            local = itertools.islice(iter_images(part), skip, None)
        else:
            local = itertools.islice(iter_images(self.source), self.rank + skip * self.step, None, self.step)
        for i, (_key, item) in enumerate(local, skip):
            pos = self.rank + i * self.step
            yield pos, pos, item


def _is_table(source: Any) -> bool:
    return hasattr(source, "features") and hasattr(source, "select") and hasattr(source, "__len__")


def split_source(source: Any, ctx: Context, block: int = 1) -> Shard:
    """This rank's :class:`Shard` of ``source`` (anything :func:`~clipscope.data.iter_images` reads).

    Sized sources (folders, lists, tensors, ``datasets`` tables) are cut into the contiguous
    :func:`shard_range` of this rank (whole blocks of ``block`` items: pass the batch size to keep the
    batches one process makes); streams (``IterableDataset``, generators) give every rank one item
    out of ``world_size`` (``datasets.distributed.split_dataset_by_node(strategy="examples")``: each
    rank reads the stream and keeps its items), so positions stay exact. A single process gets the
    whole source.
    """
    n = None if _is_stream(source) else source_length(source)
    if n is None:
        return Shard(source, ctx.rank, ctx.world_size, ctx.rank, None, ctx.world_size)
    r = shard_range(n, ctx.rank, ctx.world_size, block)
    return Shard(source, ctx.rank, ctx.world_size, r.start, r.stop)


def _is_stream(source: Any) -> bool:
    return hasattr(source, "features") and not hasattr(source, "__len__")


# ----------------------------------------------------------------------------------------
# Collectives


def barrier(ctx: Context) -> None:
    """Wait until every rank gets here (nothing for a single process)."""
    if ctx.distributed:
        dist.barrier()


def gather_objects(obj: Any, ctx: Context, dst: int | None = None) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order: on every rank (``dst=None``, default), or only on
    rank ``dst`` (the others get ``None``). A single process gets ``[obj]``."""
    if not ctx.distributed:
        return [obj]
    if dst is None:
        out: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(out, obj)
        return out
    out = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_sum(value: int | float, ctx: Context) -> int | float:
    """The sum of ``value`` over all ranks (e.g. items done, for totals), on every rank."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.long, device=ctx.device)
    dist.all_reduce(t)
    return type(value)(t.item())


class _ScaledBar:
    """A rank-0 bar that counts each of its own steps ``scale`` times (ranks hold equal shards), up to ``total``."""

    def __init__(self, bar: ManualBar, scale: int, total: int | None):
        self.bar, self.scale, self.total, self.n = bar, scale, total, 0

    def update(self, n: int = 1) -> Any:
        step = n * self.scale if self.total is None else min(n * self.scale, self.total - self.n)
        self.n += step
        return self.bar.update(step)

    def set_postfix(self, **values: Any) -> Any:
        return self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "_ScaledBar":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.bar.__exit__(*exc)


def main_bar(ctx: Context, show: bool | None, default: bool, desc: str, total: int | None = None) -> ManualBar:
    """A progress bar on rank 0 only, of ``total`` items over ALL ranks; every other rank gets a hidden one.

    Rank 0 advances it by its own items times ``world_size`` (never past ``total``): the shards hold
    equal numbers of items (to one batch) and the ranks run at the same pace, so the bar estimates the
    whole job without a collective per step (which would couple the ranks' pace). Exact totals come
    from the merge.
    """
    if not ctx.is_main:
        return HiddenBar()
    bar = manual_bar(show, default, desc, total=total)
    return bar if ctx.world_size == 1 else _ScaledBar(bar, ctx.world_size, total)
