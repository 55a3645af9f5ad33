"""p2v: physical Linux servers to OpenStack images, one doit task per stage and host.

Wiring only: the stages live in tasks/, the specs in specs/ (or $P2V_SPECS).
`doit list --all` shows every `<stage>:<host>`; `doit convert:<host>` runs a
host's whole chain, and a rerun does only what failed or changed.
"""

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks import STAGES
from tasks.lib.pipeline import Stage, convert_tasks, stage_tasks, stop_on_signals
from tasks.lib.runner import P2VError
from tasks.lib.spec import PROJECT_DIR, load_specs
from tasks.plan import plan_tasks
from tasks.pxe import pxe_tasks

SPEC_DIR = Path(os.environ.get("P2V_SPECS", PROJECT_DIR / "specs")).resolve()

DOIT_CONFIG = {
    # Per-host dependency state in each host's workdir (see tasks/lib/state.py
    # and doit.cfg); tasks without a host use the global file below.
    "backend": "p2v-hosts",
    "dep_file": str(SPEC_DIR.parent / "work" / ".doit-global.json"),
    "default_tasks": [],
    "action_string_formatting": "new",
}

# SIGTERM/SIGHUP end the run as ^C does, also in doit's own process (which then
# stops its workers), so that a killed batch releases what its stages hold.
stop_on_signals()

try:
    SPECS = load_specs(SPEC_DIR)
except P2VError as error:
    # One line, no traceback, and no task runs.
    print(f"p2v: spec error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def _stage_creator(stage: Stage, after: Stage | None) -> Callable[[], Iterator[dict[str, Any]]]:
    def create() -> Iterator[dict[str, Any]]:
        yield from stage_tasks(stage, SPECS, after=after)

    create.__doc__ = stage.doc
    return create


# Each stage runs after the one before it in STAGES, so that `doit -n N` never
# runs two stages of one host side by side (they would meet on the host lock).
for _after, _stage in zip([None, *STAGES[:-1]], STAGES, strict=True):
    globals()[f"task_{_stage.name}"] = _stage_creator(_stage, _after)


def task_convert() -> Iterator[dict[str, Any]]:
    """convert a host end to end (all stages)"""
    yield from convert_tasks(STAGES, SPECS)


def task_plan() -> Iterator[dict[str, Any]]:
    """show the target disk plan, source -> target (writes nothing)"""
    yield from plan_tasks(SPECS)


def task_pxe() -> Iterator[dict[str, Any]]:
    """render the PXE network's DHCP, TFTP, HTTP and NFS files (live path)"""
    yield from pxe_tasks(SPECS)
