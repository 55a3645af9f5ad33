"""Context managers for every kernel resource p2v touches.

Each one undoes exactly what it did, in reverse order, also when the body
raises. Tests assert that `losetup -a` and `findmnt` are clean afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.lib import journal
from tasks.lib.runner import CommandError, P2VError, output, run

log = logging.getLogger("p2v.resources")

# Every mount point p2v makes for a host lives below /run/p2v/<host>/, so that
# a later run can find and release what a killed one left (release_stale).
RUN_DIR = Path("/run/p2v")


def host_run_dir(host: str, workdir: Path) -> Path:
    """Scratch mount points of one host's runs: keyed by the workdir too, so that
    two projects converting a host of the same name never release each other's
    mounts (release_stale)."""
    return RUN_DIR / f"{host}-{_workdir_key(workdir)}"


def _workdir_key(workdir: Path) -> str:
    return hashlib.sha256(os.fsencode(os.path.abspath(workdir))).hexdigest()[:8]


def host_device_tag(host: str, workdir: Path) -> str:
    """A short tag of one host's runs for names that are global on the machine (md arrays).

    The host's first 11 characters and 6 hex digits of the run-dir key: at
    most 18 characters, so that `p2v-<tag>-<index>` stays within the 32 that
    mdadm(8) allows an md device name, and within the 28 a kernel-named array
    (`md_<name>`, CREATE names=yes) can take. The key tells apart hosts whose
    first characters agree, and projects converting a host of the same name.
    """
    return f"{host[:11].rstrip('-')}-{_workdir_key(workdir)[:6]}"


@dataclass(frozen=True)
class LoopDevice:
    path: str  # /dev/loopN
    backing: str
    read_only: bool

    def partition(self, number: int) -> str:
        return f"{self.path}p{number}"


# msdos extended partitions: the kernel registers only their first sectors, whatever the table says.
_CONTAINER_TYPES = frozenset({"0x5", "0xf", "0x85"})


@dataclass(frozen=True)
class _Extent:
    start: int  # 512-byte sectors, as sysfs and partx count them
    sectors: int
    container: bool = False

    def registered_as(self, kernel: _Extent) -> bool:
        """The kernel's partition is this table entry (a container's registered size is the kernel's choice)."""
        return kernel.start == self.start and (self.container or kernel.sectors == self.sectors)


def _partition_table(loop: str) -> dict[int, _Extent]:
    """The partitions the table on the device describes."""
    text = output(["partx", "-g", "-o", "NR,START,SECTORS,TYPE", loop], check=False)
    table = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and all(f.isdigit() for f in fields[:3]):
            kind = fields[3].lower() if len(fields) > 3 else ""
            table[int(fields[0])] = _Extent(int(fields[1]), int(fields[2]), kind in _CONTAINER_TYPES)
    return table


def _kernel_partitions(loop: str) -> dict[int, _Extent]:
    """The partitions the kernel has registered on the device (sysfs)."""
    name = os.path.basename(loop)
    found = {}
    for entry in Path("/sys/class/block").glob(f"{name}p*"):
        number = entry.name[len(name) + 1:]
        if not number.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            found[int(number)] = _Extent(int((entry / "start").read_text()), int((entry / "size").read_text()))
    return found


def _foreign_partitions(table: dict[int, _Extent], kernel: dict[int, _Extent]) -> list[int]:
    """Registered partitions the table does not describe: left by an earlier user of the loop device."""
    return sorted(nr for nr, extent in kernel.items() if nr not in table or not table[nr].registered_as(extent))


def _described(extents: dict[int, _Extent]) -> str:
    return ", ".join(f"p{nr} at {e.start}+{e.sectors}" for nr, e in sorted(extents.items())) or "none"


