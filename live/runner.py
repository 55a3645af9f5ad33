"""The live system's runner: convert the server it booted on onto its NFS work area.

Started by p2v-runner.service when the kernel command line carries p2v.host
(written by `doit pxe`). In order:

1. every local disk is set read-only (`blockdev --setro`), before anything else;
2. the host's directory of the work area is mounted over NFS at the same path
   as on the infra side (a bounded retry, then one message);
3. the host's spec is read from <work>/spec/<host>.yaml and checked against
   this machine (one of its NICs has the spec's MAC), its source.disks are
   resolved to this boot's device nodes;
4. doit runs the host's stages up to live.last_stage, with the dependency
   state in the work area: a second PXE boot resumes where the first stopped;
5. success: the status file says so and the server powers off once doit has
   exited and the work area is synced and unmounted (never earlier: that is
   when the stages' state is durable on the NFS server; `live.shutdown: false`
   keeps it up); failure: one message on the
   console (tty and serial) and beside the logs in the work area, and the
   server stays up for a look.

Nothing is written anywhere but the work area. Messages are one line each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from tasks.lib.livecloud import live_cloud_env  # noqa: E402
from tasks.lib.livehost import LiveArgs, console_devices, local_disks, parse_cmdline, resolve_disks  # noqa: E402
from tasks.lib.runner import CommandError, P2VError, run  # noqa: E402
from tasks.lib.spec import LIVE_DISKS_ENV, load_specs  # noqa: E402
from tasks.lib.system import guess_boot_sector  # noqa: E402

ACTIVE_CONSOLES = Path("/sys/class/tty/console/active")
MOUNT_DELAY = 10.0
MOUNT_TIMEOUT = 60.0
STATUS_FILE = "live-status.json"


class Console:
    """Lines for the operator on every console, and kept for the status file."""

    def __init__(self, consoles: Sequence[str] | None = None):
        if consoles is None:
            consoles = console_devices(ACTIVE_CONSOLES.read_text() if ACTIVE_CONSOLES.is_file() else "")
        self.consoles = [c for c in consoles if os.path.exists(c)]
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        line = f"p2v: {text}"
        self.lines.append(line)
        for console in self.consoles:
            try:
                with open(console, "w") as handle:
                    handle.write(line + "\r\n")
            except OSError:
                continue


def protect_local_disks(console: Console) -> list[str]:
    """Every local disk and partition read-only, before anything could write to one."""
    listing = json.loads(run(["lsblk", "--json", "--bytes", "-o", "NAME,PATH,TYPE,RM,SIZE,SERIAL,WWN"]).stdout)
    disks = local_disks(listing, booting=())
    protected = []
    for disk in disks:
        run(["blockdev", "--setro", disk.path])
        for part in sorted(Path("/sys/class/block", disk.name).glob(f"{disk.name}*")):
            if (part / "partition").exists():
                run(["blockdev", "--setro", f"/dev/{part.name}"])
        protected.append(disk.path)
    console.say(f"set read-only: {', '.join(protected) or 'no local disk found'}")
    return protected


def mount_work_area(args: LiveArgs, console: Console, delay: float = MOUNT_DELAY) -> Path:
    tries = args.work_tries
    point = Path(args.work_path)
    point.mkdir(parents=True, exist_ok=True)
    source = f"{args.work_server}:{args.work_path}"
    tail = ""
    for attempt in range(1, tries + 1):
        # retry=0: one attempt per try (mount.nfs would retry for 2 minutes by itself), and a
        # mount that gets no answer at all is killed after MOUNT_TIMEOUT: both count as a try.
        # Its own process group: mount(8) forks the mount.nfs helper that does the waiting, and
        # a helper left behind could still mount the work area under a later try.
        try:
            result = run(["mount", "-t", "nfs4", "-o", "proto=tcp,hard,timeo=600,retry=0", source, str(point)],
                         check=False, timeout=MOUNT_TIMEOUT, own_group=True)
        except CommandError:
            tail = f"no answer within {MOUNT_TIMEOUT:.0f} s"
        else:
            if result.returncode == 0:
                console.say(f"work area {source} mounted at {point}")
                return point
            tail = ((result.stdout + result.stderr).strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        console.say(f"work area {source} not reachable (try {attempt}/{tries}): {tail}")
        if attempt < tries:
            time.sleep(delay)
    raise P2VError(f"cannot mount the work area {source} after {tries} tries: {tail}",
                   hint="check the NFS server and its export for this host's address (doit pxe), then reboot")


def booting_disks(names: Sequence[str]) -> list[str]:
    found = []
    for name in names:
        try:
            with open(f"/dev/{name}", "rb") as handle:
                if guess_boot_sector(handle.read(2048)):
                    found.append(name)
        except OSError:
            continue
    return found


def resolve_source_disks(wanted: Sequence[str]) -> list[str]:
    listing = json.loads(run(["lsblk", "--json", "--bytes", "-o", "NAME,PATH,TYPE,RM,SIZE,SERIAL,WWN"]).stdout)
    names = [d["name"] for d in listing.get("blockdevices", []) if d.get("type") == "disk"]
    by_id = {link.name: os.path.basename(os.path.realpath(link)) for link in Path("/dev/disk/by-id").glob("*")} \
        if Path("/dev/disk/by-id").is_dir() else {}
    return resolve_disks(wanted, local_disks(listing, booting_disks(names)), by_id)


def nic_macs() -> list[str]:
    return sorted(p.read_text().strip().lower() for p in Path("/sys/class/net").glob("*/address"))


def write_status(work: Path, state: str, console: Console, **extra: object) -> None:
    status = {"state": state, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "messages": console.lines,
              **extra}
    partial = work / (STATUS_FILE + ".partial")
    partial.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(partial, work / STATUS_FILE)


def convert(args: LiveArgs, work: Path, console: Console) -> bool:
    """Run the host's stages; True when the server should now power off."""
    spec_dir = work / "spec"
    if not (spec_dir / f"{args.host}.yaml").is_file():
        raise P2VError(f"no spec for host {args.host} in the work area ({spec_dir}/{args.host}.yaml)",
                       hint="run `doit pxe` on the infra side, then reboot this server")
    specs = {spec.host: spec for spec in load_specs(spec_dir)}
    spec = specs[args.host]
    macs = nic_macs()
    if spec.live.mac not in macs:
        raise P2VError(f"this server's NICs ({', '.join(macs)}) do not include {spec.live.mac} of "
                       f"spec {args.host}: it is not the server the spec describes",
                       hint="check live.mac in the spec and the DHCP reservation; nothing was read")
    disks = resolve_source_disks(spec.source.live_disks)
    console.say(f"{args.host}: source disks {', '.join(disks)} (source.disks: {', '.join(spec.source.live_disks)})")
    env = {**os.environ, "P2V_SPECS": str(spec_dir), LIVE_DISKS_ENV: ",".join(disks), "PYTHONUNBUFFERED": "1",
           **live_cloud_env(work)}
    target = f"{spec.live.last_stage}:{args.host}"
    console.say(f"running doit {target} (logs in {spec.log_dir})")
    with open(spec.log_dir.parent / "live-runner.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), target],
                                cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        failure: list[str] = []
        for line in proc.stdout:
            log.write(line)
            log.flush()
            text = line.rstrip()
            if text.startswith(("==", ".  ", "-- ")) or "failed" in text or "TaskFailed" in text:
                console.say(text)
            if ": " in text and ":" + args.host in text and "[log:" in text:
                failure.append(text)
        code = proc.wait()
    if code != 0:
        raise P2VError(failure[-1] if failure else f"doit {target} failed (exit code {code})",
                       hint="fix the cause, then reboot this server by PXE: it resumes at the failed stage")
    # doit has exited, so the stages' state is saved; main() syncs and unmounts
    # the work area before the power-off, and only then: a server switched off
    # before its state is on the NFS server would upload a duplicate on its
    # next boot. After an earlier last stage the infra side goes on from here.
    return spec.shutdown


def power_off(work: Path, console: Console) -> None:
    synced = run(["sync"], check=False, timeout=600)  # on NFS: written and committed on the server
    if synced.returncode != 0:
        console.say(f"not powering off: sync of the work area failed ({(synced.stderr or synced.stdout).strip()}); "
                    "the state of the stages may not be on the NFS server yet")
        return
    run(["umount", str(work)], check=False, timeout=120)
    command = os.environ.get("P2V_POWEROFF_COMMAND", "systemctl poweroff").split()
    console.say(f"powering off: {' '.join(command)}")
    run(command, check=False)


def main() -> int:
    console = Console()
    work: Path | None = None
    try:
        args = parse_cmdline(Path("/proc/cmdline").read_text())
        console.say(f"converting {args.host}")
        protect_local_disks(console)
        work = mount_work_area(args, console)
        switch_off = convert(args, work, console)
    except P2VError as error:
        console.say(f"FAILED: {error}")
        if work is not None:
            write_status(work, "failed", console, error=str(error))
        # Only after doit started is there a stage to resume at; a refusal ran none.
        started = any(line.startswith("p2v: running doit ") for line in console.lines)
        console.say("this server stays up; " + ("a second PXE boot resumes at the failed stage" if started else
                                                "reboot it by PXE once the cause is fixed"))
        return 1
    console.say("conversion finished")
    write_status(work, "done", console)
    if switch_off:
        power_off(work, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
