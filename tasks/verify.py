"""Verify stage: boot the fixed image the way OpenStack would, and check it from inside.

    verify:<host>  fixed.stamp + layout.json + disk-plan.json  ->  verified.stamp

qemu (TCG) boots disk.img on a virtio disk and a virtio NIC with a MAC the
server never had, from a throw-away qcow2 overlay (tasks/lib/overlay.py) that
holds a one-time root password for the serial console; disk.img itself is
only read. Once logged in, each check runs one command and compares its
output with what the layout and the plan promise:

    system-state  systemd reached `running` (or the SysV runlevel is up)
    root-virtio   / is mounted from a virtio disk
    mounts        every planned filesystem is mounted, from its new UUID
    swap          each planned swap area is active with its planned size, as much as the source had
    hostname      the server's own
    network       the kept addresses are on the interfaces of the same name
    cloud-init    installed, when the spec asked for it
    mac-bindings  no file under /etc still names an old MAC
    uefi          (UEFI) booted by UEFI, through the ESP's fallback loader EFI/BOOT/BOOTX64.EFI

The machine is the one Nova would start the image on (tasks/lib/machine.py):
i440fx (pc) with SeaBIOS for BIOS, q35 with OVMF for UEFI. A UEFI boot gets
OVMF's empty variable store, so only the fallback path can boot it.

A failed boot or check fails the stage with the serial console's tail. The
receipt records every check's output.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lib import inodeflags
from tasks.lib.accel import Accel, choose_accel
from tasks.lib.bootcheck import BootCheckError, BootResult, boot_check, serial_tail
from tasks.lib.machine import FIRMWARE_PROPERTY, MACHINE_PROPERTY, BootMachine, boot_machine
from tasks.lib.outputs import VerifyStamp, write_verify_stamp
from tasks.lib.overlay import create_overlay, fuse_export
from tasks.lib.paths import read_text_in_root, write_text_in_root
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import Spec
from tasks.lib.target import target_mount_options
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.verify")

STAMP_FORMAT = "p2v-verify-stamp"
STAMP_VERSION = 2  # 2: the machine type and firmware booted
FIX_STAMP = "fixed.stamp"
VERIFY_MAC = "52:54:00:7e:57:01"  # a MAC no source fixture has: bindings to the old one must be gone
BOOT_TIMEOUT = 900.0  # TCG on a shared two-core machine: boots take 1.5-4 minutes


@dataclass(frozen=True)
class Check:
    name: str
    command: str
    judge: Callable[[str, int], str | None]  # output, exit code -> None when good, else what is wrong


@dataclass(frozen=True)
class CheckResult:
    name: str
    command: str
    output: str
    exit_code: int
    problem: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command, "output": self.output, "exit_code": self.exit_code,
                "ok": self.problem is None, "problem": self.problem}


# ---------------------------------------------------------------- checks (pure)


def expected_mounts(plan: DiskPlan) -> dict[str, str]:
    """Target mountpoint -> the UUID it must be mounted from."""
    return {fs.mountpoint: (fs.uuid or "").lower() for fs in plan.filesystems}


def expected_addresses(layout: Mapping[str, Any], spec: Spec) -> dict[str, list[str]]:
    """Interface -> its static IPv4 addresses, as the server had them (network: keep)."""
    if spec.fix.network != "keep":
        return {}
    wanted: dict[str, list[str]] = {}
    for iface in layout["system"]["network"].get("interfaces", []):
        addresses = [a for a in iface.get("addresses", []) if ":" not in a]
        if addresses and iface.get("onboot", True):
            wanted.setdefault(iface["name"], []).extend(addresses)
    return wanted


def old_macs(layout: Mapping[str, Any]) -> list[str]:
    network = layout["system"]["network"]
    macs = {b["mac"].lower() for b in network.get("mac_bindings", []) if b.get("mac")}
    return sorted(macs)


def plan_checks(layout: Mapping[str, Any], plan: DiskPlan, spec: Spec) -> list[Check]:
    checks = [
        Check("system-state",
              "if [ -d /run/systemd/system ]; then timeout 300 systemctl is-system-running --wait; "
              "systemctl --failed --no-legend --plain; else runlevel; fi",
              _judge_system_state),
        Check("root-virtio", "findmnt -n -o SOURCE /; readlink -f /sys/class/block/$(basename $(findmnt -n -o "
                             "SOURCE /) | sed 's/p\\?[0-9]*$//')/device/driver",
              _judge_root_virtio),
        Check("mounts", "findmnt -rn -t ext2,ext3,ext4,xfs,btrfs,vfat -o TARGET,UUID,FSTYPE",
              _mounts_judge(expected_mounts(plan))),
        Check("swap", SWAP_COMMAND, _swap_judge(plan)),
        Check("hostname", "hostname", _hostname_judge(layout["system"].get("hostname"))),
        Check("network", "ip -o -4 addr show", _network_judge(expected_addresses(layout, spec), spec)),
    ]
    esp = next((fs for fs in plan.filesystems if fs.esp), None)
    if plan.firmware == "uefi" and esp is not None:
        checks.append(Check("uefi", f"test -d /sys/firmware/efi && echo booted-by-uefi; "
                                    f"ls {shlex.quote(esp.mountpoint)}/EFI/*/", _judge_uefi))
    if spec.fix.cloud_init.install and "packages" not in spec.fix.skip:
        checks.append(Check("cloud-init", "cloud-init --version", _judge_cloud_init))
    macs = old_macs(layout)
    if macs:
        pattern = "|".join(re.escape(m) for m in macs)
        checks.append(Check("mac-bindings", f"grep -rilE {shlex.quote(pattern)} /etc 2>/dev/null; true",
                            _judge_no_mac_files))
    return checks


def _judge_system_state(output: str, code: int) -> str | None:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "no answer from systemctl or runlevel"
    state = lines[0]
    if state == "running" or re.fullmatch(r"N [2-5]|[0-9N] [2-5]", state):
        return None
    failed = "; ".join(lines[1:6])
    return f"system state is {state!r}" + (f" (failed units: {failed})" if failed else "")


def _judge_root_virtio(output: str, code: int) -> str | None:
    lines = output.splitlines()
    if len(lines) < 2 or not lines[1].endswith("/virtio_blk"):
        return f"/ is not on a virtio_blk disk: {' | '.join(lines)}"
    return None


def _mounts_judge(wanted: Mapping[str, str]) -> Callable[[str, int], str | None]:
    def judge(output: str, code: int) -> str | None:
        found: dict[str, str] = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                found[parts[0].replace("\\x20", " ")] = parts[1].lower()
        problems = []
        for mountpoint, uuid in sorted(wanted.items()):
            if mountpoint not in found:
                problems.append(f"{mountpoint} is not mounted")
            elif found[mountpoint] != uuid:
                problems.append(f"{mountpoint} is mounted from UUID {found[mountpoint] or '?'}, not {uuid}")
        return "; ".join(problems) or None
    return judge


# Every active swap area: /proc/swaps' name, type and size (KiB), and the area's UUID.
SWAP_COMMAND = ("tail -n +2 /proc/swaps | while read -r name type size rest; do "
                "echo \"$name $type $size $(blkid -s UUID -o value \"$name\" 2>/dev/null)\"; done")
SWAP_PAGE = 4096  # x86_64


def active_swap_kib(area_size: int) -> int:
    """What /proc/swaps shows for a swap area of `area_size` bytes: its pages less mkswap's header page."""
    return max(0, area_size // SWAP_PAGE - 1) * SWAP_PAGE // 1024


def _swap_judge(plan: DiskPlan) -> Callable[[str, int], str | None]:
    """Each planned swap area active with exactly its planned size; together as much as the source had."""
    wanted: list[tuple[str, Callable[[list[str]], bool], int]] = []  # (what, matches a line, KiB)
    part = plan.swap_partition
    if part is not None and part.swap is not None:
        uuid = (part.swap.uuid or "").lower()
        wanted.append((f"the swap partition (UUID {uuid})", lambda item: len(item) > 3 and item[3].lower() == uuid,
                       active_swap_kib(part.size)))
    if plan.swap_file is not None:
        path = plan.swap_file.path
        wanted.append((f"the swap file {path}", lambda item: item[0] == path, active_swap_kib(plan.swap_file.size)))

    def judge(output: str, code: int) -> str | None:
        active = [line.split() for line in output.splitlines() if len(line.split()) >= 3]
        problems = []
        total = 0
        for what, matches, kib in wanted:
            found = [item for item in active if matches(item)]
            if not found:
                problems.append(f"{what} is not active")
            elif int(found[0][2]) != kib:
                problems.append(f"{what} is active with {found[0][2]} KiB, not the planned {kib} KiB")
            else:
                total += (kib * 1024) + SWAP_PAGE
        if not problems and plan.source_swap and plan.policy.swap != "none" and total < plan.source_swap:
            problems.append(f"{total >> 20} MiB of swap active, less than the source's {plan.source_swap >> 20} MiB")
        if problems:
            return "; ".join(problems) + f" (active: {output.strip() or 'no swap at all'})"
        return None
    return judge


def _hostname_judge(hostname: str | None) -> Callable[[str, int], str | None]:
    def judge(output: str, code: int) -> str | None:
        got = output.strip()
        if hostname and got.split(".")[0] != hostname.split(".")[0]:
            return f"hostname is {got!r}, not {hostname!r}"
        return None
    return judge


def _network_judge(wanted: Mapping[str, Sequence[str]], spec: Spec) -> Callable[[str, int], str | None]:
    def judge(output: str, code: int) -> str | None:
        found: dict[str, set[str]] = {}
        for line in output.splitlines():
            match = re.match(r"\d+:\s+(\S+)\s+inet\s+(\S+)", line)
            if match:
                found.setdefault(match.group(1), set()).add(match.group(2))
        if spec.fix.network == "dhcp":
            return None if "eth0" in found else f"eth0 has no IPv4 address (interfaces: {sorted(found)})"
        problems = [f"{address} is not on {name} (found: {sorted(found.get(name, ())) or 'nothing'})"
                    for name, addresses in sorted(wanted.items()) for address in addresses
                    if address not in found.get(name, set())]
        return "; ".join(problems) or None
    return judge


def _judge_uefi(output: str, code: int) -> str | None:
    if "booted-by-uefi" not in output.split():
        return "the guest did not boot by UEFI (no /sys/firmware/efi)"
    if "bootx64.efi" not in output.lower().split():
        return f"the ESP has no fallback loader EFI/BOOT/BOOTX64.EFI: {' '.join(output.split())}"
    return None


def _judge_cloud_init(output: str, code: int) -> str | None:
    return None if code == 0 and "cloud-init" in output else f"cloud-init is not installed: {output.strip()}"


def _judge_no_mac_files(output: str, code: int) -> str | None:
    files = [line.strip() for line in output.splitlines() if line.strip()]
    return f"old MACs are still named in: {', '.join(files)}" if files else None


# ---------------------------------------------------------------- access for the check


def shadow_with_root_password(shadow: str, password_hash: str) -> str:
    lines = shadow.splitlines(keepends=True)
    for index, line in enumerate(lines):
        fields = line.rstrip("\n").split(":")
        if fields[0] == "root" and len(fields) > 1:
            fields[1] = password_hash
            lines[index] = ":".join(fields) + "\n"
            return "".join(lines)
    raise P2VError("the image's /etc/shadow has no root entry, so verify cannot log in")


def _hash_password(password: str) -> str:
    return run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n").stdout.strip()


@contextlib.contextmanager
def verification_overlay(spec: Spec, plan: DiskPlan, password: str) -> Iterator[Path]:
    """disk.img under a qcow2 overlay that lets root log in with `password`; removed afterwards."""
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay = run_dir / "verify-overlay.qcow2"
    export = run_dir / "verify.export"
    _stop_stale_daemons(run_dir)
    overlay.unlink(missing_ok=True)
    create_overlay(spec.artifact("disk.img"), overlay)
    try:
        root_fs = plan.filesystem("/")
        root_part = plan.partition_of("/")
        with fuse_export(overlay, export) as exported, \
                loop_device(exported, read_only=False, partitions=True) as loop:
            mount_point = run_dir / "verify-root"
            mount_point.mkdir(exist_ok=True)
            with mounted(loop.partition(root_part.number), mount_point, fstype=root_fs.fstype,
                         options=target_mount_options(root_fs.fstype, True)):
                _unlock_for_login(mount_point)
                shadow = read_text_in_root(mount_point, "/etc/shadow")
                if shadow is None:
                    raise P2VError("the image has no /etc/shadow, so verify cannot log in")
                write_text_in_root(mount_point, "/etc/shadow",
                                   shadow_with_root_password(shadow, _hash_password(password)))
                securetty = read_text_in_root(mount_point, "/etc/securetty")
                if securetty is not None and "ttyS0" not in securetty.split():
                    write_text_in_root(mount_point, "/etc/securetty", securetty.rstrip("\n") + "\nttyS0\n")
            mount_point.rmdir()
        yield overlay
    finally:
        overlay.unlink(missing_ok=True)


def _unlock_for_login(root: Path) -> None:
    """An immutable /etc/shadow (a hardening some servers have, kept by the fix stage) in the throw-away
    overlay only: the one-time password must go in; disk.img keeps its flags."""
    for path in ("/etc", "/etc/shadow", "/etc/securetty"):
        with inodeflags.open_entry(root, path) as fd:
            if fd is not None and (inodeflags.get_raw(fd) or 0) & inodeflags.DEFERRED:
                inodeflags.apply_flags(fd, 0, inodeflags.DEFERRED)


def _stop_stale_daemons(run_dir: Path) -> None:
    """A killed verify leaves its qemu-storage-daemon; nothing else exports into our run dir."""
    subprocess.run(["pkill", "-f", f"qemu-storage-daemon.*{run_dir}/"], check=False)


# ---------------------------------------------------------------- the stage


def run_checks(image: Path, checks: Sequence[Check], password: str, serial_log: Path,
               machine: BootMachine, accel: Accel) -> tuple[BootResult, list[CheckResult]]:
    # UEFI gets OVMF's empty variable store: the cloud has no boot entry for the
    # image either, so only the fallback path \EFI\BOOT\BOOTX64.EFI can boot it.
    result = boot_check([image], [c.command for c in checks], disk_bus="virtio", nic_model="virtio",
                        mac=VERIFY_MAC, login=("root", password), timeout=BOOT_TIMEOUT, command_timeout=360,
                        serial_log=serial_log, machine=machine.machine, firmware=machine.firmware, accel=accel)
    results = []
    for check, out in zip(checks, result.outputs, strict=True):
        results.append(CheckResult(check.name, check.command, out.output, out.exit_code,
                                   check.judge(out.output, out.exit_code)))
    return result, results


def verify_host(run: StageRun) -> None:
    spec = run.spec
    started = time.monotonic()
    if not spec.verify:
        log.warning("verify is off in %s: the image was not booted before upload", spec.file)
        write_verify_stamp(run.partial, {"format": STAMP_FORMAT, "version": STAMP_VERSION, "host": spec.host,
                                         "skipped": True, "checks": []})
        return
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    checks = plan_checks(layout, plan, spec)
    machine = boot_machine(plan.firmware, spec.glance.properties)
    log.info("booting on %s with %s, as Nova would (image property hw_machine_type: %s)", machine.machine,
             "OVMF (UEFI, empty variable store)" if machine.firmware == "uefi" else "SeaBIOS",
             machine.hw_machine_type or "unset")
    # KVM on a real server's live system (seconds), TCG in a guest or where KVM hangs guests.
    accel = choose_accel()
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    password = secrets.token_urlsafe(18)
    serial_log = spec.log_dir / "verify-serial.log"
    with verification_overlay(spec, plan, password) as overlay:
        try:
            boot, results = run_checks(overlay, checks, password, serial_log, machine, accel)
        except BootCheckError as error:
            raise P2VError(f"the converted image did not boot to a login on virtio "
                           f"({machine.machine}, {machine.firmware}): {error}",
                           hint=f"the whole console is in {serial_log}") from None
    failed = [r for r in results if r.problem]
    for result in results:
        log.info("check %-12s %s%s", result.name, "ok" if not result.problem else "FAILED: ",
                 result.problem or "")
        log.debug("check %s: %s -> exit %d\n%s", result.name, result.command, result.exit_code, result.output)
    if failed:
        details = "; ".join(f"{r.name}: {r.problem}" for r in failed)
        raise P2VError(f"{len(failed)} of {len(results)} checks failed: {details}\n"
                       f"--- serial log tail ({serial_log}) ---\n{serial_tail(serial_log)}",
                       hint="see the fix receipt (fixed.stamp) for what was changed")
    stamp: VerifyStamp = {
        "format": STAMP_FORMAT, "version": STAMP_VERSION, "host": spec.host,
        "skipped": False,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_to_login": round(boot.seconds_to_login, 1),
        "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": VERIFY_MAC, "accel": accel.name,
                    "accel_reason": accel.reason, **machine.to_json()},
        "serial_log": str(serial_log),
        "checks": [r.to_json() for r in results],
    }
    write_verify_stamp(run.partial, stamp)
    log.info("verified: %d checks passed, login after %.0f s", len(results), boot.seconds_to_login)


def _config(spec: Spec) -> dict[str, object]:
    # The machine properties decide what verify boots on: a change must boot again.
    machine = [[k, v] for k, v in spec.glance.properties if k in (MACHINE_PROPERTY, FIRMWARE_PROPERTY)]
    return {"stamp_version": STAMP_VERSION, "verify": spec.verify, "machine_properties": machine}


STAGE = Stage(
    name="verify",
    doc="boot the fixed image on virtio in qemu and check it from inside -> verified.stamp",
    target="verified.stamp",
    inputs=(FIX_STAMP, LAYOUT_FILE, PLAN_FILE),
    run=verify_host,
    config=_config,
)
