"""The fix journal: what an unfinished fix did, read back by the run that finishes it (same copy only)."""

from __future__ import annotations

from pathlib import Path

from tasks.lib.fixjournal import FixJournal, discard
from tasks.lib.outputs import StepReceipt

FSTAB: StepReceipt = {"name": "fstab", "status": "changed", "changes": ["edited /etc/fstab: new UUIDs"],
                      "warnings": [], "commands": []}


def test_a_later_run_on_the_same_copy_reads_what_the_unfinished_one_did(tmp_path: Path) -> None:
    path = tmp_path / "fix-journal.json"
    first = FixJournal.open(path, "copy-1")
    assert first.earlier("fstab") is None
    first.finished(FSTAB)
    assert first.plan_once("packages", "missing", ["cloud-init", "qemu-guest-agent"]) == [
        "cloud-init", "qemu-guest-agent"]
    # killed here: the next run finds both
    second = FixJournal.open(path, "copy-1")
    assert second.earlier("fstab") == FSTAB
    assert second.plan_once("packages", "missing", ["cloud-init"]) == ["cloud-init", "qemu-guest-agent"]
    discard(path)
    assert not path.exists()
    assert FixJournal.open(path, "copy-1").earlier("fstab") is None  # a finished fix leaves nothing to resume


def test_another_copy_or_a_torn_file_is_nothing_to_resume(tmp_path: Path) -> None:
    path = tmp_path / "fix-journal.json"
    FixJournal.open(path, "copy-1").finished(FSTAB)
    assert FixJournal.open(path, "copy-2").earlier("fstab") is None  # sync copied again since
    path.write_text('{"copy": "copy-1", "done": {')
    assert FixJournal.open(path, "copy-1").earlier("fstab") is None
