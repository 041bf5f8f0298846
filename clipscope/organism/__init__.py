"""The clipscope model organism: a small CLIP trained from scratch on synthetic scenes with planted properties.

Light on purpose: importing this package loads only the scene vocabulary (no torch, no open_clip).
See ``data_cards/organism.md``.  Submodules: ``scenes`` (data generator), ``train`` (training
script), ``properties`` (measurement of the planted properties).
"""
from .scenes import COLOURS, GROUPS, HARMFUL_WORD, PLANTED_GROUP, ROLES, SHAPES, WORDS

#: Default zero-shot prompt templates (shapes, words as objects, roles in the bias audit).
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)
#: Templates for zero-shot colour classification (colour names are adjectives).
COLOUR_TEMPLATES = ("a photo of a {} object.",)
#: Templates for matching a word-only image to its word.
READING_TEMPLATES = ("{}", 'the word "{}"', "a sign that says {}")

MODEL_NAME = "clipscope-organism"

__all__ = ["SHAPES", "COLOURS", "WORDS", "GROUPS", "ROLES", "HARMFUL_WORD", "PLANTED_GROUP",
           "ZERO_SHOT_TEMPLATES", "COLOUR_TEMPLATES", "READING_TEMPLATES", "MODEL_NAME"]
