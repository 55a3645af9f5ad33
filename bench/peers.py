"""p2v next to the tools an operator would otherwise use, side by side in one run.

    .venv/bin/python -m bench.peers [--parts convert,upload] [--repeat 1] [--fixture plain-bookworm]
                                    [--size-mib 1024] [--json figures.json]

Needs root and `bin/install --bench` (virt-v2v, nbdkit, libnbd-bin, guestfish, a kernel for
libguestfs's appliance, and the OpenStack command-line clients in .venv-bench). Two parts:

convert   the fixture server (default plain-bookworm, two disks), read through a read-only bind
          mount of its cache directory, converted by
            p2v       `doit report:<host>` in a scratch project: inspect, disk, sync, fix (cloud-init
                      from the cached package directory, as the e2e tests install it), verify (a
                      qemu boot on virtio) and report; everything but the upload
            virt-v2v  `virt-v2v -i libvirtxml <domain.xml> -o local -of raw` (libguestfs's direct
                      backend, TCG forced: this machine's /dev/kvm hangs guests)
          wall time, output size (allocated and apparent), and whether each output boots on virtio:
          our boot checker (tasks/lib/bootcheck.py) boots it with `-snapshot` (every write goes to
          a throw-away overlay) and the verify stage's own checks judge it. Ratio p2v / virt-v2v
          (target <= 0.25).
upload    one file of random data (--size-mib), into the local Keystone + Glance (tests/services):
            p2v        the upload stage's work: the file's sha512, then create, the streaming upload
                       and the check of Glance's checksum (tasks.upload.publish)
            openstack  `openstack image create --file` (python-openstackclient)
            glance     `glance image-create --file` (python-glanceclient)
          every image's stored sha512 is checked, then the image deleted. Ratio p2v / peer as
          throughput (= the peer's seconds / ours; target >= 1.0: ours is not slower).

Every timed run starts with the page cache dropped (`sync; echo 3 > drop_caches`); --repeat N gives
medians. Everything lives in a scratch directory under /var/tmp/p2v-bench (P2V_BENCH_DIR), removed
at the end; the bind mount, the services, the boot checks' qemu and the converters' process groups
are context managers, and a stopped p2v run is released from its resource journal: an error,
Ctrl-C or SIGTERM leaves nothing attached, mounted or running. Kept: the fixture and package caches,
the OpenStack venv, libguestfs's appliance in ${P2V_CACHE:-/var/cache/p2v}/bench/guestfs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from bench.cold import timed
from tasks.lib import glance, unwind
from tasks.lib.bootcheck import BootCheckError, boot_check
from tasks.lib.image_format import UploadFile, digest_of
from tasks.lib.machine import boot_machine
from tasks.lib.progress import human
from tasks.lib.resources import mounted, release_stale, remove_tree
from tasks.lib.runner import P2VError, output, run
from tasks.lib.spec import PROJECT_DIR, Spec, load_specs
from tasks.plan import read_disk_plan, read_layout
from tasks.upload import FileDigests, ImageRequest, publish
from tasks.verify import VERIFY_MAC, Check, plan_checks
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import cache_root, description_file
from tests.fixtures.packages import ensure_package_dir
from tests.services.openstack import OpenStackServices

log = logging.getLogger("p2v.bench")

BENCH_DIR = Path(os.environ.get("P2V_BENCH_DIR", "/var/tmp/p2v-bench"))
PEERS_VENV = PROJECT_DIR / ".venv-bench"  # bin/install --bench: the OpenStack command-line clients
CONVERT_TARGET = 0.25  # p2v seconds / virt-v2v seconds, at most
UPLOAD_TARGET = 1.0  # p2v throughput / the peer's throughput, at least
PARTS = ("convert", "upload")
CLOUD = "p2v-test"
MiB = 1 << 20
# The checks of the verify stage that hold for whatever converted the image; a system state other
# than `running` is said (a unit failed) but does not make "does not boot".
BOOT_CHECKS = ("system-state", "root-virtio")
NOTED_CHECKS = ("system-state",)
INSTALL_HINT = "run bin/install --bench (as root) first"


# ---------------------------------------------------------------- arguments (pure)


@dataclass(frozen=True)
class Options:
    parts: tuple[str, ...]
    repeat: int
    fixture: str
    size_mib: int
    json: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: convert, upload")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each tool (the median is shown)")
    parser.add_argument("--fixture", default="plain-bookworm", help="the fixture server to convert")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the uploaded file")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: expected some of {', '.join(PARTS)}, got {args.parts!r}")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    if args.size_mib < 1:
        parser.error("--size-mib: at least 1")
    return Options(parts=parts, repeat=args.repeat, fixture=args.fixture, size_mib=args.size_mib, json=args.json)


# ---------------------------------------------------------------- virt-v2v's input and output (pure)


def disk_target(bus: str, index: int) -> str:
    """The guest's name of its index-th disk on `bus`, as libvirt spells it in <target dev=...>."""
    prefix = {"ide": "hd", "sata": "sd", "scsi": "sd", "virtio": "vd"}.get(bus)
    if prefix is None:
        raise P2VError(f"no libvirt disk name for bus {bus!r}")
    if not 0 <= index < 26:
        raise P2VError(f"disk index {index} out of range (a..z)")
    return prefix + chr(ord("a") + index)


