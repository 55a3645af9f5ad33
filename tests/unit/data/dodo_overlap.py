"""Three toy stages shaped like verify -> (report, upload): both later ones read
the first one's target only, so `doit -n 2` could schedule them side by side.
`report` is slow and `upload` fast, which forces the overlap whenever the two
are not ordered. P2V_TEST_UNORDERED=1 leaves the ordering out, to show that the
test really does force it.
"""

import os
import time
from pathlib import Path

from tasks.lib.pipeline import Stage, StageRun, convert_tasks, stage_tasks
from tasks.lib.spec import load_specs

SPEC_DIR = Path(os.environ["P2V_SPECS"])
DOIT_CONFIG = {"backend": "p2v-hosts", "dep_file": os.environ["P2V_TEST_GLOBAL_DEP"],
               "default_tasks": []}
SPECS = load_specs(SPEC_DIR)


def timed(name: str, seconds: float):
    def run(stage_run: StageRun) -> None:
        events = stage_run.spec.workdir / "events.txt"
        with events.open("a") as handle:
            handle.write(f"{time.monotonic():.3f} start {name}\n")
        time.sleep(seconds)
        stage_run.partial.write_text(f"{name}\n")
        with events.open("a") as handle:
            handle.write(f"{time.monotonic():.3f} end {name}\n")

    return run


VERIFY = Stage("verify", "toy verify", "verified.txt", (), timed("verify", 0), lambda spec: {})
REPORT = Stage("report", "toy slow report", "report.txt", ("verified.txt",), timed("report", 3), lambda spec: {})
UPLOAD = Stage("upload", "toy fast upload", "uploaded.txt", ("verified.txt",), timed("upload", 0.2),
               lambda spec: {})
STAGES = [VERIFY, REPORT, UPLOAD]
ORDERED = os.environ.get("P2V_TEST_UNORDERED") != "1"


def task_verify():
    yield from stage_tasks(VERIFY, SPECS)


def task_report():
    yield from stage_tasks(REPORT, SPECS, after=VERIFY if ORDERED else None)


def task_upload():
    yield from stage_tasks(UPLOAD, SPECS, after=REPORT if ORDERED else None)


def task_convert():
    yield from convert_tasks(STAGES, SPECS)
