"""The per-host doit state is on disk as soon as a task succeeds, not only when doit's run ends:
a live-booted server powered off hard must resume after the last stage it finished."""

from __future__ import annotations

import json
from pathlib import Path

from doit.dependency import JSONCodec

from tasks.lib import state


def test_a_finished_task_is_written_at_once(tmp_path: Path) -> None:
    state.register_host("web9", tmp_path / "web9" / ".p2v")
    db = state.HostStateDB(str(tmp_path / "global.json"), JSONCodec())
    path = tmp_path / "web9" / ".p2v" / state.STATE_FILE_NAME
    db.set("inspect:web9", "_values_:", {})
    assert not path.exists()  # a task half-recorded is not written
    db.set("inspect:web9", state.TASK_DONE_KEY, [])
    assert json.loads(path.read_text())["inspect:web9"] == {"_values_:": {}, state.TASK_DONE_KEY: []}
    # Nothing is written twice: the run's final dump finds the file clean.
    path.unlink()
    db.dump()
    assert not path.exists()