def domain_xml(name: str, disks: Sequence[Path], *, bus: str, mac: str, nic_model: str,
               memory_mib: int = 1024, vcpus: int = 1, firmware: str = "bios") -> str:
    """A libvirt domain describing the source server, for `virt-v2v -i libvirtxml`.

    Only what virt-v2v reads: name, memory, CPUs, firmware, the raw disks on the bus the server
    had (in boot order) and its NIC with its MAC. No libvirt daemon is involved.
    """
    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="KiB").text = str(memory_mib * 1024)
    ET.SubElement(domain, "vcpu").text = str(vcpus)
    os_element = ET.SubElement(domain, "os", firmware="efi") if firmware == "uefi" else ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc" if firmware == "bios" else "q35").text = "hvm"
    ET.SubElement(os_element, "boot", dev="hd")
    devices = ET.SubElement(domain, "devices")
    for index, disk in enumerate(disks):
        element = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(element, "driver", name="qemu", type="raw")
        ET.SubElement(element, "source", file=str(disk))
        ET.SubElement(element, "target", dev=disk_target(bus, index), bus=bus)
    interface = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(interface, "mac", address=mac)
    ET.SubElement(interface, "source", network="default")
    ET.SubElement(interface, "model", type=nic_model)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


_V2V_STEP = re.compile(r"^\[\s*(\d+(?:\.\d+)?)\]\s+(\S.*?)\s*$")


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float


def v2v_phases(text: str, total: float | None = None) -> tuple[Phase, ...]:
    """virt-v2v's own steps (`[  12.3] Opening the source`) with how long each took until the next.

    The last step runs until `total` (the wall time) when given, else it gets 0.
    """
    steps = [(float(match[1]), match[2]) for match in map(_V2V_STEP.match, text.splitlines()) if match]
    ends = [start for start, _ in steps[1:]] + [total if total is not None else (steps[-1][0] if steps else 0.0)]
    return tuple(Phase(name, round(max(0.0, end - start), 1)) for (start, name), end in zip(steps, ends, strict=False))


def p2v_stages(text: str, host: str) -> tuple[Phase, ...]:
    """The stages of a `doit` run of p2v with their times, from its console (`== sync:host done in 12.3 s`)."""
    pattern = re.compile(rf"^== (\w+):{re.escape(host)} done in (\d+(?:\.\d+)?) s", re.M)
    return tuple(Phase(match[1], float(match[2])) for match in pattern.finditer(text))


def output_disks(directory: Path, name: str) -> list[Path]:
    """virt-v2v -o local's disks of guest `name`: `<name>-sda`, `<name>-sdb`, ... (the XML beside them aside)."""
    return sorted(path for path in directory.iterdir()
                  if path.name.startswith(f"{name}-sd") and not path.name.endswith(".xml"))


# ---------------------------------------------------------------- figures (pure)


@dataclass(frozen=True)
class Sizes:
    allocated: int  # st_blocks * 512, summed over the output's files
    apparent: int  # st_size, summed


def sizes_of(paths: Sequence[Path]) -> Sizes:
    stats = [path.stat() for path in paths]
    return Sizes(allocated=sum(s.st_blocks * 512 for s in stats), apparent=sum(s.st_size for s in stats))


@dataclass(frozen=True)
class ToolRun:
    seconds: float
    sizes: Sizes | None = None
    phases: tuple[Phase, ...] = ()


@dataclass(frozen=True)
class BootVerdict:
    boots: bool
    detail: str  # what the checks saw, or why it did not boot (one line)
    seconds_to_login: float | None = None