def _sync_partition_nodes(loop: str, timeout: float = 10.0) -> list[int]:
    """This kernel does not scan loop partition tables itself: ask partx, and check what it registered.

    A partition that was open when its loop device was detached stays registered on that device
    (a loop device without the partscan flag never drops them itself), with its old start and size:
    the next file attached there would show a partition that is a window onto the wrong bytes, and
    partx cannot add the true one over it. Such partitions are dropped first, and the kernel's
    partitions must then be the table's, start and size. Where a node is missing afterwards (no
    udev in a container), we make it from sysfs so that /dev/loopNpM exists. Returns the
    partition numbers.
    """
    table = _partition_table(loop)
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        foreign = _foreign_partitions(table, _kernel_partitions(loop))
        if foreign:
            log.warning("%s: dropping partitions %s an earlier user of the device left registered", loop,
                        ", ".join(f"{os.path.basename(loop)}p{nr}" for nr in foreign))
            for nr in foreign:
                run(["partx", "-d", "--nr", str(nr), loop], check=False)
        if table:
            added = run(["partx", "-a", loop], check=False)  # exits 1 when some already exist
            said = added.stdout + added.stderr
        kernel = _kernel_partitions(loop)
        wrong = [nr for nr in table if nr not in kernel or not table[nr].registered_as(kernel[nr])]
        if not wrong and not _foreign_partitions(table, kernel):
            break
        if time.monotonic() > deadline:
            raise P2VError(
                f"the kernel's partitions of {loop} are not its table's after {timeout:.0f} s "
                f"(registered: {_described(kernel)}; the table: {_described(table)}); "
                f"partx said: {' '.join(said.split()[-20:]) or 'nothing'}",
                hint=f"a process holds a partition of {loop} open (fuser -v {loop}p*): end it, then rerun")
        time.sleep(0.2)
    name = os.path.basename(loop)
    for nr in table:
        _make_node(f"{loop}p{nr}", Path(f"/sys/class/block/{name}p{nr}/dev"))
    return sorted(table)


def _make_node(node: str, sysdev: Path) -> None:
    """Make /dev/loopNpM for the partition sysfs describes, replacing a stale node of that name.

    Loop partitions get their minor numbers from the shared extended range (major 259) in the order
    they appear, so a node left from an earlier attach of /dev/loopN can carry a number the kernel
    has since given to a partition of another loop device: blkid would then read someone else's
    partition (seen with two conversions side by side: "no root filesystem found").
    """
    major, minor = (int(n) for n in sysdev.read_text().strip().split(":"))
    wanted = os.makedev(major, minor)
    try:
        present = os.stat(node)
    except FileNotFoundError:
        present = None
    if present is not None:
        if stat.S_ISBLK(present.st_mode) and present.st_rdev == wanted:
            return
        os.unlink(node)
    os.mknod(node, 0o660 | stat.S_IFBLK, wanted)


def _drop_partition_nodes(loop: str, timeout: float = 10.0) -> None:
    """Unregister the device's partitions, waiting a while for a holder to let go of one.

    A partition still open (a killed tool's last reads, a probe) cannot be deleted; if it is still
    registered when the loop device is detached, it outlives the detach (see _sync_partition_nodes).
    """
    deadline = time.monotonic() + timeout
    while True:
        run(["partx", "-d", loop], check=False)
        left = sorted(_kernel_partitions(loop))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        log.warning("%s: partitions %s are still open elsewhere; the next user of the device drops them", loop,
                    ", ".join(f"{os.path.basename(loop)}p{nr}" for nr in left))
    name = os.path.basename(loop)
    for node in Path("/dev").glob(f"{name}p*"):
        # Nodes we made by hand (or that udev left) outlive the loop device.
        if not Path(f"/sys/class/block/{node.name}").exists():
            with contextlib.suppress(FileNotFoundError):
                node.unlink()


def detach_loop(path: str) -> None:
    backing = _backing_file(path)
    _drop_partition_nodes(path)
    for attempt in range(20):
        try:
            run(["losetup", "-d", path])
            break
        except CommandError:
            # EBUSY right after umount is common; the kernel lets go shortly.
            if attempt == 19:
                raise
            time.sleep(0.1 * (attempt + 1))
    _wait_until_detached(path, backing)


