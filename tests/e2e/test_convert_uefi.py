"""A UEFI server converted end to end and booted the way Nova boots it: q35, OVMF, an empty NVRAM.

The uefi-bookworm fixture boots by its NVRAM entry for EFI/debian/grubx64.efi
and has no fallback loader. Converted (flatten: its /boot merges into /, so
the source's grubx64.efi, which finds /boot by UUID, is useless), the verify
stage must boot it under OVMF with an empty variable store on q35 and virtio:
only EFI/BOOT/BOOTX64.EFI, written by the fix stage, can boot it. The ESP is
read and written by mtools all the way (this kernel mounts no vfat); the
source's sha256 must not change and nothing may stay mounted or attached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.lib import esp
from tasks.lib.plan import DiskPlan
from tasks.lib.resources import loop_device
from tests.e2e.test_convert import conversion_spec, doit, own_server
from tests.fixtures.build import build_server
from tests.fixtures.cache import sha256
from tests.integration.test_inspect import host_leftovers

NAME = "uefi-bookworm"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = tmp_path_factory.mktemp("convert-uefi")
    server = own_server(build_server(NAME), project / "sources")
    spec_dir = conversion_spec(project, server, "flatten")
    before = {disk: sha256(disk) for disk in server.disks}
    started = time.monotonic()
    result = doit(spec_dir, f"report:{NAME}")
    seconds = time.monotonic() - started
    workdir = project / "work" / NAME
    print(f"\n{NAME}: inspect through report in {seconds:.0f} s")
    return {"server": server, "result": result, "workdir": workdir, "seconds": seconds, "before": before,
            "after": {disk: sha256(disk) for disk in server.disks},
            # Only this host's: other conversions may run on the same machine.
            "leftovers": host_leftovers(spec_dir)}


def _stamp(workdir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workdir / name).read_text())
    return data


def test_converted_and_verified_under_ovmf_on_q35(converted: dict[str, Any]) -> None:
    result = converted["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    verified = _stamp(converted["workdir"], "verified.stamp")
    assert [c["name"] for c in verified["checks"] if not c["ok"]] == []
    checks = {c["name"]: c for c in verified["checks"]}
    assert {"system-state", "root-virtio", "mounts", "swap", "network", "cloud-init", "uefi"} <= set(checks)
    assert "booted-by-uefi" in checks["uefi"]["output"]
    assert verified["machine"]["machine_type"] == "q35" and verified["machine"]["firmware"] == "uefi"
    assert verified["machine"]["hw_machine_type"] == "q35"
    print(f"verify: login after {verified['seconds_to_login']} s under OVMF")
    serial = (converted["workdir"] / "logs/verify-serial.log").read_bytes().decode(errors="replace")
    # An empty variable store: no entry of the source's, the firmware found the fallback by itself.
    assert "Boot0001 \"debian\"" not in serial
    report = (converted["workdir"] / "report.md").read_text()
    assert "booted on machine type q35 with UEFI (OVMF, empty variable store)" in report


def test_esp_holds_the_new_loader_at_both_paths_and_the_rest_as_on_the_source(converted: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    workdir, server = converted["workdir"], converted["server"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    assert plan.label == "gpt" and plan.firmware == "uefi"
    esp_part = plan.partition_of("/boot/efi")
    assert esp_part.filesystem is not None and esp_part.filesystem.fstype == "vfat" and "esp" in esp_part.flags
    with loop_device(workdir / "disk.img", read_only=True, partitions=True) as loop:
        target = esp.snapshot(loop.partition(esp_part.number), tmp_path)
    files = {e.path: e for e in target.entries if e.kind == "file"}
    source_paths = [p.rstrip("/") for p in server.facts["bootloader"]["esp"]]
    assert set(source_paths) <= {e.path for e in target.entries}
    vendor, fallback = files["/EFI/debian/grubx64.efi"], files["/EFI/BOOT/BOOTX64.EFI"]
    assert vendor.sha256 == fallback.sha256
    with loop_device(workdir / "disk.img", read_only=True, partitions=True) as loop:
        scratch = tmp_path / "esp"
        scratch.mkdir()
        esp.extract(loop.partition(esp_part.number), scratch)
    # The embedded config finds the new root (which now holds /boot) by its UUID.
    image = (scratch / "EFI/BOOT/BOOTX64.EFI").read_bytes()
    assert f"search.fs_uuid {plan.filesystem('/').uuid} root".encode() in image
    synced = _stamp(workdir, "rootfs-synced.stamp")
    assert synced["copy"]["esp"]["/boot/efi"]["verified"] is True
    fixed = _stamp(workdir, "fixed.stamp")
    install = next(s for s in fixed["steps"] if s["name"] == "bootloader-install")
    assert any("EFI/BOOT/BOOTX64.EFI" in change for change in install["changes"]), install
    assert any(command.startswith("grub-mkimage -O x86_64-efi") for command in install["commands"]), install


def test_fstab_mounts_the_new_esp(converted: dict[str, Any]) -> None:
    workdir = converted["workdir"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    verified = _stamp(workdir, "verified.stamp")
    mounts = next(c for c in verified["checks"] if c["name"] == "mounts")["output"]
    esp_uuid = plan.filesystem("/boot/efi").uuid
    assert esp_uuid and f"/boot/efi {esp_uuid.lower()} vfat" in mounts.lower()


def test_source_untouched_and_nothing_left(converted: dict[str, Any]) -> None:
    assert converted["before"] == converted["after"]
    assert converted["leftovers"] == []
