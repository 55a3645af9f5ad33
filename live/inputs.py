"""Everything a live build is made of, and the cache keys derived from it.

Standard library and tasks.lib.runner's errors only, and no process spawned:
computing the key of a cached build must take milliseconds (see live.build).

A build has two layers, each cached by a hash of its inputs:
- the base: Debian (debootstrap + packages from the apt mirror this machine
  uses), the venv built from requirements.txt, the kernel and the dracut
  initrd. Its key covers the suite, the apt sources, the package lists, the
  runtime requirements and the builder's own files.
- the live system: the base plus p2v's own files under /opt/p2v. Its key
  covers the base key and those files, so that a change to a stage costs an
  append to the squashfs, not a new Debian.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.runner import P2VError

PROJECT = Path(__file__).resolve().parent.parent
LIVE_DIR = PROJECT / "live"

SUITE = "bookworm"
HOSTNAME = "p2v-live"

# Where p2v lives in the live root. The venv is in the base layer, the project
# files in the appended layer (a squashfs append cannot add files to a directory
# the base already has, so the two layers share no directory).
VENV_DIR = "/usr/lib/p2v/venv"
PROJECT_DIR = "/opt/p2v"

# Installed into the live tree. Each group says why it is there.
LIVE_PACKAGES: tuple[str, ...] = (
    # the kernel; dracut with the livenet boot (dracut-live) and its network
    # modules (dracut-network); dhclient and curl are what those modules run
    # inside the initrd
    "linux-image-amd64", "dracut", "dracut-live", "dracut-network", "isc-dhcp-client", "curl",
    # a system to run on: init, device manager, modules, poweroff (dbus)
    "systemd", "systemd-sysv", "udev", "kmod", "dbus", "busybox", "iproute2", "procps", "ca-certificates",
    # p2v's interpreter; its venv comes from requirements.txt
    "python3",
    # disks, partitions, filesystems, LVM and md (live.tools lists the commands)
    "util-linux", "fdisk", "parted", "e2fsprogs", "xfsprogs", "dosfstools", "mtools", "lvm2", "mdadm", "dmsetup",
    # copying, archives, file facts
    "rsync", "tar", "zstd", "cpio", "squashfs-tools", "acl", "attr", "file", "findutils", "openssl",
    # images and the verify boot: qemu-img, qemu, qemu-storage-daemon, firmware and NIC ROMs
    "qemu-utils", "qemu-system-x86", "qemu-system-common", "ovmf", "seabios", "ipxe-qemu",
    # the NFS work area; netbase's /etc/protocols, without which mount.nfs
    # fails with "Failed to find 'tcp' protocol"
    "nfs-common", "netbase",
)
# Installed after everything else: it turns /etc/resolv.conf into a link into
# /run, where the build chroot has no resolver, and apt would stop resolving.
LATE_PACKAGES: tuple[str, ...] = ("systemd-resolved",)
# Only for building the venv (pyparted compiles against libparted); purged after.
BUILD_PACKAGES: tuple[str, ...] = ("gcc", "pkg-config", "libparted-dev", "python3-dev", "python3-venv")

# The builder's own files: a change to any of them rebuilds the base. (Not
# live/build.py: it finds and names cache entries, and makes nothing in them.)
BUILDER_FILES: tuple[str, ...] = ("live/inputs.py", "live/assemble.py", "live/tools.py")
BUILDER_DIRS: tuple[str, ...] = ("live/root",)
# p2v's files as the live system runs them, copied to PROJECT_DIR (tests/ is not).
PROJECT_FILES: tuple[str, ...] = ("dodo.py", "doit.cfg", "requirements.txt")
PROJECT_DIRS: tuple[str, ...] = ("tasks", "live")
# Under PROJECT_DIRS, not copied: build-time data and caches.
PROJECT_EXCLUDED: tuple[str, ...] = ("live/root", "live/README.md")

# requirements.txt lists the runtime first, then the test and lint tools,
# which the live system does not need.
TEST_TOOLS_MARKER = "# Test and lint tools"


class LiveInputError(P2VError):
    """An input of the live build is missing or malformed; the message says which."""


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} main"


def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:  # a last blank line ends the last paragraph
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                paragraphs.append(current)
            current, key = {}, ""
            continue
        if raw[0] in " \t" and key:
            current[key] += " " + raw.strip()
            continue
        key, _, value = raw.partition(":")
        key = key.strip().lower()
        current[key] = value.strip()
    return paragraphs


def parse_apt_sources(texts: Iterable[tuple[str, str]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(uri, suite, components) of every enabled `deb` entry, in order.

    `texts` are (file name, content) pairs: `*.sources` files are deb822,
    anything else is the one-line format.
    """
    entries: list[tuple[str, str, tuple[str, ...]]] = []
    for name, text in texts:
        if name.endswith(".sources"):
            for para in _deb822_paragraphs(text):
                if "deb" not in para.get("types", "").split() or para.get("enabled", "yes").lower() == "no":
                    continue
                components = tuple(para.get("components", "").split())
                for uri in para.get("uris", "").split():
                    for suite in para.get("suites", "").split():
                        entries.append((uri.rstrip("/"), suite, components))
            continue
        for line in text.splitlines():
            # `deb [signed-by=...] uri suite component...`; the options do not matter here.
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1].rstrip("/"), words[2], tuple(words[3:])))
    return entries


