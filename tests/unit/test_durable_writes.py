"""A rename that marks something done is fsync'ed in its directory, after the rename.

A file's own fsync does not make its new name durable: after a power cut (a live server switched
off, an NFS server's crash) the old name could come back, and a rerun would redo an upload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.lib import outputs, state
from tasks.lib.paths import write_file_atomically


def _recording_fsync(monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]) -> None:
    real_fsync: Callable[[int], None] = os.fsync
    real_replace = os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        events.append(("rename", os.fspath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


def _dump_state(path: Path) -> None:
    """doit's state for one host, as HostStateDB writes it at the end of a run."""
    file = state._StateFile(path, _JsonCodec())
    file.data = {"fix:web01": {"deps:": ""}}
    file.dirty = True
    file.dump()


class _JsonCodec:
    def encode(self, data: object) -> str:
        return json.dumps(data)

    def decode(self, text: str) -> object:
        return json.loads(text)


@pytest.mark.parametrize("write", [
    lambda path: outputs.write_json_atomically(path, {"done": True}),
    lambda path: _dump_state(path),
], ids=["stage outputs", "doit state"])
def test_the_directory_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    write: Callable[[Path], None]) -> None:
    events: list[tuple[str, str]] = []
    _recording_fsync(monkeypatch, events)
    target = tmp_path / "uploaded.stamp"
    write(target)
    assert target.exists()
    renamed = events.index(("rename", str(target)))
    assert ("fsync", str(tmp_path)) in events[renamed + 1:]


def test_a_file_written_0600_is_never_readable_by_others(tmp_path: Path) -> None:
    """Not as the partial file either, even where a killed run left one readable by all."""
    target = tmp_path / "credentials.yaml"
    stale = target.with_name(target.name + ".partial")
    stale.write_text("from a killed run\n")
    stale.chmod(0o644)
    seen: list[int] = []
    real_replace = os.replace

    def replace(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
        seen.append(os.stat(source).st_mode & 0o777)
        real_replace(source, destination)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        write_file_atomically(target, "password: x\n", 0o600)
    assert seen == [0o600] and target.stat().st_mode & 0o777 == 0o600 and not stale.exists()
    assert target.read_text() == "password: x\n"
