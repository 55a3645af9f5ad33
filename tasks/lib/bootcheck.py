"""Boot disk images in qemu and run commands on the serial console.

Used by the tests (do the source fixtures really boot?) and by the `verify`
stage (does the converted image boot on virtio?). The images are never
written: qemu runs with `-snapshot`, so every write goes to a throw-away
overlay.

Acceleration is always TCG. `/dev/kvm` on these machines is a paravirtual KVM
that hangs ordinary guests, and a hang is not a failure qemu would fall back
from, so we never let qemu pick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import pexpect

from tasks.lib import journal
from tasks.lib.accel import TCG, Accel
from tasks.lib.runner import P2VError, which

log = logging.getLogger("p2v.bootcheck")

DiskBus = Literal["ide", "sata", "virtio"]
NicModel = Literal["e1000", "virtio"]
Machine = Literal["pc", "q35"]
Firmware = Literal["bios", "uefi"]

# Debian's ovmf package: the firmware without secure boot (it boots on pc and
# q35 alike), and its empty variable store, whose copy each UEFI boot gets.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

# The serial console echoes what we type. Markers are typed split in two
# (`==P2V-E''ND`) so that only the shell's output, never the echo, matches.
_BEGIN = "==P2V-BEGIN=="
_END = re.compile(rb"==P2V-END (\d+)==")
# Every line a command prints reaches us with this in front (typed as `P2V''| `, for the same reason):
# what the guest writes on its console meanwhile (a first-boot service's apt output, a kernel
# message) comes untagged, in between, and is left out of the command's output.
_TAG = "P2V| "
# A prompt is the last thing its program wrote, but the console may already show more after it:
# a kernel message ("[   69.07] kvm: ...") or a systemd status line, read in the same chunk (a
# verify boot of plain-bullseye waited out its timeout at a login prompt followed by kvm's
# messages). So a prompt ends the text, or is followed by such a message's "[" or ESC, or by a
# carriage return that is no line end (systemd erasing its status line). A line that merely ends
# in "#" (a banner of the motd) is no prompt: the console ends lines with CR CR LF.
_AFTER_PROMPT = rb"(?:$|(?=[\[\x1b]|\r(?!\r?\n)))"
_PROMPT = re.compile(rb"[#$] ?" + _AFTER_PROMPT, re.M)
_LOGIN_PROMPT = re.compile(rb"login: ?" + _AFTER_PROMPT, re.M)
_PANIC = re.compile(rb"Kernel panic - not syncing|end Kernel panic")
# Where a boot that went wrong stops and waits for a human: fail at once, not at the timeout.
# (No end-of-line anchors: busybox follows its prompt with a terminal query, ESC [6n.)
_STUCK = re.compile(rb"\(initramfs\) |dracut:/# |Give root password for maintenance|"
                    rb"You are in emergency mode|Cannot open access to console, the root account is locked")
# CSI sequences, charset selections, and the one-character escapes (systemd's status line moves up
# with ESC M, reverse index).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[@-Z78=>]")
TAIL_LINES = 40


class BootCheckError(P2VError):
    """The guest did not reach a state in time; carries the serial log tail."""


@dataclass(frozen=True)
class CommandOutput:
    command: str
    output: str
    exit_code: int


@dataclass(frozen=True)
class BootResult:
    outputs: tuple[CommandOutput, ...]
    serial_log: Path
    seconds_to_login: float
    powered_off: bool

    def output_of(self, command: str) -> CommandOutput:
        for item in self.outputs:
            if item.command == command:
                return item
        raise KeyError(command)


@dataclass(frozen=True)
class BootConfig:
    disks: tuple[Path, ...]
    disk_bus: DiskBus = "ide"
    nic_model: NicModel = "e1000"
    mac: str | None = None
    memory_mib: int = 1024
    # One vCPU: multi-threaded TCG with two vCPUs crashed a trixie kernel
    # (an int3 Oops in the scheduler) under host load; boots are no slower.
    cpus: int = 1
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    machine: Machine | None = None  # None: what the disk bus needs (pc for IDE, q35 otherwise)
    firmware: Firmware = "bios"
    # UEFI: the firmware image (read-only) and this boot's own writable copy of a variable store.
    ovmf_code: Path = OVMF_CODE
    varstore: Path | None = None
    # TCG unless a probe showed that KVM runs guests here (tasks/lib/accel.py: verify asks).
    accel: Accel = TCG

    @property
    def machine_type(self) -> Machine:
        if self.machine is not None:
            return self.machine
        # IDE needs the i440fx 'pc' machine; SATA (AHCI) and virtio use q35.
        return "pc" if self.disk_bus == "ide" else "q35"


def image_format(path: Path) -> str:
    with open(path, "rb") as handle:
        return "qcow2" if handle.read(4) == b"QFI\xfb" else "raw"


def _qemu_head(machine: Machine, accel: Accel, cpus: int, memory_mib: int) -> list[str]:
    """What every boot check's qemu starts with: no display, monitor or reboot,
    every disk write into a throw-away snapshot, the serial console on stdio."""
    return [
        "qemu-system-x86_64",
        "-machine", machine,
        *accel.qemu_args(),
        "-smp", str(cpus),
        "-m", str(memory_mib),
        # The guest's RAM is allocated before the guest runs. A guest's first touch of a page is a
        # page fault on the host, and beside a batch writing images the host's reclaim made it take
        # minutes: modprobe stuck in clear_page (soft lockups), then systemd's mount timeouts.
        "-mem-prealloc",
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-snapshot",
        "-chardev", "stdio,id=serial0,signal=off",
        "-serial", "chardev:serial0",
    ]


def _nic_args(model: NicModel, *, restrict: bool, mac: str | None = None) -> list[str]:
    """One NIC on qemu's user network; restrict=True: the guest reaches no network at all."""
    device = "e1000" if model == "e1000" else "virtio-net-pci"
    mac_option = f",mac={mac}" if mac else ""
    return ["-netdev", f"user,id=net0,restrict={'on' if restrict else 'off'}",
            "-device", f"{device},netdev=net0{mac_option}"]


