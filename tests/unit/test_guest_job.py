"""The job boot's qemu command line, the md-lvm fixture's key, and LVM's read-only activation config (pure)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from live.build import LiveImage
from tasks.lib.runner import P2VError
from tasks.lib.storage import md_examine_facts, read_only_activation_config
from tests.fixtures.guest import JOB_ARGUMENT, GuestDisk, disk_by_serial, job_qemu_argv
from tests.fixtures.md_lvm import DESCRIPTION, Identities, fixture_key, shell_variables


def drives(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-drive"]


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == "-device"]


def test_a_job_boot_keeps_what_the_job_writes_and_refuses_writes_to_read_only_disks(tmp_path: Path) -> None:
    image = LiveImage(tmp_path / "live")
    disks = [GuestDisk(Path("/c/disk1.img"), "mdlvm-disk1"), GuestDisk(Path("/c/disk2.img"), "mdlvm-disk2", True)]
    argv = job_qemu_argv(image, f"root=live:x {JOB_ARGUMENT}", tmp_path / "job.img", disks, tmp_path / "serial.log")
    assert "-snapshot" not in argv
    assert argv[argv.index("-append") + 1].endswith(" p2v.job")
    assert argv[argv.index("-kernel") + 1] == str(image.kernel)
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert drives(argv) == [f"file={tmp_path / 'job.img'},format=raw,if=none,id=job,cache=unsafe",
                            "file=/c/disk1.img,format=raw,if=none,id=disk0",
                            "file=/c/disk2.img,format=raw,if=none,id=disk1,readonly=on"]
    assert devices(argv)[-2:] == ["virtio-blk-pci,drive=disk0,serial=mdlvm-disk1",
                                  "virtio-blk-pci,drive=disk1,serial=mdlvm-disk2"]
    assert disk_by_serial("mdlvm-disk1") == "/dev/disk/by-id/virtio-mdlvm-disk1"


def test_a_serial_virtio_would_truncate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(P2VError, match="longer than 20 bytes"):
        job_qemu_argv(LiveImage(tmp_path), "", tmp_path / "job.img", [GuestDisk(tmp_path / "d", "x" * 21)],
                      tmp_path / "serial.log")


def test_the_fixture_key_follows_the_description() -> None:
    assert fixture_key() == fixture_key(DESCRIPTION)
    assert fixture_key(replace(DESCRIPTION, vg="vg_other")) != fixture_key()
    ids = Identities.derived(fixture_key())
    variables = shell_variables(DESCRIPTION, ids)
    assert "VG='vg_mdlvm'\n" in variables and f"MD_UUID='{ids.md_uuid}'\n" in variables


def test_the_fixture_names_its_array_and_filesystems_before_the_guest_makes_them() -> None:
    ids = Identities.derived("0123456789ab")
    assert ids == Identities.derived("0123456789ab") != Identities.derived("ba9876543210")
    assert re.fullmatch(r"[0-9a-f]{8}(:[0-9a-f]{8}){3}", ids.md_uuid)  # the form mdadm --uuid and mdadm.conf take
    assert len({ids.md_uuid.replace(":", ""), ids.root_uuid.replace("-", ""), ids.swap_uuid.replace("-", "")}) == 3


def test_read_only_activation_names_every_volume_group() -> None:
    assert read_only_activation_config(["vg_a", "vg_b"]) == 'activation { read_only_volume_list = [ "vg_a", "vg_b" ] }'


# `mdadm --examine` of a RAID1 member (metadata 1.2) as mdadm 4.2 prints it, shortened.
EXAMINE = """\
/dev/vdb1:
          Magic : a92b4efc
        Version : 1.2
    Feature Map : 0x0
     Array UUID : 70d4430a:04db66f9:862cbb03:36584ff8
           Name : quick:0
     Raid Level : raid1
   Raid Devices : 2

 Avail Dev Size : 2093056 sectors (1022.00 MiB 1071.64 MB)
     Array Size : 1046528 KiB (1022.00 MiB 1071.64 MB)
    Data Offset : 2048 sectors
   Super Offset : 8 sectors
"""


def test_md_metadata_version_offset_and_size_come_from_examine() -> None:
    assert md_examine_facts(EXAMINE) == {"metadata": "1.2", "data_offset": 2048 * 512, "array_size": 1046528 * 1024}
    assert md_examine_facts("") == {"metadata": "", "data_offset": 0, "array_size": 0}
