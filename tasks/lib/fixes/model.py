"""What the fix stage's planning produces, and how it reads the target tree.

Everything in `tasks.lib.fixes` is pure: it reads the target tree through a
`TreeReader` (never the host's files), the layout and the completed disk
plan, and returns edits, findings and command lines. The fix stage
(tasks/fix.py) carries them out: it writes each `FileEdit` through
`tasks.lib.paths.write_text_in_root`/`remove_in_root` and runs each command
in the chroot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.lib.source.codec import from_json
from tasks.lib.source.model import SystemDescription

# The drivers a guest needs on OpenStack KVM: disk (blk, scsi), the PCI
# transport they sit on, and the NIC.
VIRTIO_MODULES = ("virtio_blk", "virtio_scsi", "virtio_pci", "virtio_net")


@dataclass(frozen=True)
class FileEdit:
    path: str  # absolute path as the server sees it, e.g. "/etc/fstab"
    text: str | None  # full new content; None = delete the file
    step: str  # "fstab" | "bootloader-config" | "network" | "initrd-config" | "cloud-init-config" | "selinux"
    why: str  # one line for the operator's report
    mode: int | None = None  # for new files (an existing file keeps its own mode)


@dataclass(frozen=True)
class Finding:
    step: str
    message: str  # non-fatal warning, goes to the log and receipt


@dataclass(frozen=True)
class EditPlan:
    edits: tuple[FileEdit, ...]
    findings: tuple[Finding, ...]
    kernel_cmdline: tuple[str, ...]  # the final kernel args of the chosen kernel's boot entry
    kernel: str  # the kernel version chosen


@dataclass(frozen=True)
class Command:
    """A command line to run in the chroot, with what to feed its stdin (or None)."""

    argv: tuple[str, ...]
    input: str | None = None


class TreeReader(Protocol):
    """Reads the TARGET tree as the server sees it; never the host's files."""

    def read(self, path: str) -> str | None: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...  # [] when absent


def describe(layout: Mapping[str, Any]) -> SystemDescription:
    """The layout's `system` section as typed data."""
    return from_json(SystemDescription, layout["system"])


class Changes:
    """Collects the edits and findings of one step; an edit that changes nothing is dropped.

    Dropping no-op edits is what makes planning idempotent: on an already
    fixed tree every rewrite yields the text that is there, so no edit.
    """

    def __init__(self, tree: TreeReader, step: str) -> None:
        self.tree = tree
        self.step = step
        self.edits: list[FileEdit] = []
        self.findings: list[Finding] = []

    def write(self, path: str, text: str, why: str, mode: int | None = None) -> None:
        if self.tree.read(path) != text:
            self.edits.append(FileEdit(path, text, self.step, why, mode))

    def delete(self, path: str, why: str) -> None:
        if self.tree.exists(path):
            self.edits.append(FileEdit(path, None, self.step, why))

    def note(self, message: str) -> None:
        finding = Finding(self.step, message)
        if finding not in self.findings:
            self.findings.append(finding)