def qemu_argv(config: BootConfig) -> list[str]:
    """The qemu command line for a boot check (pure; unit-tested)."""
    if config.machine_type == "q35" and config.disk_bus == "ide":
        raise P2VError("an IDE disk needs the pc machine; q35 has SATA (AHCI) instead")
    argv = _qemu_head(config.machine_type, config.accel, config.cpus, config.memory_mib)
    if config.firmware == "uefi":
        if config.varstore is None:
            raise P2VError("a UEFI boot needs a variable store")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={config.ovmf_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={config.varstore}"]
    if config.disk_bus == "sata":
        argv += ["-device", "ahci,id=ahci"]
    for index, disk in enumerate(config.disks):
        fmt = image_format(disk)
        if config.disk_bus == "ide":
            argv += ["-drive", f"file={disk},format={fmt},if=ide,index={index},media=disk"]
        elif config.disk_bus == "sata":
            argv += [
                "-drive", f"file={disk},format={fmt},if=none,id=disk{index}",
                "-device", f"ide-hd,drive=disk{index},bus=ahci.{index}" + (",bootindex=0" if index == 0 else ""),
            ]
        else:
            argv += [
                "-drive", f"file={disk},format={fmt},if=none,id=disk{index}",
                "-device", f"virtio-blk-pci,drive=disk{index}" + (",bootindex=0" if index == 0 else ""),
            ]
    argv += _nic_args(config.nic_model, restrict=True, mac=config.mac)
    argv += list(config.extra_args)
    return argv


def clean_serial_text(raw: bytes) -> str:
    """The console's text as a screen shows it: escape sequences left out, and a carriage return
    starting the line over."""
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace"))
    if "\r" not in text:
        return text
    return "\n".join(_line_as_shown(line) for line in text.split("\n"))


def _line_as_shown(line: str) -> str:
    """A line with carriage returns, as a screen shows it: each part overwrites the line from its
    first column. systemd erases its status line with a return, blanks and a return; the blanks
    that nothing overwrote are left out, so that a line written after such an erase starts
    where it shows (a command's tagged output line did not, in the empty-cache run of 9e4a9f5)."""
    shown = ""
    for part in line.split("\r"):
        if not part:
            continue
        rest = shown[len(part):]
        shown = part + (rest if rest.strip() else "")
    return shown


def tagged_output(raw: bytes) -> str:
    """A tagged command's output from what the console showed between its markers: its own lines,
    untagged; the console's lines in between are dropped. The last tag is the end marker's own
    line, with what the command printed without a final newline."""
    lines = clean_serial_text(raw).split("\n")
    kept = [line[len(_TAG):] for line in lines if line.startswith(_TAG)]
    dropped = sum(1 for line in lines if line and not line.startswith(_TAG))
    if dropped:
        log.debug("left %d console line(s) out of a command's output", dropped)
    if kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept).strip("\n")


