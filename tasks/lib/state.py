"""doit dependency state kept per host, inside the host's workdir.

doit keeps one dependency file per run. p2v wants the state of `web1` to live
with web1's artifacts, so that the same server live-booted again (or another
machine that mounts the same NFS workdir) resumes where the last run stopped,
and so that hosts converted in parallel never share a state file.

`HostStateDB` is a doit backend (registered in doit.cfg) that routes each task
id `<stage>:<host>` to `<workdir>/.p2v/doit-state.json`; tasks without a host
go to the global dep_file. Each file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.lib.paths import write_file_atomically

STATE_FILE_NAME = "doit-state.json"
# The key doit's Dependency.save_success sets last for a task that succeeded.
TASK_DONE_KEY = "deps:"

# Filled by dodo.py while it describes the tasks: host -> state directory.
_HOST_STATE_DIRS: dict[str, Path] = {}


def register_host(host: str, state_dir: Path) -> None:
    _HOST_STATE_DIRS[host] = state_dir


class _StateFile:
    def __init__(self, path: Path, codec: Any):
        self.path = path
        self.codec = codec
        self.dirty = False
        if path.exists():
            try:
                self.data: dict[str, dict[str, Any]] = codec.decode(path.read_text())
            except ValueError:
                # A torn or hand-edited state only costs a rerun, never a crash.
                self.data = {}
        else:
            self.data = {}

    def dump(self) -> None:
        if self.dirty:
            write_file_atomically(self.path, self.codec.encode(self.data))
            self.dirty = False


class HostStateDB:
    """doit backend interface: get/set/in_/remove/remove_all/dump."""

    desc = "p2v: one JSON state file per host, in the host's workdir"

    def __init__(self, name: str, codec: Any, *, module_name: str | None = None):
        self.name = name  # doit reads it back
        self.codec = codec
        self.global_path = Path(name)
        self._files: dict[Path, _StateFile] = {}

    def _file_for(self, task_id: str) -> _StateFile:
        host = task_id.split(":", 1)[1] if ":" in task_id else None
        if host in _HOST_STATE_DIRS:
            path = _HOST_STATE_DIRS[host] / STATE_FILE_NAME
        else:
            path = self.global_path
        if path not in self._files:
            self._files[path] = _StateFile(path, self.codec)
        return self._files[path]

    def set(self, task_id: str, dependency: str, value: Any) -> None:
        state = self._file_for(task_id)
        state.data.setdefault(task_id, {})[dependency] = value
        state.dirty = True
        if dependency == TASK_DONE_KEY:
            # doit saves its state when the run ends; a server powered off hard
            # (or a killed run) would lose every stage done before: write each
            # host's file as soon as a task's record is complete.
            state.dump()

    def get(self, task_id: str, dependency: str) -> Any:
        return self._file_for(task_id).data.get(task_id, {}).get(dependency)

    def in_(self, task_id: str) -> bool:
        return task_id in self._file_for(task_id).data

    def remove(self, task_id: str) -> None:
        state = self._file_for(task_id)
        if state.data.pop(task_id, None) is not None:
            state.dirty = True

    def remove_all(self) -> None:
        for host in _HOST_STATE_DIRS:
            self._file_for(f"_:{host}")
        self._file_for("_")
        for state in self._files.values():
            state.data = {}
            state.dirty = True

    def dump(self) -> None:
        for state in self._files.values():
            state.dump()


def read_state(state_dir: Path) -> dict[str, Any]:
    """For reports and tests: the recorded state of one host."""
    path = state_dir / STATE_FILE_NAME
    return dict(json.loads(path.read_text())) if path.exists() else {}
