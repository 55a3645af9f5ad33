"""What every fix step gets (the mounted target, the plan, the layout) and what it reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import fixes
from tasks.lib.distro import family_of_system
from tasks.lib.fixes import EditPlan
from tasks.lib.fixjournal import FixJournal
from tasks.lib.outputs import StepReceipt
from tasks.lib.packages import PackageTooling
from tasks.lib.paths import RootTreeReader, resolve_in_root
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import chroot_run
from tasks.lib.spec import Spec
from tasks.lib.target import MountedTarget

# Temporary files of the commands fix runs in the target: on the chroot's /run (a tmpfs of the run).
CHROOT_TMP = "/run/p2v-tmp"
# What the commands fix runs in the target get besides their own environment. PYTHONHASHSEED: the
# bytecode a package script compiles (py3compile) is the same from run to run, as SOURCE_DATE_EPOCH
# makes the initrd; Python before 3.11 writes a frozenset constant in string-hash order, which is
# random per process otherwise.
CHROOT_STEP_ENV = {"TMPDIR": CHROOT_TMP, "PYTHONHASHSEED": "0"}


@dataclass
class StepReport:
    name: str
    status: str = "unchanged"  # changed | unchanged | skipped
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def changed(self, what: str) -> None:
        self.status = "changed"
        self.changes.append(what)

    def to_json(self) -> StepReceipt:
        return {"name": self.name, "status": self.status, "changes": self.changes, "warnings": self.warnings,
                "commands": self.commands}


@dataclass
class FixContext:
    spec: Spec
    layout: Mapping[str, Any]
    plan: DiskPlan
    target: MountedTarget
    edits: EditPlan
    reports: dict[str, StepReport] = field(default_factory=dict)
    installed_packages: list[str] = field(default_factory=list)
    restored_flags: list[tuple[str, str]] = field(default_factory=list)  # (path, letters) set by inode-flags
    journal: FixJournal | None = None  # what an unfinished earlier fix of this copy did

    @property
    def root(self) -> Path:
        return self.target.root

    @property
    def tree(self) -> RootTreeReader:
        return RootTreeReader(self.root)

    @property
    def packaging(self) -> PackageTooling:
        """The package tooling the source's distro family installs and queries with."""
        system = fixes.describe(self.layout)
        return family_of_system(system).packaging(system)

    def report(self, step: str) -> StepReport:
        return self.reports.setdefault(step, StepReport(step))

    def chroot(self, step: str, argv: Sequence[str], *, timeout: float = 900,
               env: Mapping[str, str] | None = None, input: str | None = None) -> str:
        """Run a command in the target; its line goes into the step's report.

        Its temporary files (apt's unpacked debs, mkinitramfs' tree) go to the chroot's /run, p2v's
        tmpfs: a killed run leaves none of them in the image's /tmp or /var/tmp (CHROOT_STEP_ENV)."""
        self.report(step).commands.append(" ".join(argv))
        scratch = resolve_in_root(self.root, CHROOT_TMP)
        scratch.mkdir(exist_ok=True)
        scratch.chmod(0o1777)  # as /tmp: a package script may write it as another user
        result = chroot_run(self.root, list(argv), env={**CHROOT_STEP_ENV, **(env or {})}, timeout=timeout,
                            input=input)
        return result.stdout
