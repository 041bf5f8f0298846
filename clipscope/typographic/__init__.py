"""Typographic attacks: render text onto images, evaluate clean vs attacked predictions,
sweep attack parameters, measure defences, and run the public attack sets in one harness.

Entry points: :class:`Attack` (what to write, how, where), :func:`evaluate` (one attack,
optionally under a :class:`Defence`), :func:`sweep` (one or two parameters varied),
:func:`render_text` (the renderer), the ``load_*`` functions and :func:`export_attack_set`.
"""
from .attack import Attack, AttackedImage, apply, generate
from .defences import AblationDefence, Defence, FunctionDefence, PromptDefence, TextUnits, find_text_units
from .evaluate import METRICS, SWEEPABLE, AttackResult, CleanScores, SweepResult, clean_scores, evaluate, sweep
from .render import ANCHORS, FIXED8, Rendered, TextStyle, default_font, render_text, resolve_position
from .sets import (TypographicSet, export_attack_set, load_label_text_folder, load_materzynska, load_paint,
                   load_rta100, load_scam)

__all__ = [
    "ANCHORS", "FIXED8", "METRICS", "SWEEPABLE", "AblationDefence", "Attack", "AttackResult", "AttackedImage",
    "CleanScores", "Defence", "FunctionDefence", "PromptDefence", "Rendered", "SweepResult", "TextStyle",
    "TextUnits", "TypographicSet", "apply", "clean_scores", "default_font", "evaluate", "export_attack_set",
    "find_text_units", "generate",
    "load_label_text_folder", "load_materzynska", "load_paint", "load_rta100", "load_scam", "render_text",
    "resolve_position", "sweep",
]
