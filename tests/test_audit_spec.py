"""Audit specs: the shipped specs validate; bad specs fail with the YAML line of the problem."""
from __future__ import annotations

from pathlib import Path

import pytest

from clipscope.audit import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: demo
models:
  - name: clipscope-tiny-vit
data:
  kind: organism_figures
  n: 30
  group_columns: [group, age]
taxonomies:
  - name: t1
    classes: [doctor, person, thief]
    harm:
      crime: [thief]
"""


def problem_lines(text: str) -> list[tuple[int, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "spec.yaml")
    return [(line, msg) for line, _, msg in info.value.problems]


def test_shipped_specs_are_valid():
    organism = load_spec(ROOT / "audits" / "organism_planted_bias.yaml")
    assert [t.name for t in organism.taxonomies] == ["roles+thief", "roles+thief+child"]
    assert organism.data.kind == "organism_figures"
    paper = load_spec(ROOT / "audits" / "clip_paper_fairface.yaml")
    assert paper.data.kind == "fairface"
    with_child = paper.taxonomies[1]
    assert "a child" in with_child.classes and "a child" not in paper.taxonomies[0].classes
    assert set(with_child.classes) - set(paper.taxonomies[0].classes) == {"a child"}
    assert set(with_child.harm) >= {"crime", "non_human"}
    harmful = {c for members in paper.taxonomies[0].harm.values() for c in members}
    assert len([c for c in paper.taxonomies[0].classes if c not in harmful]) == 14


def test_a_good_spec_parses_and_derives_groupings():
    spec = parse_spec(GOOD)
    assert spec.groupings() == [("group",), ("age",), ("group", "age")]
    assert spec.metric_set() == ("harm_rate",)
    assert spec.bootstrap.n == 1000 and spec.bootstrap.confidence == 0.95


def test_unknown_field_is_reported_at_its_line_with_the_valid_fields():
    text = GOOD.replace("  n: 30\n", "  n: 30\n  sede: 3\n")
    [(line, msg)] = problem_lines(text)
    assert line == 7
    assert "unknown field 'sede'" in msg and "'seed'" in msg


def test_a_harm_class_missing_from_the_taxonomy_is_reported_at_its_line():
    text = GOOD.replace("crime: [thief]", "crime:\n        - thief\n        - theif")
    [(line, msg)] = problem_lines(text)
    assert line == 14
    assert "'theif'" in msg and "doctor" in msg


def test_bad_values_and_missing_fields_point_at_their_lines():
    text = GOOD.replace("kind: organism_figures", "kind: fairfaces").replace("  - name: t1\n", "  - nme: t1\n")
    problems = problem_lines(text)
    lines = {line for line, _ in problems}
    assert 5 in lines                                             # kind: fairfaces
    assert any("fairface" in m and "fairfaces" in m for _, m in problems)
    assert 9 in lines                                             # the taxonomy lacking 'name'
    assert any("missing required field 'name'" in m for _, m in problems)


def test_duplicate_classes_and_bad_intersections_are_errors():
    [(line, msg)] = problem_lines(GOOD.replace("[doctor, person, thief]", "[doctor, doctor, thief]"))
    assert line == 10 and "duplicate class names: ['doctor']" in msg
    text = GOOD.replace("  group_columns: [group, age]\n", "  group_columns: [group, age]\n  intersections: [[group, race]]\n")
    [(line, msg)] = problem_lines(text)
    assert line == 8 and "'race'" in msg and "['group', 'age']" in msg


def test_invalid_yaml_reports_the_line():
    [(line, msg)] = problem_lines("name: x\nmodels: [\n  - a\n")
    assert "not valid YAML" in msg and line is not None


def test_error_message_names_file_and_line():
    with pytest.raises(SpecError, match=r"spec\.yaml:7: data\.sede: unknown field"):
        parse_spec(GOOD.replace("  n: 30\n", "  n: 30\n  sede: 3\n"), "spec.yaml")
