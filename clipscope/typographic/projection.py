"""The learned projection defence: keep what an image shows, drop what is written on it.

Materzyńska, Torralba & Bau, "Disentangling visual and written concepts in CLIP", CVPR 2022
(arXiv:2206.07835), find a lower-dimensional orthogonal projection ``W`` (``k x d``, orthonormal rows)
of CLIP's joint embedding space in which images and texts are compared as ``normalize(W x)``. Their
training tuple per example is ``(x_i, y_i, x_t, y_t, x_it)``: a natural image, the text of its class,
an image of a rendered word, that word as text, and the natural image with the word rendered on it.
Each loss is a symmetric contrastive (InfoNCE) cross-entropy between two members of the tuple after
the projection. Their "forget to spell" projection is trained on the pairs of the visual task
(``(x_i, y_i)``, ``(x_it, y_i)``, ``(x_it, x_i)``, red in their Fig. 4) and keeps visual concepts
while discarding the written ones; their "learn to spell" projection uses the written pairs.

:class:`ProjectionDefence` is the forget-to-spell projection, trained on attack data generated
here (:meth:`ProjectionDefence.fit`) and applied to image and text embeddings alike while the model
runs (:meth:`ProjectionDefence.context`), so every zero-shot score inside the block is a cosine
similarity of projected vectors. What differs from the paper (each said again where it happens):

- orthogonality is exact (``W`` is the Q factor of a free matrix) instead of a penalty
  ``||I - W W^T||``; the projection acts in the full space as ``W^T W``, which gives the same
  cosines as the paper's ``k``-dimensional ``W x``;
- with few classes, a batch holds many images of one class, so the image-to-class terms are the
  cross-entropy of each image over *all* class prompts (the image-to-text half of the paper's
  symmetric loss, with the class list as the texts) rather than in-batch InfoNCE;
- the prompts of written words that are not classes are extra negatives of the attacked images
  (an addition: it lets words outside the class list teach the projection what to drop);
- logits are cosines times the model's logit scale (the authors' code uses a scale of 1);
- the words are rendered by :func:`~clipscope.typographic.render_text` on the given images (the
  paper renders random strings on ImageNet images); no word-only images ``x_t`` are needed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import write_bytes_atomic
from ..progress import progress_bar
from ..validate import InvalidArgumentError, check_int, check_names, check_number
from .attack import readable_jobs
from .defences import Defence
from .render import TextStyle, render_text

#: Default number of optimization steps and Adam learning rate of :meth:`ProjectionDefence.fit`.
DEFAULT_STEPS = 200
DEFAULT_LR = 0.02
#: Largest number of examples per optimization step (more are sampled in seeded batches).
BATCH = 512
#: The styles words are written in for training (one drawn per image, seeded): sizes around the
#: sizes at which attacks succeed, dark and light text, with and without a box.
TRAINING_STYLES = (
    TextStyle(size=0.25, colour="black", box="white", padding=0.1),
    TextStyle(size=0.2, colour="black", box="white"),
    TextStyle(size=0.3, colour="white", box="black", padding=0.1),
    TextStyle(size=0.22, colour="black", box=None),
    TextStyle(size=0.28, colour="white", box=None),
)
#: Tolerance on ``W W^T = I`` when a basis is built or loaded (bases are stored orthonormal to ~1e-7).
ORTHONORMAL_TOL = 1e-5
FORMAT = "clipscope.projection-defence"
VERSION = 1


def orthonormal_rows(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows, float32 ``(k, d)``) of the row space of ``matrix`` (``(k, d)``, ``k <= d``),
    by QR in float64; differentiable, so it doubles as the exact parametrization used in training."""
    q, _ = torch.linalg.qr(matrix.double().T)
    return q.T.to(matrix.dtype)


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of ``a`` (``(k, d)``) and ``b`` (``(m, d)``),
    largest first, ``min(k, m)`` of them in [0, 1]: 1 means a shared direction, 0 an orthogonal one
    (Björck & Golub 1973: the singular values of ``Qa Qb^T`` for orthonormal bases ``Qa``, ``Qb``)."""
    qa, qb = orthonormal_rows(a.double()), orthonormal_rows(b.double())
    return torch.linalg.svdvals(qa @ qb.T).clamp(0, 1).float()


def _check_basis(basis: Any, parameter: str = "basis") -> torch.Tensor:
    """``basis`` as a float32 CPU ``(k, d)`` tensor with orthonormal rows and ``1 <= k < d``; else an error."""
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or not basis.is_floating_point():
        raise InvalidArgumentError(parameter, basis, "a float tensor (k, d) whose rows are an orthonormal basis "
                                                     "of the kept subspace")
    k, d = basis.shape
    if not 1 <= k < d:
        raise InvalidArgumentError(parameter, f"<shape {(k, d)}>", "k rows for a subspace of dimension k, "
                                                                   "1 <= k < d (d: the embedding dimension)")
    basis = basis.detach().float().cpu()
    if not torch.isfinite(basis).all():
        raise InvalidArgumentError(parameter, "<basis with NaN or inf>", "finite entries only")
    error = float((basis.double() @ basis.double().T - torch.eye(k, dtype=torch.float64)).abs().max())
    if error > ORTHONORMAL_TOL:
        raise InvalidArgumentError(parameter, f"<rows orthonormal to {error:.2e}>",
                                   f"orthonormal rows (W W^T = I to {ORTHONORMAL_TOL:g}); orthonormal_rows(...) "
                                   "makes a basis of any full-rank matrix")
    return basis.contiguous()


def _white_box(model: Any) -> torch.nn.Module:
    """The ``nn.Module`` behind ``model`` whose ``encode_image`` / ``encode_text`` give its embeddings."""
    net = getattr(model, "model", None)
    if not isinstance(net, torch.nn.Module) or not all(callable(getattr(net, n, None))
                                                       for n in ("encode_image", "encode_text")):
        raise InvalidArgumentError("model", model, "a ClipModel with its weights (clipscope.load(...)); the "
                                                   "projection defence changes the embeddings, which a "
                                                   "black-box endpoint does not expose")
    return net


def projected_embeddings(model, basis: torch.Tensor, tag: str) -> contextlib.AbstractContextManager[None]:
    """Inside the block, every image and text embedding ``model`` computes is ``x W^T W`` (``W = basis``),
    through :meth:`~clipscope.model.ClipModel.transform_embeddings` (``tag`` names it in ``model.id``).
    Raises :class:`~clipscope.validate.InvalidArgumentError` for a black-box model or a basis of another
    embedding dimension.
    """
    _white_box(model)
    if basis.shape[1] != model.embed_dim:
        raise InvalidArgumentError("model", model, f"a model with {basis.shape[1]}-d embeddings, the space this "
                                                   f"projection was fitted in (this one has {model.embed_dim})")

    def project(out: torch.Tensor) -> torch.Tensor:
        w = basis.to(out.device, torch.float32)
        return ((out.float() @ w.T) @ w).to(out.dtype)

    return model.transform_embeddings(project, tag)


@dataclass(eq=False)
class ProjectionDefence(Defence):
    """Project image and text embeddings onto a learned subspace that keeps visual concepts and drops
    written words (Materzyńska et al., CVPR 2022; see the module docstring for the objective).

    ``basis`` is float32 ``(k, d)`` with orthonormal rows spanning the kept subspace of the
    ``d``-dimensional joint embedding; ``info`` records how it was fitted (JSON-serializable);
    ``history`` is the training loss per step. Build one with :meth:`fit` (from images) or
    :meth:`fit_embeddings` (from embeddings), or :meth:`load` a saved one.
    """

    basis: torch.Tensor
    info: dict = field(default_factory=dict)
    history: list[float] = field(default_factory=list, repr=False)
    name: str = "projection"

    def __post_init__(self):
        self.basis = _check_basis(self.basis)
        if not isinstance(self.info, dict):
            raise InvalidArgumentError("info", self.info, "a dict")

    @property
    def dim(self) -> int:
        """Dimension ``k`` of the kept subspace."""
        return int(self.basis.shape[0])

    @property
    def embed_dim(self) -> int:
        """Dimension ``d`` of the embedding space the projection acts in."""
        return int(self.basis.shape[1])

    @property
    def digest(self) -> str:
        """12 hex digits of the SHA-256 of the basis: names this projection in model ids and reports."""
        return hashlib.sha256(self.basis.numpy().tobytes()).hexdigest()[:12]

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` (``(..., d)``) projected onto the kept subspace, ``x W^T W``, in the full space
        (not renormalized), with the input's dtype and device."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.shape[-1:] != (self.embed_dim,):
            raise InvalidArgumentError("embeddings", embeddings, f"a tensor (..., {self.embed_dim})")
        w = self.basis.to(embeddings.device, torch.float32)
        return ((embeddings.float() @ w.T) @ w).to(embeddings.dtype)

    def context(self, model) -> contextlib.AbstractContextManager:
        """While in force, ``model`` embeds images and texts projected (see :func:`projected_embeddings`)."""
        return projected_embeddings(model, self.basis, f"projection-{self.digest}")

    def describe(self) -> str:
        words = self.info.get("words")
        trained = f", fitted with {len(words)} written word(s)" if words else ""
        return (f"learned projection onto {self.dim} of {self.embed_dim} embedding dimensions "
                f"(Materzynska et al. 2022; {self.digest}){trained}")

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, model, images: Any, labels: Sequence[str], classes: Sequence[str], *,
            words: Sequence[str] | None = None, dim: int | None = None, steps: int = DEFAULT_STEPS,
            lr: float = DEFAULT_LR, seed: int = 0, progress: bool | None = None,
            templates: str | Sequence[str] | None = None, batch_size: int = 64) -> "ProjectionDefence":
        """Fit the projection on ``images`` (true classes ``labels``) with words written on copies of them.

        Each readable image gets one word from ``words`` (default: ``classes``; never its own label),
        drawn with a seeded style from :data:`TRAINING_STYLES` at a seeded random position. The clean
        and the written-on images are encoded, the classes (and the words that are not classes) as
        prompts with ``templates`` (default: the model's), and :meth:`fit_embeddings` finds the
        ``dim``-dimensional subspace (default: see :meth:`fit_embeddings`) in ``steps`` Adam steps at
        learning rate ``lr``. Unreadable images are skipped and counted in ``info["n_skipped"]``.
        Returns the fitted :class:`ProjectionDefence`; the same arguments give the same basis on the
        same machine. Bad arguments raise :class:`~clipscope.validate.InvalidArgumentError`.
        """
        _white_box(model)
        classes = check_names("classes", classes, min_count=2)
        words = classes if words is None else check_names("words", words)
        seed = check_int("seed", seed)
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise InvalidArgumentError("labels", labels, "a list with the class name of each image")
        bad = list(dict.fromkeys(l for l in labels if l not in classes))
        if bad:
            raise InvalidArgumentError("labels", bad, f"class names, each one of {classes}")
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != len(labels):
            raise InvalidArgumentError("images", images, f"a list of images, one per label ({len(labels)})")
        if len(set(labels)) < 2:
            raise InvalidArgumentError("labels", labels, "images of at least two classes")
        skipped: list = []
        clean, attacked, targets, written = [], [], [], []
        for index, _, image, label in readable_jobs(images, labels, skipped):
            rng = random.Random(f"{seed}:{index}")
            choices = [w for w in words if w != label] or list(words)
            word = rng.choice(choices)
            style = rng.choice(TRAINING_STYLES)
            clean.append(image)
            attacked.append(render_text(image, word, style, "random", seed=seed * 1_000_003 + index).image)
            targets.append(classes.index(label))
            written.append(word)
        if len(clean) < 2:
            raise InvalidArgumentError("images", f"<{len(clean)} readable>", "at least two readable images "
                                                                             f"({len(skipped)} skipped)")
        with torch.no_grad():
            x_clean = model.encode_image(clean, batch_size=batch_size, progress=progress)
            x_attacked = model.encode_image(attacked, batch_size=batch_size, progress=progress)
            class_text = model.class_embeddings(classes, templates)
            extra = [w for w in dict.fromkeys(words) if w not in classes]
            negatives = model.class_embeddings(extra, templates) if extra else None
        fitted = cls.fit_embeddings(x_clean, x_attacked, class_text, torch.tensor(targets), negatives=negatives,
                                    dim=dim, steps=steps, lr=lr, seed=seed, logit_scale=model.logit_scale,
                                    progress=progress)
        fitted.info.update({"model": model.id, "classes": classes, "words": list(dict.fromkeys(words)),
                            "templates": list(model.classifier(classes, templates).templates),
                            "n_images": len(clean), "n_skipped": len(skipped)})
        return fitted

    @classmethod
    def fit_embeddings(cls, clean: torch.Tensor, attacked: torch.Tensor, class_text: torch.Tensor,
                       labels: torch.Tensor, *, negatives: torch.Tensor | None = None, dim: int | None = None,
                       steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, seed: int = 0,
                       logit_scale: float = 100.0, progress: bool | None = None) -> "ProjectionDefence":
        """Fit the forget-to-spell projection on embeddings; returns a :class:`ProjectionDefence`.

        ``clean`` and ``attacked`` are ``(n, d)`` embeddings of the same images without and with a
        written word, ``class_text`` ``(C, d)`` the class prompts, ``labels`` the class index of each
        image, ``negatives`` ``(m, d)`` prompts of written words that are not classes. With
        ``f(x) = normalize(W x)`` and ``s = logit_scale`` the loss is (module docstring)::

            CE(s f(clean) f(class_text)^T, labels)
          + CE(s f(attacked) f([class_text; negatives])^T, labels)
          + symmetric InfoNCE(s f(attacked) f(clean)^T)

        minimized over ``W`` (``dim x d``, rows exactly orthonormal: the Q factor of a free matrix,
        initialized as a seeded random orthogonal matrix as in the paper) with Adam, on the whole set or
        seeded batches of :data:`BATCH`. ``dim`` defaults to ``min(max(2 * C, 8), d // 2)`` (``C`` classes):
        on the ResNet organism (6 classes, ``d = 128``, 240 scenes) 8 or 12 kept dimensions cut the success
        of attacks writing held-out words from 0.54 to 0.10-0.20 at 1-4 points of clean accuracy; 32 did
        no better (0.14-0.21).
        """
        clean, attacked, class_text = (_check_embeddings(n, t) for n, t in
                                       (("clean", clean), ("attacked", attacked), ("class_text", class_text)))
        n, d = clean.shape
        if attacked.shape != clean.shape or class_text.shape[1] != d:
            raise InvalidArgumentError("attacked", f"<shape {tuple(attacked.shape)}>",
                                       f"the shape of clean {tuple(clean.shape)}; class_text (C, {d})")
        if n < 2:
            raise InvalidArgumentError("clean", f"<{n} rows>", "at least two examples")
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point() or \
                not bool(((labels >= 0) & (labels < class_text.shape[0])).all()):
            raise InvalidArgumentError("labels", labels, f"an integer tensor ({n},) of class indices "
                                                         f"0..{class_text.shape[0] - 1}")
        texts = class_text
        if negatives is not None:
            negatives = _check_embeddings("negatives", negatives)
            if negatives.shape[1] != d:
                raise InvalidArgumentError("negatives", f"<shape {tuple(negatives.shape)}>", f"(m, {d})")
            texts = torch.cat([class_text, negatives])
        n_classes = class_text.shape[0]
        dim = max(1, min(max(2 * n_classes, 8), d // 2)) if dim is None else check_int("dim", dim, low=1, high=d - 1)
        steps = check_int("steps", steps, low=1)
        lr = check_number("lr", lr, low=0, low_open=True)
        seed = check_int("seed", seed)
        logit_scale = check_number("logit_scale", logit_scale, low=0, low_open=True)
        labels = labels.long()

        gen = torch.Generator().manual_seed(seed)
        free = torch.nn.Parameter(torch.linalg.qr(torch.randn(d, dim, generator=gen))[0])
        optimizer = torch.optim.Adam([free], lr=lr)
        history = []
        with torch.enable_grad():
            for _ in progress_bar(range(steps), progress, True, "fit projection", total=steps):
                rows = torch.randperm(n, generator=gen)[:BATCH] if n > BATCH else torch.arange(n)
                w = orthonormal_rows(free.T)

                def f(x):
                    return F.normalize(x @ w.T, dim=-1)

                zc, za, zt = f(clean[rows]), f(attacked[rows]), f(texts)
                y = labels[rows]
                pair = logit_scale * za @ zc.T
                same = torch.arange(len(rows))
                loss = (F.cross_entropy(logit_scale * zc @ zt[:n_classes].T, y)
                        + F.cross_entropy(logit_scale * za @ zt.T, y)
                        + (F.cross_entropy(pair, same) + F.cross_entropy(pair.T, same)) / 2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history.append(loss.item())
        basis = orthonormal_rows(free.detach().T.double()).float()
        info = {"method": "Materzynska et al. 2022, forget to spell", "dim": dim, "steps": steps, "lr": lr,
                "seed": seed, "logit_scale": logit_scale, "final_loss": history[-1]}
        return cls(basis, info, history)

    # -- saving ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the defence to ``path`` (one safetensors file: the basis, with :attr:`info` as JSON in its
        header), atomically; returns the path. Raises :class:`~clipscope.io.OutputError` if it cannot be written."""
        from safetensors.torch import save
        meta = {"format": FORMAT, "version": str(VERSION), "info": json.dumps(self.info),
                "history": json.dumps(self.history)}
        return write_bytes_atomic(path, save({"basis": self.basis.contiguous()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "ProjectionDefence":
        """Read a defence written by :meth:`save`; with ``model``, check that it fits the model's embedding
        dimension. A missing or unreadable file, another format, a basis that is not orthonormal or of
        the wrong size raises :class:`~clipscope.validate.InvalidArgumentError` naming ``path``/``model``."""
        from safetensors import SafetensorError, safe_open
        if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
            raise InvalidArgumentError("path", path, "a file written by ProjectionDefence.save")
        try:
            with safe_open(os.fspath(path), "pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise InvalidArgumentError("path", path, f"a {FORMAT} file (ProjectionDefence.save); this "
                                                             f"one's format is {meta.get('format')!r}")
                if int(meta.get("version", -1)) > VERSION:
                    raise InvalidArgumentError("path", path, f"a file of version <= {VERSION} (this clipscope "
                                                             f"reads up to {VERSION}); upgrade clipscope")
                basis = fh.get_tensor("basis")
            info, history = json.loads(meta.get("info", "{}")), json.loads(meta.get("history", "[]"))
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, InvalidArgumentError):
                raise
            raise InvalidArgumentError("path", path, f"a readable ProjectionDefence file ({exc})") from None
        defence = cls(_check_basis(basis, "path"), info, history)
        if model is not None and defence.embed_dim != model.embed_dim:
            raise InvalidArgumentError("model", model, f"a model with {defence.embed_dim}-d embeddings, the space "
                                                       f"{os.fspath(path)!r} was fitted in (this one has "
                                                       f"{model.embed_dim})")
        return defence


def _check_embeddings(parameter: str, value: Any) -> torch.Tensor:
    """``value`` as a finite float32 CPU ``(n, d)`` tensor, detached; else an error naming ``parameter``."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point() or value.shape[0] < 1:
        raise InvalidArgumentError(parameter, value, "a float tensor (n, d) of embeddings")
    value = value.detach().float().cpu()
    if not torch.isfinite(value).all():
        raise InvalidArgumentError(parameter, "<embeddings with NaN or inf>", "finite entries only")
    return value
