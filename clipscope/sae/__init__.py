"""Sparse autoencoders over a site's feature vectors: the model, training, metrics and public formats.

:class:`SparseAutoencoder` is the dictionary (TopK or ReLU + L1); :func:`train_sae` trains one on activations
streamed from a model (:func:`train_on_rows` on rows in memory); :func:`evaluate_sae` measures it;
:func:`load_sae` reads SAEs saved by clipscope, SAELens, ViT-Prisma or saev (converted to safetensors) from
local files.
"""
from clipscope.sae.autoencoder import SparseAutoencoder
from clipscope.sae.formats import load_sae
from clipscope.sae.metrics import SAEEvaluation, evaluate_sae, splice
from clipscope.sae.train import TrainingLog, train_on_rows, train_sae

__all__ = ["SAEEvaluation", "SparseAutoencoder", "TrainingLog", "evaluate_sae", "load_sae", "splice", "train_on_rows",
           "train_sae"]
