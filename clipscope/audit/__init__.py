"""Bias audits: FairFace-style zero-shot audits that compare class taxonomies, with confidence intervals.

Entry point: :func:`run_audit` (a YAML spec path, YAML text, a dict or an :class:`AuditSpec`) returns an
:class:`AuditResult`. Modules: ``spec`` (YAML specs with line-numbered errors), ``adapters`` (FairFace,
``datasets``, imagefolder, organism figures), ``cache`` (on-disk embedding cache, resumable),
``frames`` (outcomes keyed by ``(taxonomy, outcome)`` and the MetricFrame-like :class:`Disaggregation`),
``metrics`` (disaggregated rates, score and bootstrap intervals, tests, MaxSkew@k, NDKL), ``compare``
(taxonomy comparison), ``plots``, ``report`` (HTML / Markdown), ``run`` (orchestration and CLI).
"""
from .adapters import AuditData, load_data
from .compare import TaxonomyComparison
from .frames import Disaggregation, Outcomes
from .metrics import disaggregate, max_skew_at_k, ndkl, skew_at_k
from .result import AuditResult
from .run import cli_audit, run_audit
from .spec import AuditSpec, SpecError, load_spec, parse_spec

__all__ = ["AuditData", "AuditResult", "AuditSpec", "Disaggregation", "Outcomes", "SpecError", "TaxonomyComparison",
           "cli_audit", "disaggregate", "load_data", "load_spec", "max_skew_at_k", "ndkl", "parse_spec", "run_audit",
           "skew_at_k"]
