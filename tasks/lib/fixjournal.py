"""What an unfinished fix had done, so that the run that finishes it can say so.

Each fix step is idempotent: run again on an image it already changed, it
finds nothing to do and its receipt says "unchanged". After a fix that was
killed (or failed) half-way, the run that finishes it would then report
"unchanged" for fstab, grub, the network and the packages that the earlier
run changed, and report.md would say the conversion left them alone.

So fix keeps a journal beside its target while it works
(`<workdir>/.p2v/fix-journal.json`): the receipt of every step it finished,
and the facts a step planned from before it changed anything (the packages
the server lacked). A later run on the same copy (the same sync receipt)
reads it: a step that finds nothing to do reports what the earlier run did,
and the package step installs what was missing at the start. A finished fix
removes the journal once its stamp is in place (not before: a kill between
the two would leave a rerun with neither), so a deliberate rerun of a
finished fix reports what it did itself; a new copy (another sync receipt)
makes it void.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib.outputs import StepReceipt, write_json_atomically

log = logging.getLogger("p2v.fix")

JOURNAL_FILE = "fix-journal.json"


@dataclass
class FixJournal:
    path: Path
    copy: str  # sha256 of the sync receipt: the copy the journal's steps worked on
    done: dict[str, StepReceipt] = field(default_factory=dict)
    planned: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, copy: str) -> FixJournal:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or data.get("copy") != copy:
            return cls(path, copy)  # none, torn, or of another copy: nothing to resume
        journal = cls(path, copy, dict(data.get("done", {})), dict(data.get("planned", {})))
        if journal.done or journal.planned:
            log.info("resuming an unfinished fix of this copy: %d step(s) done before (%s)", len(journal.done),
                     ", ".join(journal.done) or "none")
        return journal

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # doit's state directory: not there without doit
        write_json_atomically(self.path, {"copy": self.copy, "done": self.done, "planned": self.planned})

    def earlier(self, step: str) -> StepReceipt | None:
        """The receipt of `step` from an earlier, unfinished run on this copy."""
        return self.done.get(step)

    def finished(self, receipt: StepReceipt) -> None:
        self.done[receipt["name"]] = receipt
        self._save()

    def plan_once(self, step: str, name: str, value: Any) -> Any:
        """`value`, planned now, unless an earlier run on this copy planned it first: then that one."""
        planned = self.planned.setdefault(step, {})
        if name not in planned:
            planned[name] = value
            self._save()
        return planned[name]


def discard(path: Path) -> None:
    """The fix is complete (its stamp in place): nothing to resume."""
    path.unlink(missing_ok=True)
