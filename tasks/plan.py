"""`doit plan:<host>`: show the target disk plan, write nothing.

    plan:<host>  reads <workdir>/layout.json, prints the table

The planner itself is pure (tasks/lib/plan.py); this module reads its input,
and reads and writes the completed plan (disk-plan.json) for the stages that
follow the disk stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks.inspect import LAYOUT_FORMAT, LAYOUT_VERSION
from tasks.lib import state
from tasks.lib.plan import DiskPlan, plan_disk, render_plan
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec

LAYOUT_FILE = "layout.json"
PLAN_FILE = "disk-plan.json"  # written by the disk stage next to disk.img: the completed plan


def read_layout(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise P2VError(f"{path} does not exist", hint="run inspect:<host> first") from None
    except ValueError as error:
        raise P2VError(f"{path} is not valid JSON: {error}", hint="rerun inspect:<host>") from None
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT or data.get("version") != LAYOUT_VERSION:
        raise P2VError(f"{path} is not a p2v layout (version {LAYOUT_VERSION})", hint="rerun inspect:<host>")
    return data


def read_disk_plan(path: Path) -> DiskPlan:
    """The completed plan the disk stage wrote (for sync and fix)."""
    try:
        return DiskPlan.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise P2VError(f"{path} does not exist", hint="run disk:<host> first") from None
    except ValueError as error:
        raise P2VError(f"{path} is not valid JSON: {error}", hint="rerun disk:<host>") from None


def write_json_atomically(path: Path, data: Any) -> None:
    """Write `<path>.partial`, fsync, rename: readers see the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def plan_for(spec: Spec) -> DiskPlan:
    return plan_disk(read_layout(spec.artifact(LAYOUT_FILE)), spec)


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
