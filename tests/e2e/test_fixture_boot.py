"""Every fixture server boots, as the old hardware would: IDE/SATA disks, an e1000 NIC.

Inside the guest, `findmnt --fstab --verify` passes, every fstab filesystem is
mounted and every fstab swap is active. qemu runs on TCG with -snapshot, so
the cached images are never written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tasks.lib.bootcheck import boot_check
from tests.fixtures.plugin import FIXTURE_NAMES

log = logging.getLogger("p2v.tests")

VERIFY = "findmnt --fstab --verify"
# Each fstab entry with its source resolved (UUID=, /dev/mapper/...) to a device path.
FSTAB = "findmnt --fstab --evaluate --json -o SOURCE,TARGET,FSTYPE"
MOUNTED = "findmnt --json --list -o SOURCE,TARGET,FSTYPE"
SWAPS = "for d in $(swapon --show=NAME --noheadings --raw); do readlink -f $d; done"
CMDLINE = "cat /proc/cmdline"
ADDRESSES = "ip -br -4 address show"
HOSTNAME = "hostname"


def _resolve(device: str, resolved: dict[str, str]) -> str:
    return resolved.get(device, device)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_boots_with_its_fstab_satisfied(name: str, fixture_server, tmp_path: Path) -> None:
    server = fixture_server(name)
    facts = server.facts
    swap_sources = [line.split()[0] for line in facts["fstab"].splitlines() if " swap " in f" {line} "]
    resolve_swaps = "; ".join(f"readlink -f {source}" for source in swap_sources if source.startswith("/dev/"))
    swap_uuids = "; ".join(
        f"readlink -f $(blkid -U {source.removeprefix('UUID=')})"
        for source in swap_sources
        if source.startswith("UUID=")
    )
    expected_swaps_command = "; ".join(c for c in (resolve_swaps, swap_uuids) if c) or "true"
    result = boot_check(
        server.disks,
        [VERIFY, FSTAB, MOUNTED, SWAPS, expected_swaps_command, CMDLINE, ADDRESSES, HOSTNAME],
        disk_bus=server.disk_bus,
        nic_model="e1000",
        mac=server.mac,
        login=server.login,
        timeout=900,
        serial_log=tmp_path / f"{name}.serial.log",
    )
    log.info("%s reached login after %.0f s", name, result.seconds_to_login)
    outputs = {item.command: item for item in result.outputs}

    verify = outputs[VERIFY]
    assert verify.exit_code == 0, verify.output
    assert "0 parse errors, 0 errors" in verify.output or "Success" in verify.output, verify.output

    fstab = json.loads(outputs[FSTAB].output)["filesystems"]
    mounted = {fs["target"]: fs for fs in json.loads(outputs[MOUNTED].output)["filesystems"]}
    wanted = [fs for fs in fstab if fs["fstype"] != "swap"]
    assert {fs["target"] for fs in wanted} == {fs["mountpoint"] for fs in facts["filesystems"]}
    for entry in wanted:
        assert entry["target"] in mounted, f"{entry['target']} is not mounted"
        assert mounted[entry["target"]]["fstype"] == entry["fstype"]

    active_swaps = set(outputs[SWAPS].output.split())
    expected_swaps = set(outputs[expected_swaps_command].output.split())
    assert len(expected_swaps) == len(facts["swap"]) > 0
    assert expected_swaps <= active_swaps, f"swap not active: {expected_swaps - active_swaps}"

    cmdline = outputs[CMDLINE].output
    assert f"root={facts['bootloader']['root_spec']} " in cmdline
    assert "loop" not in cmdline and "console=ttyS0,115200n8" in cmdline
    for interface in facts["network"]["interfaces"]:
        assert interface["address"] in outputs[ADDRESSES].output
    assert outputs[HOSTNAME].output.strip() == facts["hostname"]
    assert result.powered_off
