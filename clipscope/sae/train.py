"""Training a sparse autoencoder on one site's activations, streamed from the model.

:func:`train_sae` is the one entry point. Rows (:mod:`clipscope.sae.buffer`) come either straight from
the model, one image batch at a time, mixed in a bounded shuffle pool (``buffer_dir=None``: every epoch
runs the model again), or from the resumable on-disk buffer (``buffer_dir``: the model runs once, epochs
read shards in a seeded order). The full activation set is never in memory.

- **TopK** (Gao et al. 2024): ``f = ReLU(TopK(pre))``; loss the normalized MSE (squared error over the batch's
  variance); decoder rows kept unit norm (gradient projected, rows renormalized after each step); ``b_dec``
  starts at the geometric median of the first batch; the encoder starts as the decoder's transpose. Latents
  silent for ``dead_after`` rows are *dead* and, when ``aux_k > 0``, the AuxK loss (the top ``aux_k`` dead
  latents reconstruct the residual, weight ``aux_coefficient``) gives them a gradient again.
- **ReLU + L1** (Bricken et al. 2023, with Anthropic's decoder-norm-weighted penalty): loss
  ``|x - x^|^2 + l1 * sum_i f_i |W_dec[i]|``; the decoder trains free and its norms are folded into the
  encoder at the end (:meth:`~clipscope.sae.SparseAutoencoder.fold_decoder_norms`), so rows are unit norm.

Inputs are scaled by ``input_scale = sqrt(d_in / mean |x|^2)`` measured on the first batch, so that
hyper-parameters (``l1``, ``lr``) carry over between sites. Everything random is drawn from ``seed``:
the same call gives the same SAE (on the CPU bit for bit).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from clipscope.data import source_length
from clipscope.progress import manual_bar
from clipscope.sae.autoencoder import ACTIVATIONS, SparseAutoencoder
from clipscope.sae.buffer import ActivationBuffer, check_site, shuffled_batches, stream_rows
from clipscope.validate import InvalidArgumentError, check_choice, check_int, check_number

__all__ = ["TrainingLog", "geometric_median", "train_on_rows", "train_sae"]


@dataclass
class TrainingLog:
    """What :func:`train_sae` did: one ``history`` entry per optimizer step, and totals.

    ``history`` rows hold ``step``, ``epoch``, ``rows`` (seen so far), ``loss``, ``fvu`` (the batch's fraction
    of variance unexplained, 1 - explained variance), ``l0`` (mean active latents per row) and ``dead``
    (fraction of latents silent for ``dead_after`` rows). ``seconds`` is the optimization time (model forward
    passes included when streaming), ``buffer_seconds`` the time spent writing the buffer.
    """

    site: str
    activation: str
    n_features: int
    epochs: int
    rows_per_epoch: int = 0
    n_images: int = 0
    skipped: list[tuple[Any, str]] = field(default_factory=list)
    seconds: float = 0.0
    buffer_seconds: float = 0.0
    buffer_folder: str | None = None
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def rows_per_second(self) -> float:
        """Training throughput: rows (activation vectors) optimized per second over all epochs."""
        return self.rows_per_epoch * self.epochs / self.seconds if self.seconds else float("nan")

    def to_frame(self):
        """The history as a DataFrame, one row per step."""
        import pandas as pd
        return pd.DataFrame(self.history, columns=["step", "epoch", "rows", "loss", "fvu", "l0", "dead"])

    def plot(self):
        """Loss, fraction of variance unexplained and L0 against rows seen; returns the figure."""
        import matplotlib.pyplot as plt
        frame = self.to_frame()
        fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
        for ax, column in zip(axes, ("loss", "fvu", "l0")):
            ax.plot(frame["rows"], frame[column])
            ax.set_xlabel("rows seen")
            ax.set_title(column)
        fig.suptitle(f"SAE training on {self.site} ({self.activation}, {self.n_features} features)")
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        last = self.history[-1] if self.history else {}
        return (f"<p><b>SAE training</b> on <code>{self.site}</code>: {self.activation}, {self.n_features} features, "
                f"{self.epochs} epoch(s) of {self.rows_per_epoch} rows from {self.n_images} images "
                f"({len(self.skipped)} skipped); {self.steps} steps in {self.seconds:.1f} s "
                f"({self.rows_per_second:.0f} rows/s); last batch: FVU {last.get('fvu', float('nan')):.3f}, "
                f"L0 {last.get('l0', float('nan')):.1f}, dead {last.get('dead', float('nan')):.2%}</p>")


def geometric_median(x: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The point minimizing the sum of Euclidean distances to the rows of ``x`` ``(n, d)`` (Weiszfeld's
    iterations from the mean); returns ``(d,)`` in ``x``'s dtype."""
    point = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (x - point).norm(dim=1).clamp_min(1e-8)
        point = (weights[:, None] * x).sum(dim=0) / weights.sum()
    return point


