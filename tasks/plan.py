"""`doit plan:<host>`: show the target disk plan, write nothing.

    plan:<host>  reads <workdir>/layout.json, prints the table

The planner itself is pure (tasks/lib/planning/); this module reads its input.
layout.json and disk-plan.json are read and written through tasks/lib/outputs.py
(schema-checked); `read_layout` and `read_disk_plan` here are its by-path forms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks.lib import outputs, state
from tasks.lib.planning.model import DiskPlan
from tasks.lib.planning.planner import plan_disk
from tasks.lib.planning.render import render_plan
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec

LAYOUT_FILE = outputs.LAYOUT.file
PLAN_FILE = outputs.DISK_PLAN.file  # written by the disk stage next to disk.img: the completed plan
# Kept here for the callers that write a plan by hand (tests).
write_json_atomically = outputs.write_json_atomically


def read_layout(path: Path) -> dict[str, Any]:
    """layout.json at `path`, checked against its schema (tasks/lib/outputs.py)."""
    layout: dict[str, Any] = outputs.read(outputs.LAYOUT, path)
    return layout


def read_disk_plan(path: Path) -> DiskPlan:
    """The completed plan the disk stage wrote (for sync and fix), checked against its schema."""
    return outputs.read_disk_plan(path)


def plan_for(spec: Spec) -> DiskPlan:
    return plan_disk(outputs.load_layout(spec), spec)


def show_plan(spec: Spec) -> TaskFailed | None:
    try:
        plan = plan_for(spec)
    except P2VError as error:
        return TaskFailed(f"plan:{spec.host}: {error}")
    print(render_plan(plan))
    return None


def plan_tasks(specs: Sequence[Spec]) -> Iterator[dict[str, Any]]:
    """`plan:<host>`: print the disk plan from layout.json; always runs, writes nothing."""
    yield {"basename": "plan", "name": None, "doc": "show the target disk plan (writes nothing)"}
    for spec in specs:
        state.register_host(spec.host, spec.state_dir)
        yield {
            "basename": "plan",
            "name": spec.host,
            "doc": f"show the target disk plan ({spec.host})",
            "actions": [(show_plan, [spec])],
            "file_dep": [str(spec.artifact(LAYOUT_FILE))],
            "uptodate": [False],
            "verbosity": 2,
        }
