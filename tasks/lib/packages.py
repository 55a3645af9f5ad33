"""Installing packages (cloud-init and the spec's extras) into the target tree.

Where packages come from is the spec's choice (`fix.cloud_init.source`):

- `distro`: the server's own repositories, as its package manager is
  configured (the chroot gets the live system's resolv.conf for the run);
- an http(s) URL: a mirror of the server's release;
- a directory: .deb or .rpm files, for servers whose repositories are gone
  or out of reach. p2v indexes it itself; the directory is never written.

Nothing of the temporary repository configuration, the package lists or the
downloaded archives stays in the target: they live in the chroot's /run,
which is a tmpfs that goes away with the binds. This module only plans the
command lines (pure, tested for every family); `tasks/fix.py` runs them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks.lib.runner import P2VError, output

# Inside the chroot, under its private /run.
REPO_MOUNT = "/run/p2v-packages"  # the spec's package directory, bound read-only
APT_SCRATCH = "/run/p2v-apt"  # sources list, lists, archives of this run only


@dataclass(frozen=True)
class PackageSource:
    kind: str  # "distro" | "url" | "directory"
    location: str  # the URL or the host directory; "" for distro

    @classmethod
    def from_spec(cls, text: str) -> PackageSource:
        if text == "distro":
            return cls("distro", "")
        if text.startswith(("http://", "https://")):
            return cls("url", text.rstrip("/"))
        return cls("directory", os.path.abspath(text))


@dataclass(frozen=True)
class InstallPlan:
    """What the package step does, in the order it does it."""

    manager: str  # apt | yum | dnf
    packages: tuple[str, ...]
    files: Mapping[str, str]  # chroot path -> content, written before the commands (all under /run)
    commands: tuple[tuple[str, ...], ...]
    needs_network: bool  # distro or url: the chroot needs the live system's resolver


def _apt_options(own_sources: bool) -> tuple[str, ...]:
    sources = ("-o", f"Dir::Etc::SourceList={APT_SCRATCH}/sources.list",
               "-o", "Dir::Etc::SourceParts=-") if own_sources else ()
    return (
        *sources,
        "-o", f"Dir::State::Lists={APT_SCRATCH}/lists",
        "-o", f"Dir::Cache::Archives={APT_SCRATCH}/archives",
        "-o", f"Dir::Cache::pkgcache={APT_SCRATCH}/pkgcache.bin",
        "-o", f"Dir::Cache::srcpkgcache={APT_SCRATCH}/srcpkgcache.bin",
        "-o", "APT::Sandbox::User=root",
    )


def packages_to_install(wanted: Sequence[str], missing: Sequence[str], lacked: Sequence[str]) -> list[str]:
    """What the package step installs, in the spec's order: what is `missing` now, and what the server
    `lacked` before an unfinished fix of the same copy installed part of it (installed again, so that the
    receipt names the whole), of what the spec still wants (its list may have changed since)."""
    return [name for name in dict.fromkeys(wanted) if name in missing or name in lacked]


def plan_install(layout: Mapping[str, Any], source: PackageSource, packages: Sequence[str]) -> InstallPlan:
    """The commands that install `packages` into the target, for the server's package manager."""
    system = layout["system"]
    codename = (system.get("os") or {}).get("codename")
    return tooling_for(system.get("package_manager")).plan(source, packages, codename)


class PackageTooling(Protocol):
    """How one package manager installs and queries packages in the target's chroot.

    A distro family hands out one (`tasks.lib.distro.Family.packaging`).
    """

    @property
    def manager(self) -> str | None: ...

    @property
    def holds_services(self) -> bool: ...  # package scripts kept from starting daemons by policy-rc.d

    @property
    def indexes_directory(self) -> bool: ...  # a directory source needs an index p2v writes (write_apt_index)

    def plan(self, source: PackageSource, packages: Sequence[str], codename: str | None) -> InstallPlan: ...

    def installed_query(self, package: str) -> tuple[str, ...]: ...

    def is_installed(self, returncode: int, stdout: str) -> bool: ...


