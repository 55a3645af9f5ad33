"""Which accelerator a boot check can use here: KVM where it really runs guests, TCG otherwise.

A real server's live system has VT-x and boots the image under KVM in
seconds; a qemu guest (the tests' live system), a container, or a host
whose /dev/kvm exists but hangs guests (a paravirtual KVM, as on the
machines this project is developed on) must use TCG. /dev/kvm's presence
proves nothing, and a hang is no error message, so the probe boots a kernel
under KVM with no root filesystem: it must reach its panic, and qemu exit
(panic=-1, -no-reboot), within a few seconds. The answer is kept for the
host's uptime in /run, so only the first boot check of a boot pays for it.
`P2V_ACCEL=kvm|tcg` decides instead (and says so in the receipt).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.lib.paths import write_file_atomically
from tasks.lib.runner import CommandError, run

PROBE_TIMEOUT = 20.0
CACHE = Path("/run/p2v/accel.json")
PANIC_MARKS = ("Kernel panic", "VFS: Unable to mount root", "end Kernel panic")


@dataclass(frozen=True)
class Accel:
    name: str  # kvm | tcg
    reason: str

    def qemu_args(self) -> list[str]:
        # TCG with one thread per vCPU; KVM with the host's CPU model.
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


# What every boot check gets unless it asks for the probe (fixture boots, tests).
TCG = Accel("tcg", "TCG unless probed")


def probe_kernel() -> Path | None:
    """A kernel to probe with: the running one's, else the newest in /boot."""
    running = Path(f"/boot/vmlinuz-{os.uname().release}")
    if running.is_file():
        return running
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    return found[-1] if found else None


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> Accel:
    """Boot `kernel` under KVM with no root: a panic within `timeout` means KVM runs guests."""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "256",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 quiet"]
    started = time.monotonic()
    try:
        result = run(argv, check=False, timeout=timeout)
    except CommandError as error:
        if error.returncode != -signal.SIGKILL:
            raise
        return Accel("tcg", f"a KVM guest did not get to its kernel's panic within {timeout:.0f} s (it hangs here)")
    seconds = time.monotonic() - started
    if any(mark in result.stdout for mark in PANIC_MARKS):
        return Accel("kvm", f"a KVM guest booted its kernel in {seconds:.1f} s")
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
    return Accel("tcg", f"KVM does not run guests here: {tail[0][:200]}")


def choose_accel(kernel: Path | None = None, cache: Path | None = CACHE) -> Accel:
    forced = os.environ.get("P2V_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accel(forced, f"P2V_ACCEL={forced}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm")
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        return Accel(str(data["name"]), str(data["reason"]) + " (probed earlier in this boot)")
    kernel = kernel or probe_kernel()
    if kernel is None:
        return Accel("tcg", "no kernel in /boot to probe KVM with")
    chosen = probe_kvm(kernel)
    if cache is not None:
        write_file_atomically(cache, json.dumps(asdict(chosen)) + "\n")
    return chosen