def _backing_file(path: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(path)}/loop/backing_file").read_text()
    except OSError:
        return None


def _wait_until_detached(path: str, backing: str | None, timeout: float = 15.0) -> None:
    """`losetup -d` on a device someone still has open only marks it autoclear and succeeds.

    The kernel detaches it at the last close (a blkid or partx probe of another process,
    typically). Wait for that, so that the caller's next step, or a leftover check, sees the
    device free; past the timeout the autoclear flag still detaches it at that last close.
    """
    # Another process may attach its own file to the freed device at once: only ours counts.
    deadline = time.monotonic() + timeout
    while backing is not None and _backing_file(path) == backing and time.monotonic() < deadline:
        time.sleep(0.05)
    if backing is not None and _backing_file(path) == backing:
        log.warning("%s is still open elsewhere; the kernel detaches it at its last close", path)


@contextlib.contextmanager
def loop_device(
    backing: str | os.PathLike[str],
    *,
    read_only: bool,
    offset: int = 0,
    size: int | None = None,
    partitions: bool = False,
    direct_io: bool = False,
) -> Iterator[LoopDevice]:
    """Attach a file (or a block device range) to a loop device."""
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    if offset:
        argv += ["--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if direct_io:
        argv.append("--direct-io=on")
    recorded = {"backing": os.path.realpath(backing), "offset": offset}
    with journal.resource("loop", lambda: output([*argv, os.fspath(backing)]), detach_loop,
                          lambda path: {"device": path, **recorded}) as path:
        dev = LoopDevice(path=path, backing=os.fspath(backing), read_only=read_only)
        # losetup --read-only already makes the loop device read-only, and a
        # `blockdev --setro` on it would outlive the detach and turn the next
        # user of /dev/loopN read-only. Its partitions are set read-only below.
        if partitions:
            numbers = _sync_partition_nodes(path)
            if read_only:
                for nr in numbers:
                    run(["blockdev", "--setro", dev.partition(nr)])
        yield dev


def rescan_partitions(dev: LoopDevice) -> None:
    """After writing a new partition table to a loop device."""
    _drop_partition_nodes(dev.path)
    _sync_partition_nodes(dev.path)


def unmount(target: str | os.PathLike[str]) -> None:
    run(["sync"], check=False)
    for attempt in range(20):
        try:
            run(["umount", os.fspath(target)])
            return
        except CommandError:
            if attempt == 19:
                raise
            time.sleep(0.1 * (attempt + 1))


@contextlib.contextmanager
def mounted(
    source: str,
    target: str | os.PathLike[str],
    *,
    fstype: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
) -> Iterator[Path]:
    """Mount, yield the mount point, unmount (with retries) afterwards."""
    target_path = Path(target)
    argv = ["mount"]
    if bind:
        argv.append("--bind")
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    recorded = {"source": source, "target": os.path.abspath(target_path)}
    with journal.resource("mount", lambda: run([*argv, source, os.fspath(target_path)]),
                          lambda _: unmount(target_path), recorded):
        yield target_path


def read_only_mount_options(fstype: str) -> list[str]:
    """Options that guarantee a mount writes nothing, journal replay included."""
    if fstype in ("ext3", "ext4"):
        return ["ro", "noload"]
    if fstype == "xfs":
        # nouuid: XFS refuses a second mount of the same UUID, and the target
        # may carry the source's UUID (keep_uuids), or another run may read
        # the same source.
        return ["ro", "norecovery", "nouuid"]
    if fstype == "btrfs":
        # rescue=nologreplay (Linux 5.9 and later): newer kernels refuse the old `nologreplay`.
        return ["ro", "rescue=nologreplay"]
    return ["ro"]


@contextlib.contextmanager
def chroot_binds(root: Path) -> Iterator[Path]:
    """Bind /dev /proc /sys /run into a tree so that chrooted tools work."""
    with contextlib.ExitStack() as stack:
        for name in ("dev", "proc", "sys", "run"):
            point = root / name
            point.mkdir(exist_ok=True)
            if name == "proc":
                stack.enter_context(mounted("proc", point, fstype="proc"))
            elif name == "sys":
                stack.enter_context(mounted("sysfs", point, fstype="sysfs"))
            elif name == "run":
                stack.enter_context(mounted("tmpfs", point, fstype="tmpfs", options=["mode=755"]))
            else:
                stack.enter_context(mounted("/dev", point, bind=True))
                pts = point / "pts"
                if pts.is_dir():
                    stack.enter_context(mounted("/dev/pts", pts, bind=True))
        yield root


def _decode_mountinfo_path(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts_below(top: Path) -> list[str]:
    """Mount points at or under `top`, deepest first (the order to unmount)."""
    prefix = os.path.realpath(top)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _decode_mountinfo_path(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def unmount_below(top: Path) -> None:
    """Unmount what a failed or killed step left mounted under `top` (debootstrap's /proc)."""
    for point in mounts_below(top):
        log.warning("unmounting %s, left behind under %s", point, top)
        unmount(point)


@contextlib.contextmanager
def mounts_released(tree: Path) -> Iterator[Path]:
    """Whatever a step left mounted under `tree` (debootstrap's /proc on failure) is unmounted afterwards."""
    try:
        yield tree
    finally:
        unmount_below(tree)


def remove_tree(top: Path) -> None:
    """rmtree that refuses to run into a mount (a bind of /dev would be emptied with it)."""
    if not top.exists():
        return
    if mounts_below(top):
        raise P2VError(f"not removing {top}: something is still mounted below it", hint="see findmnt")
    shutil.rmtree(top)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise builders (also in other processes) that make the same thing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def set_block_device_read_only(device: str) -> None:
    run(["blockdev", "--setro", device])


def loops_backed_by(backing: str | os.PathLike[str]) -> list[str]:
    """Loop devices attached to a file right now (`losetup -j`)."""
    text = output(["losetup", "--noheadings", "--output", "NAME", "-j", os.fspath(backing)], check=False)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _loop_of(device: str) -> str | None:
    """/dev/loop3p2 -> /dev/loop3; /dev/loop3 -> /dev/loop3; anything else -> None."""
    match = re.fullmatch(r"(/dev/loop\d+)(p\d+)?", device)
    return match.group(1) if match else None


def _backing_loop(loop: str) -> str | None:
    """The loop device under a loop at an offset of a partition (an LV without device-mapper)."""
    backing = output(["losetup", "--noheadings", "--output", "BACK-FILE", loop], check=False).strip()
    return _loop_of(backing)


def _loops_backed_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies below a directory (a FUSE export there, even a dead one)."""
    text = output(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], check=False)
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for line in text.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(prefix):
            found.append(name)
    return found


@dataclass(frozen=True)
class StaleDaemon:
    pid: int
    pidfile: Path
    held_loops: tuple[str, ...]  # the loop devices it has open (the source under a replay overlay)


def _stale_daemons(run_dir: Path) -> list[StaleDaemon]:
    """The qemu-storage-daemons a killed run left: each one wrote `--pidfile <run_dir>/<name>.pid`.

    A process counts only while its own command line names that pid file, so
    a recycled pid is never taken for one of ours.
    """
    daemons = []
    for pidfile in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        try:
            pid = int(pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pidfile.unlink(missing_ok=True)  # its process is gone
            continue
        if os.fsencode(pidfile) not in argv:
            pidfile.unlink(missing_ok=True)
            continue
        held = []
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    loop = _loop_of(os.readlink(fd))
                    if loop and loop not in held:
                        held.append(loop)
        daemons.append(StaleDaemon(pid=pid, pidfile=pidfile, held_loops=tuple(held)))
    return daemons


def _process_gone(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] == "Z"  # a zombie holds nothing any more


def _stop_daemon(daemon: StaleDaemon, timeout: float = 10.0) -> None:
    """SIGTERM (qemu flushes and unmounts its export), SIGKILL if it does not go."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _process_gone(daemon.pid):
                daemon.pidfile.unlink(missing_ok=True)
                return
            time.sleep(0.05)
    raise P2VError(f"qemu-storage-daemon (pid {daemon.pid}) of an interrupted run does not exit")


@dataclass(frozen=True)
class StaleProcess:
    pid: int
    name: str  # and the pid: "apt-get (4711)"
    chrooted: bool  # its root is below the run directory: a chroot command of p2v's


def _processes_below(run_dir: Path) -> list[StaleProcess]:
    """Live processes chrooted, or working, below a host's run directory.

    The fix stage's chroot commands (apt, update-initramfs, grub-install) run in
    a process group of their own, so that their daemons end with them; a SIGKILL
    of doit's group does not reach them, and they go on writing into the target
    and keep its mounts busy. The resource journal names each group; this finds
    one started in the instant before its record, and what a package script
    started in a group or session of its own.
    """
    prefix = str(run_dir).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid() or _process_gone(pid):
            continue
        places = {}
        for link in ("root", "cwd"):
            with contextlib.suppress(OSError):
                places[link] = os.readlink(entry / link)
        if any(place.startswith(prefix) for place in places.values()):
            with contextlib.suppress(OSError):
                found.append(StaleProcess(pid, f"{(entry / 'comm').read_text().strip()} ({pid})",
                                          chrooted=places.get("root", "").startswith(prefix)))
    return found


def _end_processes(processes: Sequence[StaleProcess], timeout: float = 10.0) -> None:
    """SIGKILL to the chrooted ones (only p2v chroots into its target); the others (a killed run's tar
    may still be exiting) get time to end, and are not p2v's to kill (an operator's shell, say)."""
    for process in processes:
        if process.chrooted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while left := [process for process in processes if not _process_gone(process.pid)]:
        if time.monotonic() > deadline:
            names = ", ".join(process.name for process in left)
            if any(process.chrooted for process in left):
                raise P2VError(f"processes of an interrupted run do not exit: {names}")
            raise P2VError(f"processes work in this host's run directory and keep its mounts busy: {names}",
                           hint="end them (or leave the directory), then rerun")
        time.sleep(0.05)


@contextlib.contextmanager
def source_in_use(image: str | os.PathLike[str]) -> Iterator[None]:
    """While a stage reads a source image: a shared lock on the file, so that another host's
    release_stale leaves the loops on it alone (released by the kernel if the stage dies)."""
    with open(image, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def _unused_images(images: Sequence[Path]) -> Iterator[list[Path]]:
    """The images no live stage reads (no source_in_use lock), held so until the block ends."""
    with contextlib.ExitStack() as stack:
        free = []
        for image in images:
            try:
                handle = stack.enter_context(open(image, "rb"))
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: another host's stage reads it; or it is gone
                continue
            free.append(image)
        yield free


def _idle_source_loops(images: Sequence[Path]) -> list[str]:
    """Loops on a host's source images (that no live stage reads: _unused_images), and loops stacked on
    them (an LV's offset loop), that nothing mounts or holds: what a run killed between attaching a
    disk and journaling it left. A loop in use (mounted, held by device-mapper, under one) stays."""
    table = output(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], check=False)
    backing = {name: rest.strip().removesuffix(" (deleted)")
               for name, _, rest in (line.strip().partition(" ") for line in table.splitlines())}
    names = {os.fspath(image) for image in images}
    base = [name for name, file in backing.items() if file in names]
    stacked = [name for name, file in backing.items() if _loop_of(file) in base]
    mounted = {_loop_of(source) for source in output(["findmnt", "-rn", "-o", "SOURCE"], check=False).split()}
    idle: list[str] = []
    for loop in [*stacked, *base]:  # stacked first: a base loop is idle once they are
        node = Path("/sys/block") / loop.removeprefix("/dev/")
        holders = [*node.glob("holders/*"), *node.glob(f"{node.name}p*/holders/*")]
        users = [name for name, file in backing.items() if _loop_of(file) == loop and name not in idle]
        if loop not in mounted and not holders and not users:
            idle.append(loop)
    return idle


def release_stale(run_dir: Path, own_images: Sequence[Path], scratch_dir: Path | None = None,
                  source_images: Sequence[Path] = ()) -> list[str]:
    """Undo what a killed run of this host left behind; return what was released.

    A SIGKILLed stage cannot clean up after itself, so the next stage of the
    same host does, before it attaches anything (the same image mounted
    read-write twice would be corrupted). Released: first the processes still
    chrooted below the host's run directory (a killed fix's chroot commands;
    any other process working there stops the stage), then every mount below
    it, the loop devices under those mounts (and the loops they sit on), loops
    over the host's own images (disk.img) and over files in the run directory
    (FUSE exports), the qemu-storage-daemons that wrote a pid file there with
    the source loops they held (a journal replay's overlay sits on one), the
    throw-away files in `scratch_dir` (the replay overlays), and last the loops
    on `source_images` that nothing uses while no live stage of another host
    reads the image (a run killed between attaching a source disk and
    journaling it). Loops of other hosts and of other programs are never
    touched.
    """
    released: list[str] = []
    processes = _processes_below(run_dir)
    _end_processes(processes)
    released += [f"process {process.name}" for process in processes if process.chrooted]
    table = output(["findmnt", "--raw", "--noheadings", "--output", "FSTYPE,SOURCE,TARGET"], check=False)
    prefix = str(run_dir).rstrip("/") + "/"
    stale_mounts: list[tuple[str, str]] = []
    # FUSE exports (verify's and a replay's overlay) back loop devices: they go after the loops.
    stale_exports: list[str] = []
    for line in table.splitlines():
        fstype, _, rest = line.partition(" ")
        source, _, target = rest.partition(" ")
        if target.startswith(prefix):
            if fstype.startswith("fuse"):
                stale_exports.append(target)
            else:
                stale_mounts.append((source, target))
    loops: list[str] = []
    for source, _ in stale_mounts:
        loop = _loop_of(source)
        while loop and loop not in loops:
            loops.append(loop)
            loop = _backing_loop(loop)
    backings: list[str | os.PathLike[str]] = [*own_images, *stale_exports]
    for backing in backings:
        loops += [loop for loop in loops_backed_by(backing) if loop not in loops]
    loops += [loop for loop in _loops_backed_under(run_dir) if loop not in loops]
    for _, target in sorted(stale_mounts, key=lambda item: item[1].count("/"), reverse=True):
        unmount(target)
        released.append(f"mount {target}")
    for loop in loops:  # offset loops before the loops they sit on
        detach_loop(loop)
        released.append(f"loop {loop}")
    held: list[str] = []
    for daemon in _stale_daemons(run_dir):
        _stop_daemon(daemon)
        released.append(f"qemu-storage-daemon {daemon.pid}")
        for loop in daemon.held_loops:
            while loop and loop not in loops and loop not in held:
                held.append(loop)
                loop = _backing_loop(loop)
    for export in stale_exports:
        run(["umount", "-l", export], check=False)
        with contextlib.suppress(OSError):
            Path(export).unlink()  # the empty file the export was mounted on
        released.append(f"export {export}")
    for loop in held:  # the source under an overlay: free once its daemon is gone
        detach_loop(loop)
        released.append(f"loop {loop}")
    if scratch_dir is not None and scratch_dir.is_dir():
        for leftover in sorted(p for p in scratch_dir.iterdir() if p.is_file()):
            leftover.unlink(missing_ok=True)
            released.append(f"file {leftover}")
    with _unused_images(source_images) as unused:
        for loop in _idle_source_loops(unused):
            detach_loop(loop)
            released.append(f"loop {loop}")
    return released
