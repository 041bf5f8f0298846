"""Neuron-level views of the image tower: which images drive a unit (dataset examples), which
rendered words drive it, what concept labels fit it, what ablating it changes, and the atlas that
puts the views of each unit together (HTML export; the explorer widget in :mod:`clipscope.widgets`)."""
from .ablation import AblationEffect, ablation_effect
from .atlas import Atlas, UnitView
from .examples import DatasetExamples, Example, SiteExamples, dataset_examples, source_fingerprint
from .labels import UnitLabels, label_units
from .words import WordResponses, default_words, word_responses

__all__ = ["AblationEffect", "Atlas", "DatasetExamples", "Example", "SiteExamples", "UnitLabels", "UnitView", "WordResponses",
           "ablation_effect", "dataset_examples", "default_words", "label_units", "source_fingerprint",
           "word_responses"]