@dataclass(frozen=True)
class ToolFigures:
    tool: str
    what: str  # the command, as run
    runs: tuple[ToolRun, ...]
    boot: BootVerdict | None = None

    @property
    def seconds(self) -> float:
        return median([run_.seconds for run_ in self.runs])

    def median_size(self, kind: str) -> float:
        values = [getattr(run_.sizes, kind) for run_ in self.runs if run_.sizes is not None]
        return median(values) if values else float("nan")


@dataclass
class Collected:
    """The runs of one part as they finish: what an interrupted bench can still print."""

    what: dict[str, str]  # tool -> what it runs, in table order
    runs: dict[str, list[ToolRun]] = field(default_factory=dict)
    boots: dict[str, BootVerdict] = field(default_factory=dict)

    def add(self, tool: str, run_: ToolRun) -> None:
        self.runs.setdefault(tool, []).append(run_)

    def figures(self) -> list[ToolFigures]:
        """The tools with at least one finished run."""
        return [ToolFigures(tool, what, tuple(self.runs[tool]), self.boots.get(tool))
                for tool, what in self.what.items() if self.runs.get(tool)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_ratio(ours: float, theirs: float) -> float:
    """Our wall time / theirs: below 1 means p2v is faster (the convert target is <= 0.25)."""
    return ours / theirs if theirs > 0 else float("nan")


def throughput_ratio(size: int, ours: float, theirs: float) -> float:
    """Our throughput / theirs on the same file (= their seconds / ours): 1.0 or more, ours is not slower."""
    if ours <= 0 or theirs <= 0:
        return float("nan")
    return (size / ours) / (size / theirs)


def verdict(value: float, limit: float, at_most: bool) -> str:
    if value != value:  # NaN: nothing to compare
        return "no figure"
    good = value <= limit if at_most else value >= limit
    return f"target {'<=' if at_most else '>='} {limit:.2f}: {'ok' if good else 'MISSED'}"


@dataclass(frozen=True)
class Machine:
    date: str  # UTC
    nproc: int
    disk: str  # the filesystem under the bench directory and its device
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    def line(self) -> str:
        def load(values: tuple[float, float, float]) -> str:
            return " ".join(f"{v:.2f}" for v in values)
        return (f"{self.date}, nproc {self.nproc}, disk {self.disk}, load average {load(self.load_before)} before, "
                f"{load(self.load_after)} after")


def convert_table(figures: Sequence[ToolFigures], source: str) -> str:
    lines = [f"convert {source}: medians, page cache dropped before each run",
             f"{'tool':<10} {'runs':>4} {'wall':>10} {'allocated':>11} {'apparent':>11}  "
             "boots on virtio (our boot checker)"]
    for fig in figures:
        boot = "not checked" if fig.boot is None else f"{'yes' if fig.boot.boots else 'NO'}: {fig.boot.detail}"
        lines.append(f"{fig.tool:<10} {len(fig.runs):>4} {fig.seconds:>8.1f} s "
                     f"{human(fig.median_size('allocated')):>11} {human(fig.median_size('apparent')):>11}  {boot}")
    by_tool = {fig.tool: fig for fig in figures}
    if "p2v" in by_tool and "virt-v2v" in by_tool:
        ratio = time_ratio(by_tool["p2v"].seconds, by_tool["virt-v2v"].seconds)
        lines.append(f"p2v / virt-v2v (wall time) = {ratio:.2f} ({verdict(ratio, CONVERT_TARGET, at_most=True)})")
    for fig in figures:
        last = fig.runs[-1]
        if last.phases:
            steps = ", ".join(f"{p.name} {p.seconds:.0f} s" for p in last.phases)
            lines.append(f"  {fig.tool} (last run): {steps}")
    for fig in figures:
        lines.append(f"  {fig.tool}: {fig.what}")
    return "\n".join(lines)


def upload_table(figures: Sequence[ToolFigures], size: int) -> str:
    lines = [f"upload of {human(size)} of random data into the local Glance: medians, page cache dropped "
             "before each run",
             f"{'client':<10} {'runs':>4} {'wall':>10} {'throughput':>12}  what"]
    for fig in figures:
        rate = size / fig.seconds if fig.seconds > 0 else float("nan")
        lines.append(f"{fig.tool:<10} {len(fig.runs):>4} {fig.seconds:>8.1f} s {human(rate) + '/s':>12}  {fig.what}")
    by_tool = {fig.tool: fig for fig in figures}
    if "p2v" in by_tool:
        for peer in (fig for fig in figures if fig.tool != "p2v"):
            ratio = throughput_ratio(size, by_tool["p2v"].seconds, peer.seconds)
            lines.append(f"p2v / {peer.tool} (throughput; = {peer.tool} s / p2v s) = {ratio:.2f} "
                         f"({verdict(ratio, UPLOAD_TARGET, at_most=False)})")
    return "\n".join(lines)


def figures_json(machine: Machine, convert: Sequence[ToolFigures], upload: Sequence[ToolFigures],
                 upload_size: int, source: str) -> dict[str, Any]:
    def tool(fig: ToolFigures) -> dict[str, Any]:
        return {"tool": fig.tool, "what": fig.what, "median_seconds": fig.seconds,
                "runs": [asdict(run_) for run_ in fig.runs], "boot": asdict(fig.boot) if fig.boot else None}

    by_convert = {fig.tool: fig for fig in convert}
    by_upload = {fig.tool: fig for fig in upload}
    ratios: dict[str, float] = {}
    if "p2v" in by_convert and "virt-v2v" in by_convert:
        ratios["convert_p2v_over_virt_v2v_time"] = time_ratio(by_convert["p2v"].seconds,
                                                              by_convert["virt-v2v"].seconds)
    if "p2v" in by_upload:
        for peer in (fig for fig in upload if fig.tool != "p2v"):
            ratios[f"upload_p2v_over_{peer.tool}_throughput"] = throughput_ratio(
                upload_size, by_upload["p2v"].seconds, peer.seconds)
    return {"machine": asdict(machine), "source": source, "convert": [tool(f) for f in convert],
            "upload_bytes": upload_size, "upload": [tool(f) for f in upload], "ratios": ratios,
            "targets": {"convert_at_most": CONVERT_TARGET, "upload_at_least": UPLOAD_TARGET}}


def cli_env(auth: Mapping[str, Any], region: str | None, interface: str | None = None) -> dict[str, str]:
    """A clouds.yaml entry as the OS_* variables both command-line clients read (glance has no --os-cloud)."""
    names = {"auth_url": "OS_AUTH_URL", "username": "OS_USERNAME", "password": "OS_PASSWORD",
             "project_name": "OS_PROJECT_NAME", "user_domain_name": "OS_USER_DOMAIN_NAME",
             "project_domain_name": "OS_PROJECT_DOMAIN_NAME"}
    env = {variable: str(auth[key]) for key, variable in names.items() if auth.get(key) is not None}
    env["OS_IDENTITY_API_VERSION"] = "3"
    env["OS_IMAGE_API_VERSION"] = "2"
    if region:
        env["OS_REGION_NAME"] = region
    if interface:
        env["OS_INTERFACE"] = interface
    return env


# ---------------------------------------------------------------- doing


def machine_now(load_before: tuple[float, float, float]) -> Machine:
    source = output(["findmnt", "-no", "SOURCE,FSTYPE,SIZE", "--target", str(BENCH_DIR)], check=False)
    device = source.split()[0] if source else "?"
    # As the kernel reports it: a virtual disk often says rotational whatever is under it.
    rota = output(["lsblk", "-dno", "ROTA", device], check=False).strip() if device.startswith("/dev/") else ""
    disk = " ".join(part for part in (source.strip(), f"rota={rota}" if rota else "", f"(under {BENCH_DIR})") if part)
    return Machine(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), nproc=os.cpu_count() or 0, disk=disk,
                   load_before=load_before, load_after=os.getloadavg())


