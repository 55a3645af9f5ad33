"""The live runner's decisions on this machine's data: its kernel command line, its disks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.lib.livehost import LiveArgs, console_devices, local_disks, parse_cmdline, resolve_disks
from tasks.lib.pxe import kernel_cmdline
from tasks.lib.runner import P2VError
from tasks.lib.site import load_site
from tasks.lib.spec import SpecError, load_specs
from tests.unit.test_pxe import SPECS, project

LSBLK: dict[str, list[dict[str, Any]]] = {"blockdevices": [
    {"name": "loop0", "path": "/dev/loop0", "type": "loop", "rm": False, "size": 600 << 20, "serial": None,
     "wwn": None},
    {"name": "sda", "path": "/dev/sda", "type": "disk", "rm": False, "size": 500 << 30, "serial": "Z1D2E3F4",
     "wwn": "0x5000c500a1b2c3d4"},
    {"name": "sdb", "path": "/dev/sdb", "type": "disk", "rm": False, "size": 500 << 30, "serial": "Z9Y8X7W6",
     "wwn": "0x5000c500a1b2c3d0"},
    {"name": "sdc", "path": "/dev/sdc", "type": "disk", "rm": True, "size": 8 << 30, "serial": "USBSTICK",
     "wwn": None},
    {"name": "sr0", "path": "/dev/sr0", "type": "rom", "rm": True, "size": 1 << 30, "serial": None, "wwn": None},
]}


def test_the_rendered_command_line_is_what_the_runner_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir, site_file = project(tmp_path)
    monkeypatch.setenv("P2V_SITE", str(site_file))
    site = load_site(site_file, base=tmp_path)
    specs = {s.host: s for s in load_specs(spec_dir)}
    assert parse_cmdline("BOOT_IMAGE=vmlinuz " + kernel_cmdline(site, specs["web1"])) == LiveArgs(
        host="web1", work_server="192.0.2.1", work_path="/srv/p2v/work/web1", debug=False)
    assert parse_cmdline(kernel_cmdline(site, specs["db2"])).debug
    assert SPECS  # the same specs as the golden files


def test_the_site_says_how_often_the_runner_tries_the_work_area(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir, site_file = project(tmp_path)
    monkeypatch.setenv("P2V_SITE", str(site_file))
    specs = {s.host: s for s in load_specs(spec_dir)}
    assert "p2v.work_tries=6" in kernel_cmdline(load_site(site_file, base=tmp_path), specs["web1"])
    site_file.write_text(site_file.read_text() + "work_area_tries: 2\n")
    cmdline = kernel_cmdline(load_site(site_file, base=tmp_path), specs["web1"])
    assert parse_cmdline(cmdline).work_tries == 2
    site_file.write_text(site_file.read_text().replace("work_area_tries: 2", "work_area_tries: 0"))
    with pytest.raises(SpecError, match="work_area_tries"):
        load_site(site_file, base=tmp_path)


@pytest.mark.parametrize(("cmdline", "message"), [
    ("root=live:http://x/s.img quiet", "the kernel command line lacks p2v.host, p2v.work"),
    ("p2v.host=web1 p2v.work=192.0.2.1", "p2v.work=192.0.2.1 is not <server>:<absolute path>"),
    ("p2v.host=web1 p2v.work=192.0.2.1:/w p2v.work_tries=0", r"p2v.work_tries=0 is not a whole number of tries"),
    ("p2v.host=web1 p2v.work=192.0.2.1:/w p2v.work_tries=x", r"p2v.work_tries=x is not a whole number of tries"),
])
def test_a_command_line_without_p2v_arguments_is_one_line(cmdline: str, message: str) -> None:
    with pytest.raises(P2VError, match=message):
        parse_cmdline(cmdline)


def test_auto_is_every_fixed_local_disk_the_boot_disk_first() -> None:
    disks = local_disks(LSBLK, booting=["sdb"])
    assert [d.path for d in disks] == ["/dev/sdb", "/dev/sda"]
    assert resolve_disks(["auto"], disks, {}) == ["/dev/sdb", "/dev/sda"]
    # Without boot code anywhere the order is by WWN, so a renamed sda/sdb keeps its place.
    assert [d.name for d in local_disks(LSBLK, booting=[])] == ["sdb", "sda"]
    renamed = {"blockdevices": [{**d, "name": {"sda": "sdb", "sdb": "sda"}.get(d["name"], d["name"]),
                                 "path": {"/dev/sda": "/dev/sdb", "/dev/sdb": "/dev/sda"}.get(d["path"], d["path"])}
                                for d in LSBLK["blockdevices"]]}
    assert [d.serial for d in local_disks(renamed, booting=[])] == [d.serial for d in local_disks(LSBLK, booting=[])]


def test_named_disks_resolve_in_the_specs_order() -> None:
    disks = local_disks(LSBLK, booting=["sda"])
    by_id = {"wwn-0x5000c500a1b2c3d0": "sdb", "ata-ST500_Z1D2E3F4": "sda"}
    assert resolve_disks(["serial:Z9Y8X7W6", "/dev/disk/by-id/ata-ST500_Z1D2E3F4"], disks, by_id) == \
        ["/dev/sdb", "/dev/sda"]
    assert resolve_disks(["wwn:0x5000C500A1B2C3D4"], disks, by_id) == ["/dev/sda"]


@pytest.mark.parametrize(("wanted", "message"), [
    (["serial:NOPE"], r"source.disks\[0\]: serial:NOPE matches no local disk of this server \(it has: /dev/sdb"),
    (["serial:USBSTICK"], r"matches no local disk"),  # removable media are never a source
    (["serial:Z1D2E3F4", "wwn:5000c500a1b2c3d4"], r"source.disks\[1\]: wwn:5000c500a1b2c3d4 is /dev/sda, which an"),
])
def test_a_disk_the_server_does_not_have_is_one_line(wanted: list[str], message: str) -> None:
    with pytest.raises(P2VError, match=message):
        resolve_disks(wanted, local_disks(LSBLK, booting=[]), {})


def test_no_local_disk_at_all() -> None:
    with pytest.raises(P2VError, match="sees no local disk"):
        resolve_disks(["auto"], local_disks({"blockdevices": LSBLK["blockdevices"][:1]}, booting=[]), {})


def test_each_console_is_written_once() -> None:
    assert console_devices("tty0 ttyS0\n") == ["/dev/tty0", "/dev/ttyS0"]
    assert console_devices("ttyS0 ttyS0") == ["/dev/ttyS0"]
    assert console_devices("") == ["/dev/console"]