def read_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return [(f.name, f.read_text()) for f in files if f.is_file()]


def live_apt_sources(entries: Sequence[tuple[str, str, tuple[str, ...]]], suite: str = SUITE) -> tuple[AptSource, ...]:
    """The mirror this machine's apt uses for `suite`, plus its -updates and -security, when configured."""
    chosen: list[AptSource] = []
    for wanted in (suite, f"{suite}-updates", f"{suite}-security"):
        for uri, entry_suite, components in entries:
            if entry_suite == wanted and "main" in components:
                chosen.append(AptSource(uri, wanted))
                break
    if not chosen or chosen[0].suite != suite:
        raise LiveInputError(f"apt has no source for Debian {suite} main",
                             hint=f"add a deb entry for {suite} main to /etc/apt/sources.list(.d)")
    return tuple(chosen)


def runtime_requirements(text: str) -> str:
    """The runtime part of requirements.txt: what comes before the test and lint tools."""
    head, marker, _ = text.partition(TEST_TOOLS_MARKER)
    if not marker:
        raise LiveInputError(f"requirements.txt has no '{TEST_TOOLS_MARKER}' line between runtime and test tools",
                             hint="the live venv installs only what comes before it; keep that line")
    lines = [line.strip() for line in head.splitlines()]
    wanted = [line for line in lines if line and not line.startswith("#")]
    if not wanted:
        raise LiveInputError("requirements.txt lists no runtime requirement before the test tools")
    return "\n".join(wanted) + "\n"


def _files_under(root: Path, relative: str, excluded: Sequence[str]) -> list[str]:
    top = root / relative
    if top.is_file():
        return [relative]
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.relpath(os.path.join(dirpath, name), root)
            if name.endswith(".pyc") or any(path == e or path.startswith(e + "/") for e in excluded):
                continue
            found.append(path)
    return found


def project_files(root: Path = PROJECT) -> list[str]:
    """p2v's files the live system runs, relative to the project root."""
    files = [f for f in PROJECT_FILES if (root / f).is_file()]
    for directory in PROJECT_DIRS:
        files += _files_under(root, directory, PROJECT_EXCLUDED)
    return sorted(files)


def builder_files(root: Path = PROJECT) -> list[str]:
    files = list(BUILDER_FILES)
    for directory in BUILDER_DIRS:
        files += _files_under(root, directory, ())
    return sorted(files)


def files_digest(root: Path, files: Sequence[str]) -> str:
    """One sha256 over names, executable bits, link targets and contents."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        path = root / relative
        digest.update(relative.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        else:
            digest.update(b"x" if os.access(path, os.X_OK) else b"-")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(b"\0")
    return digest.hexdigest()


def _key(identity: object) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LiveInputs:
    """What one build is made of. Built by `gather`; the keys name the cache entries."""

    project: Path
    suite: str
    sources: tuple[AptSource, ...]
    packages: tuple[str, ...]
    late_packages: tuple[str, ...]
    build_packages: tuple[str, ...]
    requirements: str  # the runtime part of requirements.txt
    python: str  # major.minor of the python that downloads the wheels (must match the live tree's)
    builder_digest: str
    files: tuple[str, ...]  # p2v's files copied in, relative to `project`
    files_digest: str

    def base_identity(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "sources": [s.line() for s in self.sources],
            "packages": sorted(self.packages),
            "late_packages": sorted(self.late_packages),
            "build_packages": sorted(self.build_packages),
            "requirements": self.requirements,
            "python": self.python,
            "builder": self.builder_digest,
        }

    @property
    def base_key(self) -> str:
        return _key(self.base_identity())

    @property
    def key(self) -> str:
        return _key({"base": self.base_key, "project": self.files_digest})


def gather(project: Path = PROJECT, apt_dir: Path = Path("/etc/apt")) -> LiveInputs:
    requirements_file = project / "requirements.txt"
    if not requirements_file.is_file():
        raise LiveInputError(f"{requirements_file} does not exist")
    files = project_files(project)
    return LiveInputs(
        project=project,
        suite=SUITE,
        sources=live_apt_sources(parse_apt_sources(read_apt_sources(apt_dir))),
        packages=LIVE_PACKAGES,
        late_packages=LATE_PACKAGES,
        build_packages=BUILD_PACKAGES,
        requirements=runtime_requirements(requirements_file.read_text()),
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        builder_digest=files_digest(project, builder_files(project)),
        files=tuple(files),
        files_digest=files_digest(project, files),
    )