def peer_tool(name: str) -> str:
    """A peer's command-line client: the OpenStack ones from .venv-bench, the rest from PATH."""
    venv_tool = PEERS_VENV / "bin" / name
    if venv_tool.is_file():
        return str(venv_tool)
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise P2VError(f"{name} not found", hint=INSTALL_HINT)
    return found


def check_tools(parts: Sequence[str]) -> None:
    needed = {"convert": ["virt-v2v", "nbdkit", "nbdcopy", "guestfish", "qemu-system-x86_64"],
              "upload": ["openstack", "glance"]}
    missing = []
    for part in parts:
        for name in needed[part]:
            try:
                peer_tool(name)
            except P2VError:
                missing.append(name)
    if "convert" in parts:
        try:
            appliance_kernel()
        except P2VError:
            missing.append("a kernel for libguestfs's appliance")
    if missing:
        raise P2VError(f"missing for {', '.join(parts)}: {', '.join(missing)}", hint=INSTALL_HINT)


# ---------------------------------------------------------------- convert: p2v


@contextlib.contextmanager
def read_only_view(directory: Path, mountpoint: Path) -> Iterator[Path]:
    """`directory` bind-mounted read-only: whatever reads the source through it cannot write it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with mounted(str(directory), mountpoint, bind=True, options=["ro"]):
        probe = next(path for path in mountpoint.iterdir() if path.is_file())
        try:
            os.close(os.open(probe, os.O_WRONLY))
        except OSError:
            pass  # EROFS: as it must be
        else:
            raise P2VError(f"{mountpoint} is writable: the read-only bind mount of {directory} did not take")
        yield mountpoint


def suite_of(name: str) -> str:
    description = description_file(name)
    if description is None:
        raise P2VError(f"no fixture server named {name!r}")
    return str(yaml.safe_load(description.read_text())["suite"])


def write_spec(project: Path, host: str, disks: Sequence[Path], packages: Path) -> Spec:
    """The scratch project's spec: the disks, and cloud-init from the cached packages (no mirror, no upload)."""
    specs = project / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    images = "".join(f"    - {disk}\n" for disk in disks)
    (specs / f"{host}.yaml").write_text(
        f"source:\n  images:\n{images}"
        "fix:\n  network: keep\n"
        f"  cloud_init:\n    install: true\n    source: {packages}\n")
    (spec,) = load_specs(specs)
    return spec


