"""docs/errors.md is the catalogue (tests/catalogue.py), rendered: it cannot drift from the tests."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.catalogue import CASES, DOC, ELSEWHERE, REGENERATE, render
from tests.unit.test_spec import BAD_SPECS

PROJECT = Path(__file__).resolve().parents[2]


def test_the_page_is_the_rendered_catalogue() -> None:
    assert DOC.read_text() == render(), f"docs/errors.md differs from tests/catalogue.py: run `{REGENERATE}`"


def test_the_catalogue_holds_forty_cases_or_more() -> None:
    ids = [case.id for case in CASES] + [other.id for other in ELSEWHERE]
    assert len(ids) == len(set(ids))
    assert len(ids) + len(BAD_SPECS) >= 40


def test_every_refusal_names_a_cause_and_a_next_step() -> None:
    for case in CASES:
        assert case.says, case.id
        assert case.carries_on or case.hint, case.id


def test_each_case_proven_elsewhere_names_a_test_that_holds_its_words() -> None:
    """The named test exists, and the message fragments the page quotes are in its source."""
    for other in ELSEWHERE:
        path, _, name = other.test.partition("::")
        source = (PROJECT / path).read_text()
        functions = {node.name: ast.get_source_segment(source, node) or ""
                     for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
        assert name in functions, other.test
        for fragment in (other.says, other.hint):
            assert fragment in source, (other.id, fragment)
