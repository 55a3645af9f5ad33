"""p2v stages, in pipeline order. Each stage module declares one `STAGE`."""

from tasks import disk, inspect, sync
from tasks.lib.pipeline import Stage

# dodo.py wires exactly these, in this order; each reads the targets of the
# ones before it. Later stages (fix, verify, upload) join here.
STAGES: list[Stage] = [inspect.STAGE, disk.STAGE, sync.STAGE]