@contextlib.contextmanager
def p2v_project(project: Path, host: str, disks: Sequence[Path], packages: Path) -> Iterator[Spec]:
    """A scratch project for one conversion; afterwards (also after ^C, which kills doit's whole
    process group) what a stopped stage held is released from its resource journal, as p2v's next
    run would, and the project with its disk.img is removed."""
    spec = write_spec(project, host, disks, packages)
    try:
        yield spec
    finally:
        unwind.undo_journal(spec.run_dir)
        release_stale(spec.run_dir, [spec.artifact("disk.img"), spec.artifact("disk.img.partial")],
                      scratch_dir=spec.scratch_dir)
        remove_tree(spec.run_dir)
        remove_tree(project)


def run_p2v(spec: Spec) -> ToolRun:
    captured: list[str] = []

    def convert() -> None:
        result = run([sys.executable, "-m", "doit", f"report:{spec.host}"], cwd=PROJECT_DIR,
                     env={"P2V_SPECS": str(spec.path.parent)}, own_group=True, timeout=3600)
        captured.append(result.stdout + result.stderr)

    seconds = timed(convert)
    log_copy(f"p2v-{spec.host}.log", captured[0])
    return ToolRun(seconds=seconds, sizes=sizes_of([spec.artifact("disk.img")]),
                   phases=p2v_stages(captured[0], spec.host))


def log_copy(name: str, text: str) -> None:
    """A tool's console output, kept for reading after the scratch directory is gone (text only)."""
    logs = BENCH_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / name).write_text(text)


# ---------------------------------------------------------------- convert: virt-v2v


