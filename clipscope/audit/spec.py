"""Audit specs: a YAML file validated with pydantic, with errors that point at YAML line numbers.

A spec names the model(s), the data set (an adapter kind plus its path and group columns), one or
more class taxonomies (classes, prompt templates, harmful categories, correct classes for label
columns), the metrics, the bootstrap settings and the output folder. See ``audits/*.yaml`` for
complete, commented examples and :func:`load_spec` for the rules on paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

#: Data set adapter kinds (see :mod:`clipscope.audit.adapters`).
ADAPTER_KINDS = ("fairface", "hf", "imagefolder", "organism_figures")
#: Metric families an audit can compute.
METRIC_NAMES = ("harm_rate", "accuracy", "retrieval")


class SpecError(ValueError):
    """An audit spec is invalid. ``problems`` lists ``(line, location, message)``; line is 1-based or None."""

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}:{line if line is not None else '?'}: {loc}: {msg}" if loc else
                 f"{source}:{line if line is not None else '?'}: {msg}" for line, loc, msg in problems]
        super().__init__(f"invalid audit spec ({len(problems)} problem(s)):\n  " + "\n  ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointSpec(_Strict):
    """Options of an ``endpoint:URL`` model (:class:`~clipscope.endpoint.EndpointModel`); the key is read
    from the environment variable ``key_env``, never from the spec."""
    key_env: str | None = Field(default=None, min_length=1)
    concurrency: int | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    retries: int | None = Field(default=None, ge=0)
    cache_dir: str | None = None
    templates: list[str] | None = None  # the prompt templates the endpoint is known to apply


class ModelSpec(_Strict):
    """A model to audit: a :func:`clipscope.load` name plus an optional pretrained tag or path; for an
    ``endpoint:URL`` model, optional ``endpoint`` options."""
    name: str = Field(min_length=1)
    pretrained: str | None = None
    endpoint: EndpointSpec | None = None


class DataSpec(_Strict):
    """The data set: which adapter reads it, where it is, and which columns define groups."""
    kind: Literal["fairface", "hf", "imagefolder", "organism_figures"]
    path: str | None = None          # fairface root / imagefolder root / hf hub id or save_to_disk folder
    split: str | None = None         # fairface: val or train; hf: split name
    config: str | None = None        # hf: configuration name (HuggingFaceM4/FairFace: "0.25" or "1.25")
    padding: str | None = None       # fairface: which crop version the folder holds ("0.25" or "1.25"), provenance only
    image_column: str | None = None  # hf / imagefolder: override the image (file) column
    n: int | None = Field(default=None, gt=0)      # organism_figures: number of figures
    seed: int = 0                                   # organism_figures: generator seed
    child_rate: float = Field(default=0.3, ge=0, le=1)  # organism_figures: share of child figures per group
    # organism_figures: prevalence of the planted trait in groups A, B, C (the graded bias the ViT organism
    # was trained with: [0.05, 0.30, 0.05]); None draws figures without it
    trait_rates: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(default=None, min_length=3, max_length=3)
    limit: int | None = Field(default=None, gt=0)  # audit only the first `limit` rows (smoke runs)
    group_columns: list[str] = Field(min_length=1)
    intersections: Literal["pairs", "none"] | list[list[str]] = "pairs"
    data_card: str | None = None     # a reference for the reader (repository path or URL), shown as written


class LabelSpec(_Strict):
    """Accuracy on a label column: for each label value, the class(es) that count as correct."""
    column: str
    correct: dict[str, str | list[str]] = Field(min_length=1)

    def correct_classes(self) -> dict[str, list[str]]:
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in self.correct.items()}


class TaxonomySpec(_Strict):
    """One class taxonomy: the zero-shot classes, prompts, and what counts as harmful or correct.

    A taxonomy with neither ``harm`` nor ``labels`` has no rate outcomes: it contributes its predicted
    class shares and predictions only.
    """
    name: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2)
    templates: str | list[str] | None = None
    harm: dict[str, list[str]] = Field(default_factory=dict)
    labels: dict[str, LabelSpec] = Field(default_factory=dict)
    description: str | None = None

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {dupes}")
        if any(not c.strip() for c in v):
            raise ValueError("class names must not be empty")
        return v


class RetrievalSpec(_Strict):
    """Text-to-image retrieval fairness: MaxSkew@k and NDKL of the groups among the top k images."""
    queries: list[str] = Field(min_length=1)
    k: list[int] = Field(default_factory=lambda: [10, 50, 100])
    group_columns: list[str] | None = None   # default: the data set's group columns
    desired: Literal["uniform", "data"] = "uniform"
    n_random: int = Field(default=200, ge=0)  # random rankings for the baseline / permutation p-value

    @field_validator("k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"k must be a non-empty list of positive integers; got {v}")
        return sorted(set(v))


class BootstrapSpec(_Strict):
    n: int = Field(default=1000, ge=0)
    seed: int = 0
    confidence: float = Field(default=0.95, gt=0, lt=1)


class AuditSpec(_Strict):
    """A whole audit (see the module docstring)."""
    name: str = Field(min_length=1)
    description: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    taxonomies: list[TaxonomySpec] = Field(min_length=1)
    metrics: list[Literal["harm_rate", "accuracy", "retrieval"]] | None = None  # None: every section given
    retrieval: RetrievalSpec | None = None
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    output: str = "audit-out"
    cache_dir: str | None = None
    batch_size: int = Field(default=64, gt=0)
    chunk_size: int = Field(default=512, gt=0)
    device: str = "auto"
    notes: str | None = None
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """The folder of the spec file its relative paths were resolved against; None for a spec from text or a dict."""
        return self._source_dir

    # -- derived ------------------------------------------------------------------------
    def groupings(self) -> list[tuple[str, ...]]:
        """Every grouping the metrics are disaggregated by: each group column, then the intersections."""
        cols = list(self.data.group_columns)
        out: list[tuple[str, ...]] = [(c,) for c in cols]
        inter = self.data.intersections
        if inter == "pairs":
            out += [(a, b) for i, a in enumerate(cols) for b in cols[i + 1:]]
        elif inter != "none":
            out += [tuple(x) for x in inter if len(x) > 1]
        return list(dict.fromkeys(out))

    def metric_set(self) -> tuple[str, ...]:
        """The metric families to compute: the ``metrics`` list, or every family whose section is present."""
        if self.metrics is not None:
            return tuple(dict.fromkeys(self.metrics))
        out = []
        if any(t.harm for t in self.taxonomies):
            out.append("harm_rate")
        if any(t.labels for t in self.taxonomies):
            out.append("accuracy")
        if self.retrieval is not None:
            out.append("retrieval")
        return tuple(out)

    def taxonomy(self, name: str) -> TaxonomySpec:
        for t in self.taxonomies:
            if t.name == name:
                return t
        raise KeyError(f"no taxonomy named {name!r}; valid: {[t.name for t in self.taxonomies]}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------
# Semantic checks (cross-field), reported with the location of the offending value


def _semantic_problems(spec: AuditSpec) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    d = spec.data
    if d.kind in ("fairface", "imagefolder", "hf") and not d.path:
        problems.append((("data",), f"data kind {d.kind!r} needs a 'path'"))
    if d.kind == "organism_figures" and d.n is None:
        problems.append((("data",), "data kind 'organism_figures' needs 'n' (the number of figures)"))
    if d.kind == "fairface" and d.split not in (None, "val", "train"):
        problems.append((("data", "split"), f"FairFace split {d.split!r} is not one of 'val', 'train'"))
    cols = d.group_columns
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
        problems.append((("data", "group_columns"), f"duplicate group columns: {dupes}"))
    if isinstance(d.intersections, list):
        for i, inter in enumerate(d.intersections):
            for j, c in enumerate(inter):
                if c not in cols:
                    problems.append((("data", "intersections", i, j),
                                     f"intersection column {c!r} is not a group column; valid: {cols}"))
    for i, m in enumerate(spec.models):
        if m.endpoint is not None and not m.name.startswith("endpoint:"):
            problems.append((("models", i, "endpoint"),
                             f"'endpoint' options are for 'endpoint:URL' models, not {m.name!r}"))
    names = [t.name for t in spec.taxonomies]
    for i, t in enumerate(spec.taxonomies):
        if names.count(t.name) > 1:
            problems.append((("taxonomies", i, "name"), f"duplicate taxonomy name {t.name!r}"))
        if t.templates is not None:
            from ..prompts import resolve_templates
            try:
                resolve_templates(t.templates)
            except ValueError as exc:
                problems.append((("taxonomies", i, "templates"), str(exc)))
        for cat, members in t.harm.items():
            if not members:
                problems.append((("taxonomies", i, "harm", cat), f"harm category {cat!r} lists no classes"))
            for j, c in enumerate(members):
                if c not in t.classes:
                    problems.append((("taxonomies", i, "harm", cat, j),
                                     f"class {c!r} is not one of taxonomy {t.name!r}'s classes: {t.classes}"))
        for task, lab in t.labels.items():
            for value, members in lab.correct.items():
                for j, c in enumerate([members] if isinstance(members, str) else members):
                    if c not in t.classes:
                        loc = ("taxonomies", i, "labels", task, "correct", value) + (() if isinstance(members, str) else (j,))
                        problems.append((loc, f"class {c!r} is not one of taxonomy {t.name!r}'s classes: {t.classes}"))
    metrics = spec.metrics or []
    if "harm_rate" in metrics and not any(t.harm for t in spec.taxonomies):
        problems.append((("metrics",), "metric 'harm_rate' needs at least one taxonomy with a 'harm' section"))
    if "accuracy" in metrics and not any(t.labels for t in spec.taxonomies):
        problems.append((("metrics",), "metric 'accuracy' needs at least one taxonomy with a 'labels' section"))
    if "retrieval" in metrics and spec.retrieval is None:
        problems.append((("metrics",), "metric 'retrieval' needs a 'retrieval' section (queries, k)"))
    if spec.retrieval is not None and spec.retrieval.group_columns:
        for j, c in enumerate(spec.retrieval.group_columns):
            if c not in cols:
                problems.append((("retrieval", "group_columns", j),
                                 f"retrieval group column {c!r} is not a data group column; valid: {cols}"))
    return problems


# ---------------------------------------------------------------------------------------
# YAML line numbers


def _node_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (keys / indices); the deepest existing ancestor otherwise."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    # for a scalar value report the key's line; descend into containers
                    nxt, line = value, key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds union-member tags such as 'list[str]' or 'literal[...]' to locations; drop them
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))


def parse_spec(text: str, source: str = "<spec>") -> AuditSpec:
    """Parse and validate YAML ``text``; raise :class:`SpecError` with line numbers for every problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(source, [(mark.line + 1 if mark else None, "", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [(1, "", "an audit spec must be a YAML mapping (name:, models:, data:, taxonomies:, ...)")])
    try:
        spec = AuditSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = _clean_loc(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown field {loc[-1]!r}" + _valid_fields_hint(loc)
            elif err["type"] == "missing":
                msg = f"missing required field {loc[-1]!r}"
            elif err["type"].startswith("literal_error"):
                msg = f"{msg}; got {err.get('input')!r}"
            problems.append((_node_line(root, loc), _loc_str(loc), msg))
        # unions report one error per member; keep the first per location
        seen, unique = set(), []
        for p in problems:
            if p[1] not in seen:
                seen.add(p[1])
                unique.append(p)
        raise SpecError(source, unique) from None
    sem = _semantic_problems(spec)
    if sem:
        raise SpecError(source, [(_node_line(root, loc), _loc_str(loc), msg) for loc, msg in sem])
    return spec


def _valid_fields_hint(loc: tuple) -> str:
    model: Any = AuditSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif inner:
            model = inner[0]
        else:
            return ""
    fields = list(getattr(model, "model_fields", {}))
    return f"; valid fields: {fields}" if fields else ""


def load_spec(spec: str | os.PathLike | AuditSpec | dict) -> AuditSpec:
    """Return an :class:`AuditSpec` from a YAML path, YAML text, a dict or a spec (returned as is).

    Paths inside a spec (data ``path``, ``output``, ``cache_dir``, an endpoint model's ``cache_dir``) may use
    ``~`` and ``$VARS``. In a spec read from a file, relative paths are resolved against the file's folder
    (so a spec runs the same from any working directory) and stored absolute; ``source_dir`` records that folder. The
    default ``output`` (``audit-out``, when the spec sets none) stays relative to the working directory. For
    ``kind: hf`` a relative ``path`` is resolved only if that folder exists there: otherwise it is a
    hub id. A path with an unset variable stays as written, so the error that follows shows it. In a
    spec given as text or a dict, relative paths are relative to the working directory.
    """
    if isinstance(spec, AuditSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(yaml.safe_dump(spec, sort_keys=False), "<dict>")
    if isinstance(spec, str) and "\n" in spec and not Path(spec).is_file():
        return parse_spec(spec, "<text>")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no such audit spec: {str(path)!r}")
    return resolve_paths(parse_spec(path.read_text(encoding="utf-8"), str(path)), Path(os.path.abspath(path)).parent)


def resolve_paths(spec: AuditSpec, folder: Path) -> AuditSpec:
    """A copy of ``spec`` whose relative paths (data ``path``, a set ``output``, ``cache_dir``, an endpoint model's
    ``cache_dir``) are absolute under ``folder``; ``source_dir`` is set to ``folder``."""
    def resolve(p: str | None, must_exist: bool = False) -> str | None:
        e = expand_path(p)
        if e is None or "$" in e or os.path.isabs(e) or (must_exist and not (folder / e).exists()):
            return e
        return os.path.normpath(folder / e)

    data = spec.data.model_copy(update={"path": resolve(spec.data.path, must_exist=spec.data.kind == "hf")})
    output = resolve(spec.output) if "output" in spec.model_fields_set else spec.output
    models = [m if m.endpoint is None else m.model_copy(update={
        "endpoint": m.endpoint.model_copy(update={"cache_dir": resolve(m.endpoint.cache_dir)})}) for m in spec.models]
    out = spec.model_copy(update={"data": data, "output": output, "cache_dir": resolve(spec.cache_dir),
                                  "models": models})
    out._source_dir = folder
    return out


def expand_path(p: str | None) -> str | None:
    """``~`` and ``$VAR`` expanded (unset variables stay as written, so the error message shows them)."""
    return None if p is None else os.path.expanduser(os.path.expandvars(p))
