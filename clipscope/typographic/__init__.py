"""Typographic attacks: render text onto images, evaluate clean vs attacked predictions,
sweep attack parameters, measure defences, and run the public attack sets in one harness.

Entry points: :class:`Attack` (what to write, how, where), :func:`evaluate` (one attack,
optionally under a :class:`Defence`), :func:`sweep` (one or two parameters varied),
:func:`render_text` (the renderer), the ``load_*`` functions and :func:`export_attack_set`;
defences (:class:`PromptDefence`, :class:`AblationDefence`, :class:`ProjectionDefence`, and
:class:`HeadAblationDefence` for ViTs, from :func:`find_circuit`, :class:`SAEFeatureDefence`, suppressing
sparse-autoencoder features that fire on text) compared on one table by :func:`benchmark`; the Distill
automated-attack protocol (:func:`distill_protocol`).
"""
from .attack import Attack, AttackedImage, apply, generate
from .benchmark import AttackSet, BenchmarkResult, benchmark, register_defence
from .circuit import HeadAblationDefence, TypographicCircuit, find_circuit, typographic_scores
from .defences import (AblationDefence, Defence, FunctionDefence, PromptDefence, SAEFeatureDefence, TextUnits,
                       find_text_units)
from .distill import (GOH_TARGETS, DistillResult, DistillSetup, DistillTarget, distill_protocol,
                      distill_protocol_folder, organism_distill)
from .evaluate import METRICS, SWEEPABLE, AttackResult, CleanScores, SweepResult, clean_scores, evaluate, sweep
from .projection import ProjectionDefence
from .render import ANCHORS, FIXED8, Rendered, TextStyle, default_font, render_text, resolve_position
from .sets import (TypographicSet, export_attack_set, load_label_text_folder, load_materzynska, load_paint,
                   load_rta100, load_scam)

__all__ = [
    "ANCHORS", "FIXED8", "GOH_TARGETS", "METRICS", "SWEEPABLE", "AblationDefence", "Attack", "AttackResult",
    "AttackSet", "AttackedImage", "BenchmarkResult", "CleanScores", "Defence", "HeadAblationDefence", "DistillResult", "DistillSetup",
    "DistillTarget", "FunctionDefence", "ProjectionDefence", "PromptDefence", "SAEFeatureDefence", "Rendered", "SweepResult",
    "TextStyle", "TextUnits", "TypographicCircuit", "TypographicSet", "apply", "benchmark", "clean_scores", "default_font",
    "distill_protocol", "distill_protocol_folder", "evaluate", "export_attack_set", "find_circuit", "find_text_units",
    "generate",
    "organism_distill", "register_defence", "typographic_scores",
    "load_label_text_folder", "load_materzynska", "load_paint", "load_rta100", "load_scam", "render_text",
    "resolve_position", "sweep",
]
