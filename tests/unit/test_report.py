"""report.md, byte for byte: every branch of the page against a golden file.

The golden files (tests/unit/data/report/*.md) were recorded from the report as it was rendered
before it moved to a jinja2 template, so a layout change shows up here. After a deliberate change
to the page: `P2V_REGENERATE_REPORT=1 pytest tests/unit/test_report.py`, then read the diff.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.plan import DiskPlan, plan_disk
from tasks.report import render_report
from tests.unit.layouts import layout, with_swap_file
from tests.unit.test_verify_checks import completed_plan, make_spec

GOLDEN = Path(__file__).parent / "data" / "report"

Case = tuple[str, dict[str, Any], DiskPlan, dict[str, Any], dict[str, Any], dict[str, Any]]


def _restored(count: int) -> list[dict[str, str]]:
    return [{"path": f"/srv/locked/{index:02d}", "flags": "i" if index % 2 else "a"} for index in range(count)]


def verified_bios() -> Case:
    """A full run: every receipt filled in, warnings from each stage, a failed check, cells that need escaping."""
    lay = layout("plain-bookworm")
    lay["warnings"] = ["inspect: /opt is on a filesystem that p2v does not know"]
    plan = dataclasses.replace(completed_plan("plain-bookworm"), notes=("a planner note", "another | note"))
    sync = {"seconds": 42.5, "copy": {
        "files": 12345, "bytes": 3 << 30, "manifest_digest": "sha256:feedfacecafebeef0123456789",
        "journal_replayed": [],
        "methods": [{"mountpoint": "/", "method": "blocks", "tool": "e2image", "resize": "shrink in place",
                     "why": "e2image", "seconds": 3.2, "bytes_written": 800 << 20, "removed_after": 20,
                     "released": 36 << 20},
                    {"mountpoint": "/boot", "method": "files", "why": "merged into /"},
                    {"mountpoint": "/srv", "method": "files", "why": "merged into /"}],
        "inode_flags": {"entries": 5, "kept": {"e": 3, "A": 1}, "pending": [{"path": "/etc/x", "flags": "i"}] * 2,
                        "dropped": [{"path": "/srv/y", "flags": "C", "reason": "Operation not supported"}]},
        "warnings": ["copy: 1 socket skipped\n(it is made at boot)"]}}
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["root=UUID=x", "ro", "console=ttyS0,115200n8"],
           "installed_packages": ["cloud-init", "qemu-guest-agent"],
           "warnings": ["network: a | warning", "fstab: two\nlines"],
           "inode_flags": {"restored": _restored(13)},
           "steps": [{"name": "fstab", "status": "changed",
                      "changes": ["edited /etc/fstab: new UUIDs", "commented out /dev/sdb1 | gone"]},
                     {"name": "network", "status": "changed", "changes": ["eth0: kept\n192.0.2.12/24"]},
                     {"name": "initrd", "status": "skipped", "changes": []},
                     {"name": "bootloader", "status": "unchanged"}]}
    verify = {"skipped": False, "seconds_to_login": 91.0,
              "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": "52:54:00:7e:57:01",
                          "machine_type": "pc", "firmware": "bios", "hw_machine_type": "pc",
                          "accel": "tcg", "accel_reason": "/dev/kvm hangs guests on this host"},
              "checks": [{"name": "system-state", "ok": True, "output": "running"},
                         {"name": "hostname", "ok": True, "output": "plain-bookworm\n"},
                         {"name": "swap", "ok": False, "problem": "not active | at all", "output": ""},
                         {"name": "mounts", "ok": False, "problem": "/srv is not mounted\nat all",
                          "output": ("/ 1111 ext4 | x\n" * 40)}]}
    return "plain-bookworm", lay, plan, sync, fix, verify


def skipped_minimal() -> Case:
    """Receipts that say as little as they can (an older p2v), verify skipped, no warning at all."""
    lay = layout("plain-bullseye")
    lay["warnings"] = []
    plan = completed_plan("plain-bullseye")
    return "plain-bullseye", lay, dataclasses.replace(plan, notes=()), {"copy": {}}, {}, {"skipped": True}


def uefi() -> Case:
    """Booted by UEFI, an ESP copied by mtools, no inode flag on the source."""
    lay = layout("uefi-bookworm")
    plan = plan_disk(lay, make_spec())
    plan = plan.with_uuids({p.number: "ABCD-1234" if p.filesystem is not None and p.filesystem.fstype == "vfat"
                            else f"11111111-2222-4333-8444-5555555555{p.number:02d}" for p in plan.partitions})
    sync = {"seconds": 7, "copy": {
        "files": 900, "bytes": 800 << 20, "manifest_digest": "sha256:0011223344556677889900",
        "inode_flags": {"entries": 0, "kept": {}, "pending": [], "dropped": []},
        "esp": {"/boot/efi": {"files": 4, "bytes": 5242880, "verified_by": "listing, sizes, sha256",
                              "digest": "sha256:0123456789abcdef0123"}}}}
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro"], "installed_packages": [],
           "inode_flags": {"restored": []},
           "steps": [{"name": "bootloader", "status": "changed",
                      "changes": ["grub-install --target=x86_64-efi", "copied the fallback loader"]}]}
    verify = {"skipped": False, "seconds_to_login": 120.5,
              "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": "52:54:00:7e:57:02",
                          "machine_type": "q35", "firmware": "uefi", "hw_machine_type": "q35"},
              "checks": [{"name": "uefi", "ok": True, "output": "booted-by-uefi\n/boot/efi/EFI/BOOT/:\nBOOTX64.EFI"}]}
    return "uefi-bookworm", lay, plan, sync, fix, verify


def journal_replayed() -> Case:
    """Two filesystems not shut down cleanly (one not mounted), replayed in an overlay by sync."""
    lay = layout("plain-bookworm")
    for fs in lay["filesystems"]:
        fs["needs_recovery"] = fs.get("mountpoint") in ("/", "/srv")
        if fs.get("mountpoint") == "/srv":
            fs["mountpoint"] = None
    replayed = [{"device": "disk1p2", "mountpoint": "/", "fstype": "ext4", "reason": "ext feature needs_recovery"},
                {"device": "disk2p1", "mountpoint": "/srv", "fstype": "xfs", "reason": "xfs log tail: 2 head: 11"}]
    sync = {"seconds": 3, "copy": {"files": 10, "bytes": 1 << 30, "journal_replayed": replayed, "methods": [
        {"mountpoint": "/", "method": "files", "why": "its journal needs recovery: copied from the replayed view"},
        {"mountpoint": "/boot", "method": "blocks", "tool": "e2image", "resize": "grow",
         "why": "e2image, then resize2fs grows it to the partition", "earlier": True, "seconds": 1.0,
         "bytes_written": 50 << 20, "removed_after": 0, "released": 0,
         "trim_failed": "fstrim: /x: the discard operation is not supported"},
        {"mountpoint": "/srv", "method": "files", "why": "planned by blocks; resize2fs -P says it shrinks to 900 MiB "
                                                          "at best, and the partition has 800 MiB"}]}}
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro"], "installed_packages": [], "steps": [],
           "inode_flags": {"restored": _restored(1)}}
    return "plain-bookworm", lay, completed_plan("plain-bookworm"), sync, fix, {"skipped": True}


def swap_file() -> Case:
    """Swap in a file; verify with a machine receipt that leaves things out."""
    lay = with_swap_file("plain-bookworm", size=256 << 20)
    plan = plan_disk(lay, make_spec()).with_uuids({1: "11111111-2222-4333-8444-555555555501"})
    sync = {"seconds": 3, "copy": {"files": 10, "bytes": 1 << 30,
                                   "inode_flags": {"entries": 2, "kept": {}, "pending": [], "dropped": []}}}
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro", "quiet"], "installed_packages": ["cloud-init"],
           "steps": [{"name": "swap", "status": "changed", "changes": ["made /swap.img (256 MiB)"]}],
           "inode_flags": {"restored": _restored(10)}}
    verify = {"skipped": False, "seconds_to_login": 60,
              "machine": {"disk_bus": "virtio", "nic_model": "e1000", "mac": "52:54:00:7e:57:03",
                          "firmware": "something-else", "accel": "kvm"},
              "checks": [{"name": "swap", "ok": False, "output": "/swap.img file 262140"},
                         {"name": "network", "ok": True}]}
    return "plain-bookworm", lay, plan, sync, fix, verify


def lvm() -> Case:
    """A root on LVM; verify with no machine receipt and no check."""
    lay = layout("lvm-bookworm")
    plan = completed_plan("lvm-bookworm")
    sync = {"seconds": 11, "copy": {"files": 3, "bytes": 12345}}
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": [], "installed_packages": [], "steps": [],
           "warnings": ["lvm: the volume group is gone on the target"]}
    return "lvm-bookworm", lay, plan, sync, fix, {"skipped": False}


CASES: dict[str, Callable[[], Case]] = {f.__name__.replace("_", "-"): f for f in (
    verified_bios, skipped_minimal, uefi, journal_replayed, swap_file, lvm)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_matches_its_golden_file(name: str) -> None:
    text = render_report(*CASES[name]())
    golden = GOLDEN / f"{name}.md"
    if os.environ.get("P2V_REGENERATE_REPORT"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_every_golden_file_has_its_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.md")) == sorted(CASES)
