"""The live runner's mount of the NFS work area, against a mount(8) that never answers.

A stand-in `mount` first on PATH does what mount(8) does with an NFS server that takes the
connection and says nothing: it forks a helper (mount.nfs) and waits for it. Real processes:
the runner's timeout must end the helper too, not only the command it started.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from live import runner
from tasks.lib.livehost import LiveArgs
from tasks.lib.runner import P2VError

HANGING_MOUNT = """#!/bin/sh
# the helper mount(8) forks for an NFS mount, here one that gets no answer
sleep 300 &
echo $! > {pid_file}
wait
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_mount_with_no_answer_ends_with_its_helper_and_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    pid_file = tmp_path / "helper.pid"
    (stand_ins / "mount").write_text(HANGING_MOUNT.format(pid_file=pid_file))
    (stand_ins / "mount").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_ins}:{os.environ['PATH']}")
    monkeypatch.setattr(runner, "MOUNT_TIMEOUT", 1.0)
    args = LiveArgs(host="web01", work_server="192.0.2.1", work_path=str(tmp_path / "work"), work_tries=2)
    console = runner.Console(consoles=[])
    with pytest.raises(P2VError) as raised:
        runner.mount_work_area(args, console, delay=0)
    assert str(raised.value).startswith(
        f"cannot mount the work area 192.0.2.1:{tmp_path / 'work'} after 2 tries: no answer within 1 s")
    assert console.lines[-1].endswith("(try 2/2): no answer within 1 s")
    helper = int(pid_file.read_text())
    assert not _alive(helper), "the mount helper outlived the try that started it"