def appliance_kernel() -> tuple[Path, Path, str]:
    """The kernel that bin/install --bench unpacked for supermin (the host has none in /boot)."""
    kernels = sorted((cache_root() / "bench" / "kernel" / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise P2VError("no kernel for libguestfs's appliance in " + str(cache_root() / "bench" / "kernel"),
                       hint=INSTALL_HINT)
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    modules = cache_root() / "bench" / "kernel" / "lib" / "modules" / version
    if not modules.is_dir():
        raise P2VError(f"{modules} is missing", hint=INSTALL_HINT)
    return kernel, modules, version


def libguestfs_env(tmp: Path) -> dict[str, str]:
    """libguestfs as this machine allows: direct backend, TCG forced, the appliance cached for later runs,
    the appliance's kernel from the bench cache, and every temporary file in the bench's scratch area."""
    kernel, modules, version = appliance_kernel()
    appliance = cache_root() / "bench" / "guestfs"
    appliance.mkdir(parents=True, exist_ok=True)
    return {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
            "LIBGUESTFS_CACHEDIR": str(appliance), "VIRT_V2V_TMPDIR": str(tmp), "TMPDIR": str(tmp),
            "SUPERMIN_KERNEL": str(kernel), "SUPERMIN_MODULES": str(modules), "SUPERMIN_KERNEL_VERSION": version}


def warm_appliance(work: Path) -> float:
    """Build libguestfs's appliance (once; cached) and boot it once, outside any timed run: the first
    virt-v2v run must not pay for supermin, and a libguestfs that cannot start fails here, early."""
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run([peer_tool("guestfish"), "-N", str(work / "appliance-check.img") + "=disk:8M", "exit"],
        env=libguestfs_env(tmp), cwd=work, input="", own_group=True, timeout=1800,
        hint="libguestfs could not start its appliance; see LIBGUESTFS_DEBUG=1")
    (work / "appliance-check.img").unlink(missing_ok=True)
    return time.monotonic() - started


def run_virt_v2v(server: FixtureServer, disks: Sequence[Path], work: Path, name: str) -> tuple[ToolRun, list[Path]]:
    xml = work / "domain.xml"
    xml.write_text(domain_xml(name, disks, bus=server.disk_bus, mac=server.mac,
                              nic_model=str(server.facts["boot"].get("nic_model", "e1000")),
                              firmware=server.firmware))
    out, tmp = work / "out", work / "tmp"
    out.mkdir()
    tmp.mkdir(exist_ok=True)
    captured: list[str] = []

    def convert() -> None:
        result = run([peer_tool("virt-v2v"), "-i", "libvirtxml", str(xml), "-o", "local", "-os", str(out),
                      "-of", "raw", "-oa", "sparse"], env=libguestfs_env(tmp), own_group=True, timeout=7200)
        captured.append(result.stdout + result.stderr)

    seconds = timed(convert)
    log_copy(f"virt-v2v-{name}.log", captured[0])
    produced = output_disks(out, name)
    if len(produced) != len(disks):
        raise P2VError(f"virt-v2v wrote {len(produced)} disk(s) in {out}, the source has {len(disks)}")
    return ToolRun(seconds=seconds, sizes=sizes_of(produced), phases=v2v_phases(captured[0], seconds)), produced


# ---------------------------------------------------------------- convert: does it boot


FSTAB_MOUNTED = ("findmnt --fstab -rn -o TARGET,FSTYPE | while read -r target fstype; do "
                 "[ \"$fstype\" = swap ] || findmnt -rn --mountpoint \"$target\" >/dev/null "
                 "|| echo \"not mounted: $target\"; done; echo fstab read")


def boot_checks(spec: Spec, mountpoints: Sequence[str]) -> list[Check]:
    """The verify stage's own system-state and root-virtio checks (they hold for any converter's
    output), and: every filesystem of the output's own fstab is mounted, and every mount point of
    the source is a directory with something in it (a flattened output keeps /boot and /srv as
    directories of /, a kept layout as filesystems of their own)."""
    layout = read_layout(spec.artifact("layout.json"))
    plan = read_disk_plan(spec.artifact("disk-plan.json"))
    checks = [check for check in plan_checks(layout, plan, spec) if check.name in BOOT_CHECKS]

    def judge_fstab(text: str, _code: int) -> str | None:
        if "fstab read" not in text:
            return f"findmnt --fstab did not finish: {text.strip()[-200:]}"
        missing = [line.removeprefix("not mounted: ") for line in text.splitlines() if line.startswith("not mounted: ")]
        return f"not mounted: {' '.join(missing)}" if missing else None

    def judge_paths(text: str, _code: int) -> str | None:
        empty = [line.removeprefix("empty: ") for line in text.splitlines() if line.startswith("empty: ")]
        return f"empty or missing: {' '.join(empty)}" if empty else None

    paths = " ".join(shlex.quote(mp) for mp in mountpoints)
    source_paths = f'for m in {paths}; do [ -n "$(ls -A "$m" 2>/dev/null)" ] || echo "empty: $m"; done; true'
    return [*checks, Check("fstab", FSTAB_MOUNTED, judge_fstab), Check("source paths", source_paths, judge_paths)]


def check_boot(disks: Sequence[Path], checks: Sequence[Check], server: FixtureServer, serial_log: Path) -> BootVerdict:
    """Boot on virtio disk and NIC with our boot checker; qemu's -snapshot: nothing is written to `disks`.

    It boots when the login prompt comes, / is on a virtio_blk disk, every filesystem of its own fstab is
    mounted and every mount point of the source holds something. A system state other than `running` (a
    failed unit) is said, not counted against it.
    """
    machine = boot_machine(server.firmware)
    try:
        result = boot_check(disks, [check.command for check in checks], disk_bus="virtio", nic_model="virtio",
                            mac=VERIFY_MAC, login=server.login, timeout=900, command_timeout=360,
                            serial_log=serial_log, machine=machine.machine, firmware=machine.firmware)
    except BootCheckError as error:
        return BootVerdict(False, str(error).splitlines()[0])
    failed, noted, passed = [], [], []
    for check in checks:
        answer = result.output_of(check.command)
        problem = check.judge(answer.output, answer.exit_code)
        if problem is None:
            passed.append(check.name)
        elif check.name in NOTED_CHECKS:
            noted.append(f"{check.name}: {problem}")
        else:
            failed.append(f"{check.name}: {problem}")
    detail = "; ".join([f"login after {result.seconds_to_login:.0f} s", *failed, *noted,
                        *([f"{', '.join(passed)} ok"] if passed else [])])
    return BootVerdict(not failed, detail, round(result.seconds_to_login, 1))


# ---------------------------------------------------------------- convert: side by side


def convert_tools(host: str) -> dict[str, str]:
    return {"p2v": f"doit report:{host} (inspect, disk, sync, fix with cloud-init, verify, report; no upload)",
            "virt-v2v": "virt-v2v -i libvirtxml -o local -of raw -oa sparse (LIBGUESTFS_BACKEND=direct, force_tcg)"}


def bench_convert(fixture: str, repeat: int, scratch: Path, collected: Collected) -> None:
    server = build_server(fixture)
    packages = ensure_package_dir(suite_of(fixture))
    host = f"bench-{fixture}"
    mountpoints = [fs["mountpoint"] for fs in server.facts["filesystems"] if fs.get("mountpoint")]
    with read_only_view(server.directory, scratch / "source") as source:
        disks = [source / disk.name for disk in server.disks]
        seconds = warm_appliance(scratch / "appliance")
        log.info("libguestfs appliance ready (untimed): %.0f s", seconds)
        for index in range(repeat):
            last = index == repeat - 1
            # Interleaved, virt-v2v first then p2v, so that a change in the machine's load meets both.
            with scratch_area(scratch / f"virt-v2v-{index}") as work:
                log.info("run %d/%d: virt-v2v", index + 1, repeat)
                v2v_run, v2v_disks = run_virt_v2v(server, disks, work, host)
                collected.add("virt-v2v", v2v_run)
                log.info("  virt-v2v %.1f s", v2v_run.seconds)
                with p2v_project(scratch / f"p2v-{index}", host, disks, packages) as spec:
                    log.info("run %d/%d: p2v (doit report:%s)", index + 1, repeat, host)
                    p2v_run = run_p2v(spec)
                    collected.add("p2v", p2v_run)
                    log.info("  p2v %.1f s", p2v_run.seconds)
                    if last:  # the outputs of the last run are booted (untimed), one guest at a time
                        checks = boot_checks(spec, mountpoints)
                        for tool, booted, serial in (("p2v", [spec.artifact("disk.img")], "p2v.serial.log"),
                                                     ("virt-v2v", v2v_disks, "virt-v2v.serial.log")):
                            log.info("boot check: %s's output", tool)
                            collected.boots[tool] = check_boot(booted, checks, server, scratch / "boot" / serial)
                            log.info("  %s", collected.boots[tool].detail)


# ---------------------------------------------------------------- upload


def random_file(path: Path, size_mib: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(MiB))
    return path


class Uploads:
    """The three clients, each uploading the same file into the same Glance as the same user."""

    def __init__(self, services: OpenStackServices, path: Path):
        self.path = path
        self.size = path.stat().st_size
        env = {"OS_CLIENT_CONFIG_FILE": str(services.clouds_yaml)}
        self.cloud = glance.load_cloud(CLOUD, env=env)
        self.service = glance.ImageService(self.cloud)
        self.service.authenticate()
        entry = yaml.safe_load(services.clouds_yaml.read_text())["clouds"][CLOUD]
        # The operator's own OS_* variables (another cloud) must not reach the clients.
        self.env = {**{key: value for key, value in os.environ.items() if not key.startswith("OS_")},
                    **cli_env(entry["auth"], entry.get("region_name"), entry.get("interface"))}
        self.sha512 = digest_of(path, "sha512")  # untimed: what every stored image must match

    def p2v(self, name: str) -> None:
        digests = FileDigests(self.path, None)  # as the stage: sha512 first, then the upload
        request = ImageRequest(name=name, disk_format="raw", container_format="bare", visibility="private",
                               min_disk=0, min_ram=0, tags=(), properties=(("p2v_source_host", name),))
        publish(self.service, request, UploadFile(self.path, "raw", self.size), digests, name, lambda _p: None)

    def openstack(self, name: str) -> None:
        run([peer_tool("openstack"), "image", "create", "--disk-format", "raw", "--container-format", "bare",
             "--private", "--file", str(self.path), "-f", "value", "-c", "id", name],
            env=self.env, inherit_env=False, own_group=True, timeout=3600)

    def glance(self, name: str) -> None:
        run([peer_tool("glance"), "image-create", "--disk-format", "raw", "--container-format", "bare",
             "--visibility", "private", "--file", str(self.path), "--name", name],
            env=self.env, inherit_env=False, own_group=True, timeout=3600)

    def stored_and_deleted(self, name: str) -> None:
        """The one image of that name is active and holds the file (Glance's sha512); then it goes."""
        images = self.service.find(name=name)
        try:
            if len(images) != 1:
                raise P2VError(f"{len(images)} images named {name} in Glance, expected 1")
            image = self.service.get(images[0]["id"])
            if image.get("status") != "active" or image.get("os_hash_value") != self.sha512:
                raise P2VError(f"image {name} is {image.get('status')} with sha512 "
                               f"{str(image.get('os_hash_value'))[:16]}..., not the file's {self.sha512[:16]}...")
        finally:
            for image in images:
                self.service.delete_quietly(image["id"])


UPLOADERS = {
    "p2v": "the upload stage's work: sha512 of the file, create, streaming upload, Glance's checksum checked",
    "openstack": "openstack image create --file (python-openstackclient)",
    "glance": "glance image-create --file (python-glanceclient)",
}


def bench_upload(size_mib: int, repeat: int, scratch: Path, collected: Collected) -> None:
    path = random_file(scratch / "upload" / f"random-{size_mib}M.bin", size_mib)
    state = scratch / "openstack"
    state.mkdir()
    with OpenStackServices(state, log=lambda text: log.info("%s", text)) as services:
        uploads = Uploads(services, path)
        for index in range(repeat):
            order = list(UPLOADERS)[index % 3:] + list(UPLOADERS)[:index % 3]  # each goes first in turn
            for tool in order:
                name = f"p2v-bench-peers-{tool}-{index}"
                action = getattr(uploads, tool)
                seconds = timed(lambda: action(name))  # noqa: B023 (called at once)
                uploads.stored_and_deleted(name)
                collected.add(tool, ToolRun(seconds=seconds))
                log.info("upload run %d/%d: %-9s %6.1f s", index + 1, repeat, tool, seconds)
    path.unlink()


# ---------------------------------------------------------------- main


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def scratch_area(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        remove_tree(path)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.peers needs root (bind mounts, loop devices, drop_caches)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)  # unwind like ^C: every context manager lets go
    # Started in the background by a script, a process inherits SIGINT ignored: `kill -INT` must work too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load_before = os.getloadavg()
    convert = Collected(convert_tools(f"bench-{options.fixture}"))
    upload = Collected(dict(UPLOADERS))
    upload_size = options.size_mib * MiB
    status = 0
    try:
        check_tools(options.parts)
        with scratch_area(BENCH_DIR / f"peers-{os.getpid()}") as scratch:
            if "convert" in options.parts:
                bench_convert(options.fixture, options.repeat, scratch, convert)
            if "upload" in options.parts:
                bench_upload(options.size_mib, options.repeat, scratch, upload)
    except KeyboardInterrupt:
        print("bench.peers: interrupted; nothing left attached, mounted or running", file=sys.stderr)
        status = 130
    except P2VError as error:
        print(f"bench.peers: {error}", file=sys.stderr)
        status = 1
    machine = machine_now(load_before)
    convert_figures, upload_figures = convert.figures(), upload.figures()
    if not convert_figures and not upload_figures:
        return status
    if status:
        print("(stopped early: only the runs that finished, and no boot check unless it says so)")
    print(f"machine: {machine.line()}")
    if convert_figures:
        print(convert_table(convert_figures, f"{options.fixture} (fixture server)"))
    if upload_figures:
        print(upload_table(upload_figures, upload_size))
    if options.json:
        options.json.write_text(json.dumps({**figures_json(machine, convert_figures, upload_figures, upload_size,
                                                           options.fixture), "complete": status == 0},
                                           indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