def serial_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = clean_serial_text(path.read_bytes())
    except FileNotFoundError:
        return "(no serial output)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no serial output)"


# What a boot that stopped says about why, wherever it is in the log: systemd's failed and
# dependency-failed units and timeouts, and the kernel's I/O, ATA and filesystem errors.
_FAILURE_LINE = re.compile(r"\[FAILED\]|\[DEPEND\]|\[ TIME \]|Dependency failed|Timed out|Failed to (?:mount|start)|"
                           r"I/O error|exception Emask|failed command|EXT4-fs error|XFS \(.*\): .*(?:error|corrupt)|"
                           r"Buffer I/O|blk_update_request|can't read superblock|wrong fs type")
FAILURE_LINES = 12


def serial_failures(path: Path, lines: int = FAILURE_LINES) -> list[str]:
    """The first lines of the serial log that say what failed (empty when none does)."""
    try:
        text = clean_serial_text(path.read_bytes())
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if _FAILURE_LINE.search(line)][:lines]


class _Guest:
    """A running qemu whose serial console we drive."""

    def __init__(self, child: pexpect.spawn, serial_log: Path):
        self.child = child
        self.serial_log = serial_log

    def expect(self, pattern: str | re.Pattern[bytes] | list[object], timeout: float, waiting_for: str) -> int:
        try:
            return int(self.child.expect(pattern, timeout=timeout))
        except pexpect.TIMEOUT:
            raise BootCheckError(
                f"timed out after {timeout:.0f} s waiting for {waiting_for}\n"
                f"--- serial log tail ({self.serial_log}) ---\n{serial_tail(self.serial_log)}"
            ) from None
        except pexpect.EOF:
            raise BootCheckError(
                f"qemu exited while waiting for {waiting_for}\n"
                f"--- serial log tail ({self.serial_log}) ---\n{serial_tail(self.serial_log)}"
            ) from None

    def wait_booted(self, ready: re.Pattern[bytes], what: str, timeout: float) -> None:
        """Wait for `ready` on the console; a kernel panic or a rescue shell first fails at once."""
        index = self.expect([ready, _PANIC, _STUCK], timeout, what)
        if index == 1:
            self.expect([pexpect.TIMEOUT, pexpect.EOF], 5, "the rest of the panic message")
            raise BootCheckError(f"the guest kernel panicked while booting\n"
                                 f"--- serial log tail ({self.serial_log}) ---\n{serial_tail(self.serial_log)}")
        if index == 2:
            self.expect([pexpect.TIMEOUT, pexpect.EOF], 3, "the rest of the message")
            failures = serial_failures(self.serial_log)
            raise BootCheckError(
                "the guest stopped in a rescue shell instead of booting"
                + (f": {failures[0]}" if failures else "") + "\n"
                + ("--- what failed, from the whole serial log ---\n" + "\n".join(failures) + "\n" if failures else "")
                + f"--- serial log tail ({self.serial_log}) ---\n{serial_tail(self.serial_log)}")

    def login(self, user: str, password: str, timeout: float) -> None:
        self.wait_booted(_LOGIN_PROMPT, "the login: prompt", timeout)
        self.child.sendline(user)
        index = self.expect([re.compile(rb"[Pp]assword: ?"), _PROMPT], 60, "the password prompt")
        if index == 0:
            self.child.sendline(password)
            index = self.expect([_PROMPT, re.compile(rb"Login incorrect")], 120, "a shell prompt after login")
            if index == 1:
                raise BootCheckError(f"login as {user} was refused on the serial console\n"
                                     f"--- serial log tail ({self.serial_log}) ---\n{serial_tail(self.serial_log)}")
        self._settle_shell()

    def autologin(self, timeout: float) -> None:
        """Wait for the shell of a console that logs root in by itself (the live system's)."""
        self.wait_booted(re.compile(rb"login: root \(automatic login\)"), "the automatic login on the console",
                         timeout)
        self.expect([_PROMPT], 120, "a shell prompt after the automatic login")
        self._settle_shell()

    def _settle_shell(self) -> None:
        # login flushes the tty as the shell starts, so a line typed too early
        # can vanish: repeat the first command until the shell answers.
        setup = "stty -echo cols 1000; dmesg -n 1 2>/dev/null; export TERM=dumb PAGER=cat SYSTEMD_PAGER="
        for attempt in range(5):
            try:
                self.run(setup, 20 if attempt < 4 else 120, in_shell=True)
                return
            except BootCheckError:
                if attempt == 4:
                    raise

    def run(self, command: str, timeout: float, *, in_shell: bool = False) -> CommandOutput:
        """Run `command` and return what it printed (stdout and stderr) and its exit code.

        It runs in a group whose output lines are tagged (`_TAG`), so that console messages are
        left out; `in_shell`: in the login shell itself, untagged, for settings that must last.
        """
        begin = _BEGIN.replace("BEGIN", "BEG''IN")
        if in_shell:
            self.child.sendline(f"echo {begin}; {command}; echo ==P2V-E''ND $?==")
        else:
            body = command.rstrip().rstrip(";")
            self.child.sendline(f"echo {begin}; {{ {body}; echo ==P2V-E''ND $?==; }} 2>&1 | sed 's/^/P2V''| /'")
        self.expect([re.compile(re.escape(_BEGIN.encode()) + rb"[\r\n]+")], timeout, f"the start of: {command}")
        self.expect([_END], timeout, f"the end of: {command}")
        before = self.child.before if isinstance(self.child.before, bytes) else b""
        exit_code = int(self.child.match.group(1))
        text = clean_serial_text(before).strip("\n") if in_shell else tagged_output(before)
        return CommandOutput(command=command, output=text, exit_code=exit_code)

    def poweroff(self, timeout: float) -> bool:
        self.child.sendline("poweroff || systemctl poweroff --force")
        try:
            self.child.expect(pexpect.EOF, timeout=timeout)
            return True
        except pexpect.TIMEOUT:
            return False