@dataclass(frozen=True)
class AptTooling:
    """apt-get to install, dpkg-query to ask (Debian, Ubuntu)."""

    manager: str = "apt"
    holds_services: bool = True
    indexes_directory: bool = True

    def plan(self, source: PackageSource, packages: Sequence[str], codename: str | None) -> InstallPlan:
        wanted = tuple(dict.fromkeys(packages))
        if source.kind == "directory":
            sources = f"deb [trusted=yes] file:{REPO_MOUNT} ./\n"  # index at the top, debs in pool/
        elif source.kind == "url":
            if not codename:
                raise P2VError("the server's release codename is unknown, so a mirror URL cannot be used",
                               hint="use a directory of packages or `distro` as fix.cloud_init.source")
            sources = f"deb {source.location} {codename} main\n"
        else:
            sources = ""
        # distro: the server's configured repositories, but lists and archives of our own.
        options = _apt_options(own_sources=source.kind != "distro")
        files = {f"{APT_SCRATCH}/sources.list": sources} if sources else {}
        commands = (
            ("mkdir", "-p", f"{APT_SCRATCH}/lists/partial", f"{APT_SCRATCH}/archives/partial"),
            # What a killed run's dpkg left half-done is finished first (apt-get refuses to run
            # until it is); on a server in order it does nothing.
            ("dpkg", "--configure", "-a"),
            ("apt-get", *options, "update"),
            ("apt-get", *options, "install", "-y", "--no-install-recommends",
             "-o", "Dpkg::Options::=--force-confold", *wanted),
        )
        return InstallPlan("apt", wanted, files, commands, needs_network=source.kind != "directory")

    def installed_query(self, package: str) -> tuple[str, ...]:
        return ("dpkg-query", "-W", "-f=${db:Status-Status}", package)

    def is_installed(self, returncode: int, stdout: str) -> bool:
        return returncode == 0 and stdout.strip() == "installed"


@dataclass(frozen=True)
class RpmTooling:
    """yum or dnf to install, rpm to ask (the RHEL family).

    Any other manager found (zypper, or none) is still asked through rpm, but
    p2v installs nothing with it: `plan` says so in one line.
    """

    manager: str | None
    holds_services: bool = False
    indexes_directory: bool = False

    def plan(self, source: PackageSource, packages: Sequence[str], codename: str | None) -> InstallPlan:
        manager = self.manager
        if manager is None or manager not in ("yum", "dnf"):
            raise P2VError(f"no package manager known for this server (found {manager!r})",
                           hint="set fix.cloud_init.install: false and install cloud-init on the server beforehand")
        wanted = tuple(dict.fromkeys(packages))
        repo_options: tuple[str, ...] = ()
        files = {}
        if source.kind in ("directory", "url"):
            base = f"file://{REPO_MOUNT}" if source.kind == "directory" else source.location
            files = {"/run/p2v-yum/p2v.repo": f"[p2v]\nname=p2v packages\nbaseurl={base}\nenabled=1\ngpgcheck=0\n"}
            repo_options = ("--setopt=reposdir=/run/p2v-yum", "--disablerepo=*", "--enablerepo=p2v")
        if source.kind == "directory":
            # A plain directory of rpms has no repodata; install the files themselves.
            # A shell expands the glob inside the chroot.
            local = f"{manager} -y --disablerepo='*' --nogpgcheck localinstall {REPO_MOUNT}/pool/*.rpm"
            return InstallPlan(manager, wanted, {}, (("sh", "-c", local),), needs_network=False)
        return InstallPlan(manager, wanted, files, ((manager, "-y", *repo_options, "install", *wanted),),
                           needs_network=True)

    def installed_query(self, package: str) -> tuple[str, ...]:
        return ("rpm", "-q", package)

    def is_installed(self, returncode: int, stdout: str) -> bool:
        return returncode == 0


def tooling_for(manager: str | None) -> PackageTooling:
    """The tooling of the package manager inspect found: apt, or rpm with yum/dnf (as before families)."""
    if manager == "apt":
        return AptTooling()
    return RpmTooling(manager)


def write_apt_index(debs_dir: Path, index_dir: Path, pool: str = "pool") -> int:
    """Write a flat `Packages` index for the .deb files of `debs_dir` into `index_dir`.

    The operator's directory stays untouched: the index goes to our scratch
    directory, and the packages are bound read-only at `<repo>/<pool>` in the
    chroot, so the repository is `index_dir` + the bind. Returns how many
    packages it indexed.
    """
    debs = sorted(debs_dir.glob("*.deb"))
    if not debs:
        raise P2VError(f"the package directory {debs_dir} holds no .deb files",
                       hint="point fix.cloud_init.source at a directory of .deb files for this release")
    stanzas = []
    for deb in debs:
        control = output(["dpkg-deb", "--field", str(deb)]).rstrip("\n")
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        stanzas.append(f"{control}\nFilename: ./{pool}/{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {digest}\n")
    index_dir.mkdir(parents=True, exist_ok=True)
    (index_dir / "Packages").write_text("\n".join(stanzas))
    return len(debs)
