"""Whether disk.img's loop device uses direct I/O: a decision made in one place (tasks/lib/target.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib import target
from tasks.lib.target import NETWORK_FILESYSTEMS, filesystem_magic, loop_direct_io

NFS_SUPER_MAGIC = 0x6969
TMPFS_MAGIC = 0x01021994


def test_statfs_names_the_filesystem_of_a_directory(tmp_path: Path) -> None:
    assert filesystem_magic(Path("/dev/shm")) == TMPFS_MAGIC
    assert filesystem_magic(tmp_path / "missing") is None


def test_network_filesystems_get_a_buffered_loop_without_a_probe(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert NETWORK_FILESYSTEMS[NFS_SUPER_MAGIC] == "nfs"
    monkeypatch.setattr(target, "filesystem_magic", lambda directory: NFS_SUPER_MAGIC)
    probed: list[Path] = []

    def probe(directory: Path) -> bool:
        probed.append(directory)
        return True

    monkeypatch.setattr(target, "takes_direct_io", probe)
    assert loop_direct_io(tmp_path) is False
    assert probed == []  # no O_DIRECT probe file is written on the NFS work area


def test_a_local_filesystem_gets_direct_io_where_it_takes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target, "filesystem_magic", lambda directory: 0xEF53)  # ext4
    monkeypatch.setattr(target, "takes_direct_io", lambda directory: True)
    assert loop_direct_io(tmp_path) is True
    monkeypatch.setattr(target, "takes_direct_io", lambda directory: False)
    assert loop_direct_io(tmp_path) is False
