"""p2v stages, in pipeline order. Each stage module declares one `STAGE`.

The stages load when STAGES is first read, not with the package: live.inputs'
errors are tasks.lib.runner's, and the key of a cached live build must take
milliseconds to compute, not the half second the whole pipeline takes to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.lib.pipeline import Stage


def __getattr__(name: str) -> list[Stage]:
    if name != "STAGES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tasks import disk, fix, inspect, report, sync, upload, verify

    # dodo.py wires exactly these, in this order; each reads the targets of the
    # ones before it (report reads the receipts of sync, fix and verify).
    stages = [inspect.STAGE, disk.STAGE, sync.STAGE, fix.STAGE, verify.STAGE, report.STAGE, upload.STAGE]
    globals()["STAGES"] = stages
    return stages
