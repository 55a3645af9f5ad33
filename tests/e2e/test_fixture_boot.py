"""Every fixture server boots, as the old hardware would: IDE/SATA disks, an e1000 NIC, BIOS or UEFI.

Inside the guest, `findmnt --fstab --verify` passes, every fstab filesystem is
mounted and every fstab swap is active. qemu runs on TCG with -snapshot, so
the cached images are never written.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from typing import Any

import pytest

from tasks.lib.bootcheck import BootResult, boot_check
from tests.fixtures.plugin import FIXTURE_NAMES
from tests.fixtures.system import TCG_PATIENCE_MINUTES

log = logging.getLogger("p2v.tests")

VERIFY = "findmnt --fstab --verify"
# Each fstab entry with its source resolved (UUID=, /dev/mapper/...) to a device path.
FSTAB = "findmnt --fstab --evaluate --json -o SOURCE,TARGET,FSTYPE"
MOUNTED = "findmnt --json --list -o SOURCE,TARGET,FSTYPE"
SWAPS = "for d in $(swapon --show=NAME --noheadings --raw); do readlink -f $d; done"
CMDLINE = "cat /proc/cmdline"
# The login prompt can come before the network service has configured the interfaces (seen on
# dracut-bookworm under load: only lo listed): wait until an address is there, 90 s at most (the
# boot checker gives a command 120 s).
ADDRESSES = ("for i in $(seq 90); do ip -br -4 address show | grep -qv '^lo ' && break; sleep 1; done; "
             "ip -br -4 address show")
HOSTNAME = "hostname"
# The fixtures' systemd waits longer than its 90 s default (tests/fixtures/system.py says why).
PATIENCE = "systemctl show --property=DefaultTimeoutStartUSec"
# A line on the console while a command runs (a first-boot service's output) is not the command's.
CONSOLE_NOISE = "echo a console line from elsewhere > /dev/console; echo the answer; false"


def _resolve(device: str, resolved: dict[str, str]) -> str:
    return resolved.get(device, device)


def _expected_swaps_command(facts: dict[str, Any]) -> str:
    swap_sources = [line.split()[0] for line in facts["fstab"].splitlines() if " swap " in f" {line} "]
    resolve_swaps = "; ".join(f"readlink -f {source}" for source in swap_sources if source.startswith("/dev/"))
    swap_uuids = "; ".join(
        f"readlink -f $(blkid -U {source.removeprefix('UUID=')})"
        for source in swap_sources
        if source.startswith("UUID=")
    )
    return "; ".join(c for c in (resolve_swaps, swap_uuids) if c) or "true"


@pytest.fixture(scope="module")
def boots(request: pytest.FixtureRequest, fixture_server: Any,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootResult | Exception]:
    """Every selected fixture booted, two at a time: TCG runs one vCPU per guest, and this machine has two cores."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if isinstance(item, pytest.Function) and item.module is request.module
                and hasattr(item, "callspec") and "name" in item.callspec.params}
    names = [name for name in FIXTURE_NAMES if name in selected]
    servers = {name: fixture_server(name) for name in names}
    scratch = tmp_path_factory.mktemp("fixture-boots")

    def boot(name: str) -> BootResult:
        server = servers[name]
        return boot_check(
            server.disks,
            [VERIFY, FSTAB, MOUNTED, SWAPS, _expected_swaps_command(server.facts), CMDLINE, ADDRESSES, HOSTNAME,
             PATIENCE, CONSOLE_NOISE],
            disk_bus=server.disk_bus, nic_model="e1000", mac=server.mac, login=server.login, timeout=900,
            serial_log=scratch / f"{name}.serial.log",
            # UEFI servers boot OVMF with their own NVRAM (the installer's boot entry).
            firmware="uefi" if server.firmware == "uefi" else "bios", varstore=server.varstore,
        )

    results: dict[str, BootResult | Exception] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {name: pool.submit(boot, name) for name in names}
        for name, job in jobs.items():
            try:
                results[name] = job.result()
            except Exception as error:  # reported by that fixture's test
                results[name] = error
    return results


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_boots_with_its_fstab_satisfied(name: str, fixture_server: Any,
                                                boots: dict[str, BootResult | Exception]) -> None:
    server = fixture_server(name)
    facts = server.facts
    expected_swaps_command = _expected_swaps_command(facts)
    result = boots[name]
    if isinstance(result, Exception):
        raise result
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
    assert outputs[PATIENCE].output.strip() == f"DefaultTimeoutStartUSec={TCG_PATIENCE_MINUTES}min"
    noisy = outputs[CONSOLE_NOISE]
    assert (noisy.output, noisy.exit_code) == ("the answer", 1)
    assert result.powered_off
    if server.firmware == "uefi":
        # Booted by the NVRAM entry for EFI/debian (there is no fallback loader on the ESP).
        serial = result.serial_log.read_bytes().decode(errors="replace")
        nvram = facts["bootloader"]["nvram"]
        assert f'starting {nvram["entry"]} "{nvram["title"]}"' in serial
        assert "\\EFI\\debian\\grubx64.efi" in serial
        assert not any(path.upper().startswith("/EFI/BOOT") for path in facts["bootloader"]["esp"])