def guest_priority() -> list[str]:
    """What to put before a qemu command line so that its vCPU runs ahead of work beside it.

    A boot check is timed, and so is the guest's own boot (systemd's 90 s device and mount
    timeouts, the kernel's soft-lockup watchdog): a TCG vCPU starved by the copies and chroots
    of other hosts' stages (a batch, `doit -n 2`) failed the check for nothing, in a rescue
    shell after soft lockups. Only root may raise a priority; others get none.
    """
    return ["nice", "-n", "-5"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def _spawn(argv: list[str], serial_log: Path) -> Iterator[_Guest]:
    qemu = argv[0]
    which(qemu)
    argv = [*guest_priority(), *argv]  # nice execs qemu: the pid is qemu's
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    logfile: IO[bytes] = open(serial_log, "wb")  # closed in finally
    log.debug("+ %s", " ".join(argv))
    try:
        # Journaled (tasks/lib/journal.py): qemu runs in a session of its own (its pty), so a
        # SIGKILL of the stage's process group leaves it running; the next run stops it.
        with journal.resource("process", lambda: _start(argv), _stop,
                              lambda child: journal.process_record(child.pid, qemu)) as child:
            child.logfile_read = logfile
            yield _Guest(child, serial_log)
    finally:
        logfile.close()


def _start(argv: list[str]) -> pexpect.spawn:
    return pexpect.spawn(argv[0], argv[1:], timeout=30, maxread=65536, searchwindowsize=None)


def _stop(child: pexpect.spawn) -> None:
    if child.isalive():
        child.terminate(force=True)
    child.close(force=True)


def boot_check(
    disks: Sequence[Path],
    commands: Sequence[str],
    *,
    disk_bus: DiskBus = "ide",
    nic_model: NicModel = "e1000",
    mac: str | None = None,
    login: tuple[str, str] = ("root", "p2v"),
    timeout: float = 600,
    command_timeout: float = 120,
    serial_log: Path | None = None,
    memory_mib: int = 1024,
    machine: Machine | None = None,
    firmware: Firmware = "bios",
    varstore: Path | None = None,
    accel: Accel = TCG,
) -> BootResult:
    """Boot, log in on ttyS0, run each command, power off; never write the disks.

    `machine` None boots on what the disk bus needs. UEFI boots OVMF with a
    copy of `varstore` (default: OVMF's empty one, so that only the fallback
    path \\EFI\\BOOT\\BOOTX64.EFI can boot); the template is never written.
    Raises BootCheckError, with the serial log tail, when the guest does not
    reach `login:` within `timeout` seconds or a command does not finish.
    Commands that exit non-zero are returned, not raised: the caller decides.
    """
    if not disks:
        raise P2VError("boot_check needs at least one disk image")
    for disk in disks:
        if not Path(disk).is_file():
            raise P2VError(f"boot_check: disk image {disk} does not exist")
    log_path = serial_log or Path(disks[0]).with_suffix(".serial.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        vars_copy = None
        if firmware == "uefi":
            vars_copy = stack.enter_context(_varstore_copy(varstore or OVMF_VARS, log_path.parent))
        config = BootConfig(disks=tuple(Path(d) for d in disks), disk_bus=disk_bus, nic_model=nic_model, mac=mac,
                            memory_mib=memory_mib, machine=machine, firmware=firmware, varstore=vars_copy,
                            accel=accel)
        return _boot(config, commands, login, timeout, command_timeout, log_path)


@contextlib.contextmanager
def _varstore_copy(template: Path, directory: Path) -> Iterator[Path]:
    """A writable copy of a UEFI variable store for one boot, removed afterwards."""
    for needed in (OVMF_CODE, template):
        if not needed.is_file():
            raise P2VError(f"UEFI firmware file {needed} is missing", hint="apt-get install ovmf (bin/install)")
    handle, name = tempfile.mkstemp(prefix="ovmf-vars-", suffix=".fd", dir=directory)
    os.close(handle)
    copy = Path(name)
    try:
        shutil.copyfile(template, copy)
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _boot(config: BootConfig, commands: Sequence[str], login: tuple[str, str], timeout: float,
          command_timeout: float, log_path: Path) -> BootResult:
    started = time.monotonic()
    with _spawn(qemu_argv(config), log_path) as guest:
        guest.login(*login, timeout=timeout)
        seconds_to_login = time.monotonic() - started
        log.info("guest reached a shell after %.0f s", seconds_to_login)
        outputs = tuple(guest.run(command, command_timeout) for command in commands)
        powered_off = guest.poweroff(120)
    return BootResult(outputs=outputs, serial_log=log_path, seconds_to_login=seconds_to_login, powered_off=powered_off)


@dataclass(frozen=True)
class KernelBootConfig:
    """A guest started from a kernel and an initrd (the live system), as a PXE boot would start it."""

    kernel: Path
    initrd: Path
    append: str
    memory_mib: int = 2048
    nic_model: NicModel = "e1000"
    # The live system fetches its root from the host (10.0.2.2 in the guest),
    # which a restricted user network would refuse.
    restrict_network: bool = False
    disks: tuple[Path, ...] = ()  # scratch disks on virtio, written only to qemu's snapshot
    cpus: int = 1


def kernel_qemu_argv(config: KernelBootConfig) -> list[str]:
    """The qemu command line of a kernel boot (pure; unit-tested)."""
    argv = _qemu_head("q35", TCG, config.cpus, config.memory_mib)
    argv += ["-kernel", str(config.kernel), "-initrd", str(config.initrd), "-append", config.append]
    for index, disk in enumerate(config.disks):
        argv += ["-drive", f"file={disk},format={image_format(disk)},if=none,id=disk{index}",
                 "-device", f"virtio-blk-pci,drive=disk{index}"]
    argv += _nic_args(config.nic_model, restrict=config.restrict_network)
    return argv


def boot_kernel_check(
    config: KernelBootConfig,
    commands: Sequence[str],
    *,
    serial_log: Path,
    timeout: float = 900,
    command_timeout: float = 120,
) -> BootResult:
    """Boot a kernel and initrd, take the console's automatic root shell, run each command, power off."""
    for path in (config.kernel, config.initrd, *config.disks):
        if not Path(path).is_file():
            raise P2VError(f"boot_kernel_check: {path} does not exist")
    started = time.monotonic()
    with _spawn(kernel_qemu_argv(config), serial_log) as guest:
        guest.autologin(timeout=timeout)
        seconds_to_login = time.monotonic() - started
        log.info("guest reached a shell after %.0f s", seconds_to_login)
        outputs = tuple(guest.run(command, command_timeout) for command in commands)
        powered_off = guest.poweroff(120)
    return BootResult(outputs=outputs, serial_log=serial_log, seconds_to_login=seconds_to_login,
                      powered_off=powered_off)
