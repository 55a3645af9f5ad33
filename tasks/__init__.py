"""p2v stages, in pipeline order. Each stage module declares one `STAGE`."""

from tasks import disk, fix, inspect, report, sync, upload, verify
from tasks.lib.pipeline import Stage

# dodo.py wires exactly these, in this order; each reads the targets of the
# ones before it (report reads the receipts of sync, fix and verify).
STAGES: list[Stage] = [inspect.STAGE, disk.STAGE, sync.STAGE, fix.STAGE, verify.STAGE, report.STAGE, upload.STAGE]
