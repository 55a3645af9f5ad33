"""A two-stage pipeline with toy stages, to test the doit wiring without root.

Stage `first` writes first.txt; stage `second` copies it to second.txt, and
fails halfway (after writing its partial) when P2V_TEST_FAIL=second.
"""

import os
from pathlib import Path

from tasks.lib.pipeline import Stage, StageRun, convert_tasks, stage_tasks
from tasks.lib.runner import P2VError
from tasks.lib.spec import load_specs

SPEC_DIR = Path(os.environ["P2V_SPECS"])
DOIT_CONFIG = {"backend": "p2v-hosts", "dep_file": os.environ["P2V_TEST_GLOBAL_DEP"],
               "default_tasks": []}
SPECS = load_specs(SPEC_DIR)


def write_first(run: StageRun) -> None:
    counter = run.spec.workdir / "first.runs"
    counter.write_text(counter.read_text() + "x" if counter.exists() else "x")
    run.partial.write_text(f"first for {run.spec.host}\n")


def write_second(run: StageRun) -> None:
    run.partial.write_text(run.input("first.txt").read_text().upper())
    if os.environ.get("P2V_TEST_FAIL") == "second":
        raise P2VError("injected failure in second")


FIRST = Stage("first", "toy first stage", "first.txt", (), write_first, lambda spec: {})
SECOND = Stage("second", "toy second stage", "second.txt", ("first.txt",), write_second,
               lambda spec: {"layout": spec.target.layout})
STAGES = [FIRST, SECOND]


def task_first():
    yield from stage_tasks(FIRST, SPECS)


def task_second():
    yield from stage_tasks(SECOND, SPECS)


def task_convert():
    yield from convert_tasks(STAGES, SPECS)
