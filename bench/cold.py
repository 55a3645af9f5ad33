"""Cold timing for every bench: the page cache dropped before, what was written synced inside the time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(action: Callable[[], object]) -> float:
    """Seconds of `action`, read cold, its writes synced inside the time."""
    drop_caches()
    started = time.monotonic()
    action()
    os.sync()
    return time.monotonic() - started