@dataclass
class _Settings:
    activation: str
    k: int | None
    l1: float
    lr: float
    batch_size: int
    aux_k: int
    aux_coefficient: float
    dead_after: int


def _settings(n_features: int, d_in: int, activation: str, k: int | None, l1: float | None, lr: float | None,
              batch_size: int, aux_k: int | None, aux_coefficient: float, dead_after: int) -> _Settings:
    """Check the optimization arguments; returns them with defaults filled in."""
    check_choice("activation", activation, ACTIVATIONS)
    if activation == "topk":
        k = check_int("k", k, low=1, high=n_features)
        if l1 is not None:
            raise InvalidArgumentError("l1", l1, "None for activation='topk' (TopK sets sparsity with k)")
        aux_k = min(d_in // 2, n_features) if aux_k is None else check_int("aux_k", aux_k, low=0, high=n_features)
        l1 = 0.0
    else:
        if k is not None:
            raise InvalidArgumentError("k", k, "None for activation='relu' (the L1 weight l1 sets sparsity)")
        if aux_k:
            raise InvalidArgumentError("aux_k", aux_k, "None or 0 for activation='relu' (AuxK is for TopK)")
        l1 = check_number("l1", 5.0 if l1 is None else l1, low=0)
        aux_k = 0
    lr = check_number("lr", 2e-4 * math.sqrt(2 ** 14 / n_features) if lr is None else lr, low=0, low_open=True)
    return _Settings(activation, k, l1, lr, check_int("batch_size", batch_size, low=1), aux_k,
                     check_number("aux_coefficient", aux_coefficient, low=0),
                     check_int("dead_after", dead_after, low=1))


def train_sae(model, source: Any, site: str, *, n_features: int, activation: str = "topk", k: int | None = None,
              l1: float | None = None, tokens: str = "all", epochs: int = 1, batch_size: int = 1024,
              lr: float | None = None, seed: int = 0, buffer_dir: str | os.PathLike | None = None,
              fingerprint: str | None = None, images_per_shard: int = 256, image_batch_size: int = 64,
              shuffle_rows: int | None = None, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
              dead_after: int = 20_000, on_shard: Callable[[int], None] | None = None,
              progress: bool | None = None) -> tuple[SparseAutoencoder, TrainingLog]:
    """Train a sparse autoencoder on the rows of ``site`` over the images of ``source``.

    Returns ``(sae, log)``: the trained :class:`~clipscope.sae.SparseAutoencoder` (on the model's device,
    float32) and a :class:`TrainingLog`.

    Parameters
    ----------
    model: a :class:`~clipscope.ClipModel`; the SAE trains on its device.
    source: anything :func:`~clipscope.data.iter_images` reads; unreadable items are skipped and listed.
    site: an image-tower ``conv`` (one row per spatial position), ``tokens`` (per token, see ``tokens``) or
        ``vector`` site.
    n_features: latents F. activation: ``"topk"`` (needs ``k``) or ``"relu"`` (``l1``, default 5.0).
    tokens: which tokens of a tokens site become rows: ``"all"``, ``"patches"`` or ``"class"``.
    epochs: passes over the data. batch_size: rows per optimizer step. lr: Adam's learning rate
        (default ``2e-4 * sqrt(2**14 / F)``, Gao et al.'s scaling).
    buffer_dir: where the on-disk activation buffer lives (resumable, reused when complete); ``None`` streams
        from the model every epoch. fingerprint: names the data set for the buffer when ``source`` is a stream.
    images_per_shard: source items per buffer shard. image_batch_size: images per forward pass.
    shuffle_rows: rows mixed together before batching (default ``16 * batch_size``).
    aux_k / aux_coefficient / dead_after: the AuxK loss for TopK (default ``aux_k = d_in // 2``; 0 turns it
        off), its weight, and the rows a latent must stay silent to count as dead.
    on_shard: called with each buffer shard's index after it is written (e.g. to report progress).
    """
    d_in = check_site(model, site, tokens)
    settings = _settings(check_int("n_features", n_features, low=1), d_in, activation, k, l1, lr, batch_size,
                         aux_k, aux_coefficient, dead_after)
    epochs = check_int("epochs", epochs, low=1)
    shuffle_rows = check_int("shuffle_rows", 16 * settings.batch_size if shuffle_rows is None else shuffle_rows, low=1)
    image_batch_size = check_int("image_batch_size", image_batch_size, low=1)
    if buffer_dir is None and epochs > 1 and isinstance(source, Iterator):
        raise InvalidArgumentError("buffer_dir", None, "a folder: a one-shot stream cannot be read for more than one "
                                                       "epoch without the on-disk buffer")
    sae = SparseAutoencoder(site, d_in, n_features, activation=activation, k=settings.k, tokens=tokens,
                            seed=check_int("seed", seed))
    log = TrainingLog(site, activation, n_features, epochs)
    epoch_rows = _epoch_rows(model, source, site, tokens, log, buffer_dir=buffer_dir, fingerprint=fingerprint,
                             images_per_shard=check_int("images_per_shard", images_per_shard, low=1),
                             image_batch_size=image_batch_size, on_shard=on_shard, progress=progress)
    _fit(sae.to(model.device), settings, epoch_rows, epochs, seed, shuffle_rows, log, progress)
    return sae, log


def train_on_rows(rows: torch.Tensor, *, n_features: int, site: str = "rows", activation: str = "topk",
                  k: int | None = None, l1: float | None = None, epochs: int = 1, batch_size: int = 1024,
                  lr: float | None = None, seed: int = 0, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                  dead_after: int = 20_000, progress: bool | None = None) -> tuple[SparseAutoencoder, TrainingLog]:
    """Train a sparse autoencoder on rows already in memory: ``rows`` ``(N, d_in)`` (a precomputed activation
    matrix, synthetic data); every epoch is a seeded permutation of all rows. Trains on ``rows``' device.
    ``site`` is recorded in the SAE; the other arguments are :func:`train_sae`'s. Returns ``(sae, log)``."""
    if not (isinstance(rows, torch.Tensor) and rows.ndim == 2 and rows.shape[0] > 0 and rows.is_floating_point()):
        shown = f"tensor {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else rows
        raise InvalidArgumentError("rows", shown,
                                   "a non-empty floating-point (N, d_in) tensor")
    settings = _settings(check_int("n_features", n_features, low=1), rows.shape[1], activation, k, l1, lr,
                         batch_size, aux_k, aux_coefficient, dead_after)
    epochs = check_int("epochs", epochs, low=1)
    sae = SparseAutoencoder(site, rows.shape[1], n_features, activation=activation, k=settings.k,
                            seed=check_int("seed", seed))
    log = TrainingLog(site, activation, n_features, epochs, rows_per_epoch=rows.shape[0])
    _fit(sae.to(rows.device), settings, lambda generator: iter([rows]), epochs, seed, rows.shape[0], log, progress)
    return sae, log


def _fit(sae: SparseAutoencoder, settings: _Settings, epoch_rows, epochs: int, seed: int, shuffle_rows: int,
         log: TrainingLog, progress: bool | None) -> None:
    """Optimize ``sae`` on ``epochs`` epochs of ``epoch_rows(generator)`` chunks, mixed ``shuffle_rows`` at a time;
    folds decoder norms of a ReLU SAE at the end."""
    _optimize(sae, settings, epoch_rows, epochs, seed, shuffle_rows, log, progress)
    if settings.activation == "relu":
        sae.fold_decoder_norms()


def _epoch_rows(model, source: Any, site: str, tokens: str, log: TrainingLog, *, buffer_dir, fingerprint,
                images_per_shard: int, image_batch_size: int, on_shard, progress) -> Callable[[torch.Generator],
                                                                                              Iterator[torch.Tensor]]:
    """A function giving one epoch's chunks of rows (drawing any shard order from the generator); fills the
    buffer first when there is one, and records the data's size and skipped items in ``log``."""
    if buffer_dir is None:
        def stream(generator: torch.Generator) -> Iterator[torch.Tensor]:
            rows, items, skipped = 0, 0, []
            for batch in stream_rows(model, source, site, tokens=tokens, image_batch_size=image_batch_size):
                skipped.extend(batch.skipped)
                items = batch.consumed
                if batch.rows is not None:
                    rows += batch.rows.shape[0]
                    yield batch.rows
            log.rows_per_epoch, log.n_images, log.skipped = rows, items - len(skipped), skipped
        return stream
    buffer = ActivationBuffer.open(model, source, site, tokens=tokens, buffer_dir=buffer_dir,
                                   images_per_shard=images_per_shard, fingerprint=fingerprint)
    started = time.perf_counter()
    total = source_length(source)
    with manual_bar(progress, True, "SAE activation buffer", total=total) as bar:
        bar.update(min(buffer.shards_written() * images_per_shard, total or 0))
        manifest = buffer.fill(model, source, site, tokens=tokens, image_batch_size=image_batch_size,
                               on_shard=on_shard, bar=bar)
    log.buffer_seconds = time.perf_counter() - started
    log.buffer_folder = str(buffer.folder)
    log.rows_per_epoch = manifest["n_rows"]
    log.skipped = [tuple(s) for s in manifest["skipped"]]
    log.n_images = manifest["n_items"] - len(log.skipped)
    return lambda generator: buffer.epoch_chunks(manifest["n_shards"], generator)


def _optimize(sae: SparseAutoencoder, settings: _Settings, epoch_rows, epochs: int, seed: int, shuffle_rows: int,
              log: TrainingLog, progress: bool | None) -> None:
    """Run the optimizer over ``epochs`` epochs of shuffled batches, appending to ``log.history``."""
    optimizer = None
    silent = torch.zeros(sae.n_features, dtype=torch.long, device=sae.W_dec.device)  # rows since each latent fired
    rows_seen = 0
    started = time.perf_counter()
    known = log.rows_per_epoch * epochs or None   # unknown while streaming
    with manual_bar(progress, True, "SAE training", total=known) as bar:
        for epoch in range(epochs):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            for x in shuffled_batches(epoch_rows(generator), settings.batch_size, shuffle_rows, generator):
                x = x.to(sae.W_dec.device, torch.float32)
                if optimizer is None:
                    _initialize(sae, x)
                    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
                record = _step(sae, optimizer, settings, x, silent)
                rows_seen += x.shape[0]
                log.history.append({"step": len(log.history), "epoch": epoch, "rows": rows_seen, **record})
                bar.update(x.shape[0])
    if optimizer is None:
        raise InvalidArgumentError("source", "(no rows)", "a source with at least one readable image")
    log.seconds = time.perf_counter() - started


@torch.no_grad()
def _initialize(sae: SparseAutoencoder, x: torch.Tensor) -> None:
    """Set ``input_scale`` (mean squared norm of the scaled rows = d_in) and ``b_dec`` (geometric median of
    the scaled rows) from the first batch ``x``."""
    mean_square = float(x.pow(2).sum(dim=1).mean())
    sae.input_scale = math.sqrt(sae.d_in / mean_square) if mean_square > 0 else 1.0
    sae.b_dec.copy_(geometric_median(x * sae.input_scale))


def _step(sae: SparseAutoencoder, optimizer, settings: _Settings, x: torch.Tensor, silent: torch.Tensor) -> dict:
    """One optimizer step on the batch ``x``; updates ``silent`` (rows since each latent fired) in place and
    returns the step's ``loss``, ``fvu``, ``l0`` and ``dead``."""
    target = x * sae.input_scale
    pre = sae.pre_activation(x)
    f = sae.activate(pre)
    error = target - (f @ sae.W_dec + sae.b_dec)
    squared = error.pow(2).sum(dim=1).mean()
    variance = (target - target.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12)
    fired = (f > 0).any(dim=0)
    silent.add_(x.shape[0]).masked_fill_(fired, 0)
    dead = silent >= settings.dead_after
    if settings.activation == "topk":
        loss = squared / variance
        if settings.aux_k and bool(dead.any()):
            loss = loss + settings.aux_coefficient * _aux_loss(sae, pre, error.detach(), dead, settings.aux_k)
    else:
        loss = squared + settings.l1 * (f * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.activation == "topk":
        sae.project_decoder_gradient()
    optimizer.step()
    if settings.activation == "topk":
        sae.normalize_decoder()
    return {"loss": float(loss.detach()), "fvu": float(squared.detach() / variance),
            "l0": float((f > 0).sum(dim=1).float().mean()), "dead": float(dead.float().mean())}


def _aux_loss(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
              aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the normalized error of the top ``aux_k`` dead latents reconstructing ``residual``."""
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(aux_k, int(dead.sum())), dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    scale = residual.pow(2).sum(dim=1).mean().clamp_min(1e-12)
    return (residual - f @ sae.W_dec).pow(2).sum(dim=1).mean() / scale
