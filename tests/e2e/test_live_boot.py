"""The live system boots the way a PXE boot starts it, and has what p2v needs.

qemu (TCG) gets the kernel and the initrd; the kernel command line is the one
the PXE menus carry (live.cmdline), with the squashfs at
http://10.0.2.2:<port>/squashfs.img: qemu's user network maps 10.0.2.2 to this
machine's loopback, where the test serves the build's directory on 127.0.0.1.
In the booted system: device-mapper and md, the tools, the p2v venv, and no
md array or LV assembled by itself (the source's disks are never touched
behind p2v's back).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from live.build import LiveImage, ensure_live
from live.cmdline import SQUASHFS_NAME, live_cmdline
from live.inputs import HOSTNAME, PROJECT_DIR
from live.tools import LIVE_TOOLS
from tasks.lib.bootcheck import BootResult, KernelBootConfig, boot_kernel_check, clean_serial_text

log = logging.getLogger("p2v.tests")

ROOT = Path(__file__).resolve().parents[2]
# What the issue asks for: an old server with 2 GiB must run the live system.
MEMORY_MIB = 2048
SCRATCH_BYTES = 64 * 1024 * 1024
VG = "p2vlivetest"

DEVICE_MAPPER = "modprobe dm_mod && modprobe md_mod && test -e /dev/mapper/control && test -e /proc/mdstat && echo ok"
TOOLS = "for t in " + " ".join(LIVE_TOOLS) + "; do command -v $t >/dev/null || echo missing: $t; done; echo checked"
VENV = (f"cd {PROJECT_DIR} && .venv/bin/doit --version | head -1 && "
        ".venv/bin/python -c 'import parted, tasks; print(len(tasks.STAGES), \"stages\")'")
# An md RAID1 on two scratch disks and a volume group on the third, made and
# stopped; then what boot does when such disks appear (udev add events), and
# what an `--assemble --scan` or `-aay` service would do. Nothing may come up.
MAKE_RAID_LVM = (
    "mdadm --create /dev/md0 --run --assume-clean --level=1 --raid-devices=2 --metadata=1.2 /dev/vda /dev/vdb"
    f" && mdadm --stop /dev/md0 && pvcreate -q /dev/vdc && vgcreate -q {VG} /dev/vdc"
    f" && lvcreate -q -y -L 8M -n lv {VG} && vgchange -q -an {VG} && echo made"
)
TRIGGER = ("udevadm trigger --action=add --subsystem-match=block && udevadm settle && sleep 3;"
           " mdadm --assemble --scan; vgchange -aay; udevadm settle;"
           " echo arrays: $(grep -c ^md /proc/mdstat); echo lvs: $(dmsetup ls | grep -c " + VG + ")")
# The control: the same array and LV do come up when asked to, so "nothing came
# up" above is the live system's configuration, not a broken array.
CONTROL = ("printf 'AUTO +all\\n' > /tmp/p2v-auto.conf && mdadm --assemble --scan --config=/tmp/p2v-auto.conf"
           f" && vgchange -ay {VG} && echo arrays: $(grep -c ^md /proc/mdstat)"
           f" && echo lvs: $(dmsetup ls | grep -c {VG})"
           f" && vgchange -an {VG} && mdadm --stop --scan")


@contextlib.contextmanager
def served(directory: Path) -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on 127.0.0.1 for `directory`; yields its port and the paths it served."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def live_image() -> LiveImage:
    started = time.monotonic()
    image = ensure_live()
    log.info("live system %s ready after %.0f s", image.key, time.monotonic() - started)
    return image


@pytest.fixture(scope="module")
def boot(live_image: LiveImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[BootResult, list[str], str]:
    scratch = tmp_path_factory.mktemp("live-boot")
    disks = []
    for name in ("a", "b", "c"):
        disk = scratch / f"scratch-{name}.img"
        with disk.open("wb") as handle:
            handle.truncate(SCRATCH_BYTES)
        disks.append(disk)
    with served(live_image.directory) as (port, requests):
        append = live_cmdline(f"http://10.0.2.2:{port}/{SQUASHFS_NAME}")
        config = KernelBootConfig(kernel=live_image.kernel, initrd=live_image.initrd, append=append,
                                  memory_mib=MEMORY_MIB, disks=tuple(disks))
        result = boot_kernel_check(
            config,
            ["cat /proc/cmdline", "systemctl is-system-running --wait", "hostname", "findmnt -n -o FSTYPE /",
             DEVICE_MAPPER, "mdadm --version", "lvm version | head -1", "mount.nfs -V",
             "qemu-storage-daemon --version | head -1", VENV, TOOLS, "ip -br -4 address show", "free -m",
             MAKE_RAID_LVM, TRIGGER, CONTROL],
            serial_log=scratch / "live.serial.log", timeout=1200, command_timeout=300,
        )
    log.info("live system: a shell %.0f s after qemu started (TCG, %d MiB)", result.seconds_to_login, MEMORY_MIB)
    return result, requests, append


def test_the_live_system_boots_from_http_with_the_pxe_command_line(boot: tuple[BootResult, list[str], str]) -> None:
    result, requests, append = boot
    assert f"/{SQUASHFS_NAME}" in requests, f"the squashfs was never fetched over HTTP: {requests}"
    assert result.output_of("cat /proc/cmdline").output.strip() == append
    assert result.output_of("systemctl is-system-running --wait").output.strip() == "running"
    assert "FAILED" not in clean_serial_text(result.serial_log.read_bytes())
    assert result.output_of("hostname").output.strip() == HOSTNAME
    assert result.output_of("findmnt -n -o FSTYPE /").output.strip() == "overlay"
    assert "10.0.2.15" in result.output_of("ip -br -4 address show").output
    assert result.powered_off


def test_device_mapper_md_and_the_tools_are_there(boot: tuple[BootResult, list[str], str]) -> None:
    result, _, _ = boot
    for command in (DEVICE_MAPPER, "mdadm --version", "lvm version | head -1", "mount.nfs -V",
                    "qemu-storage-daemon --version | head -1", VENV, TOOLS):
        out = result.output_of(command)
        assert out.exit_code == 0, f"{command}: exit {out.exit_code}\n{out.output}"
    assert result.output_of(DEVICE_MAPPER).output.strip() == "ok"
    assert "mdadm - v" in result.output_of("mdadm --version").output
    assert "qemu-storage-daemon version" in result.output_of("qemu-storage-daemon --version | head -1").output
    assert result.output_of(VENV).output.strip().endswith("7 stages")
    assert result.output_of(TOOLS).output.strip() == "checked"


def test_no_md_array_or_lv_comes_up_by_itself(boot: tuple[BootResult, list[str], str]) -> None:
    result, _, _ = boot
    made = result.output_of(MAKE_RAID_LVM)
    assert made.exit_code == 0 and made.output.strip().endswith("made"), made.output
    after = result.output_of(TRIGGER).output
    assert "arrays: 0" in after and "lvs: 0" in after, after
    control = result.output_of(CONTROL)
    assert control.exit_code == 0 and "arrays: 1" in control.output and "lvs: 1" in control.output, control.output


def test_a_cached_build_does_no_work(live_image: LiveImage) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in live_image.directory.iterdir()}
    top = live_image.directory.parent
    logs = {p.name: p.stat().st_mtime_ns for p in top.glob("*.build.log")}
    started = time.monotonic()
    again = ensure_live()
    in_process = time.monotonic() - started
    started = time.monotonic()
    printed = subprocess.run([str(ROOT / "bin/live-build")], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    command = time.monotonic() - started
    log.info("cached live build: %.3f s in process, %.3f s as bin/live-build", in_process, command)
    assert again == live_image
    assert printed.stdout.strip() == str(live_image.directory)
    assert in_process < 0.5 and command < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in live_image.directory.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in top.glob("*.build.log")} == logs
    assert not list(top.glob("*.partial"))
