"""The clipscope model organisms: small CLIPs trained from scratch on synthetic scenes with planted properties.

Two organisms: ``clipscope.load("organism")`` (a ResNet, architecture :data:`MODEL_NAME`) and
``clipscope.load("organism-vit")`` (a ViT, :data:`VIT_MODEL_NAME`, trained with the graded planted bias
:data:`GRADED_BIAS_CONFIG`).  Light on purpose: importing this package loads only the scene vocabulary
(no torch, no open_clip).  See ``data_cards/organism.md`` and ``data_cards/organism-vit.md``.  Submodules: ``scenes`` (data generator), ``train`` (training
script), ``properties`` (measurement of the planted properties).
"""
from .scenes import (COLOURS, GRADED_BIAS_CONFIG, GROUPS, HARMFUL_WORD, PLANTED_GROUP, ROLES, SHAPES, WORDS,
                     SceneConfig, trait_prevalence)

#: Default zero-shot prompt templates (shapes, words as objects, roles in the bias audit).
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)
#: Templates for zero-shot colour classification (colour names are adjectives).
COLOUR_TEMPLATES = ("a photo of a {} object.",)
#: Templates for matching a word-only image to its word.
READING_TEMPLATES = ("{}", 'the word "{}"', "a sign that says {}")

MODEL_NAME = "clipscope-organism"
VIT_MODEL_NAME = "clipscope-organism-vit"

__all__ = ["SHAPES", "COLOURS", "WORDS", "GROUPS", "ROLES", "HARMFUL_WORD", "PLANTED_GROUP",
           "ZERO_SHOT_TEMPLATES", "COLOUR_TEMPLATES", "READING_TEMPLATES", "MODEL_NAME", "VIT_MODEL_NAME",
           "GRADED_BIAS_CONFIG", "SceneConfig", "trait_prevalence"]
