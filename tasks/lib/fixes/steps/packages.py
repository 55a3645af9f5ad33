"""Packages in the chroot: the spec's package source bound in, the host's resolver, services held
back while installing; cloud-init's build-time state cleaned; the spec's services disabled."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from tasks.lib import fixes
from tasks.lib.fixes.steps.context import FixContext
from tasks.lib.packages import APT_SCRATCH, REPO_MOUNT, PackageSource, packages_to_install, write_apt_index
from tasks.lib.paths import read_text_in_root, remove_in_root, resolve_in_root, write_text_in_root
from tasks.lib.resources import mounted
from tasks.lib.runner import P2VError, chroot_run

log = logging.getLogger("p2v.fix")

# Written for the package step only: package scripts must not start daemons in the chroot.
POLICY_RC_D_PATH = "/usr/sbin/policy-rc.d"
POLICY_RC_D = "#!/bin/sh\n# p2v: no daemons while installing in a chroot\nexit 101\n"


@contextlib.contextmanager
def package_repository(ctx: FixContext, source: PackageSource) -> Iterator[None]:
    """Make the spec's package source reachable from the chroot, for this step only."""
    with contextlib.ExitStack() as stack:
        if source.kind == "directory":
            directory = Path(source.location)
            if not directory.is_dir():
                raise P2VError(f"{ctx.spec.file}: fix.cloud_init.source: {directory} is not a directory",
                               hint="a directory of packages for the server's release, `distro`, or a mirror URL")
            repo = resolve_in_root(ctx.root, REPO_MOUNT)  # in the chroot's tmpfs /run
            pool = repo / "pool"
            pool.mkdir(parents=True, exist_ok=True)
            if ctx.packaging.indexes_directory:
                count = write_apt_index(directory, repo)
                log.info("indexed %d packages from %s", count, directory)
            stack.enter_context(mounted(str(directory), pool, bind=True, options=["ro"]))
        else:
            stack.enter_context(host_resolver(ctx.root))
        yield


@contextlib.contextmanager
def host_resolver(root: Path) -> Iterator[None]:
    """Name lookups in the chroot through this host's resolver, for the package step only.

    The server's own resolver is the old network's. Its /etc/resolv.conf is
    often a link into /run (systemd-resolved, resolvconf), which in the chroot
    is p2v's empty tmpfs: the link's target is made there, a throw-away file.
    A link into the image itself, or no file at all, gets a file for the
    duration that is removed again; the link itself is never changed.
    """
    host_text = Path("/etc/resolv.conf").read_text()
    link = root / "etc/resolv.conf"
    resolved = resolve_in_root(root, "/etc/resolv.conf")
    with contextlib.ExitStack() as stack:
        if resolved.is_file():
            stack.enter_context(mounted("/etc/resolv.conf", resolved, bind=True, options=["ro"]))
        else:
            # A link into /run lands in the chroot's tmpfs; anything else is on
            # the image, and removed again with the directories made for it.
            made = _make_missing_dirs(resolved.parent)
            resolved.write_text(host_text)
            stack.callback(_remove_made, resolved, made)
        log.debug("chroot resolver for the package step: %s (link %s)", resolved,
                  os.readlink(link) if link.is_symlink() else "none")
        yield


def _make_missing_dirs(directory: Path) -> list[Path]:
    made: list[Path] = []
    for parent in [*reversed(directory.parents), directory]:
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    return made


def _remove_made(file: Path, directories: Sequence[Path]) -> None:
    file.unlink(missing_ok=True)
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def services_held_back(ctx: FixContext) -> Iterator[None]:
    """Package scripts must not start daemons in the chroot (Debian's policy-rc.d)."""
    if not ctx.packaging.holds_services:
        yield
        return
    if read_text_in_root(ctx.root, POLICY_RC_D_PATH) is not None:  # the server's own stays as it is
        yield
        return
    write_text_in_root(ctx.root, POLICY_RC_D_PATH, POLICY_RC_D, mode=0o755)
    try:
        yield
    finally:
        remove_in_root(ctx.root, POLICY_RC_D_PATH)


def remove_stale_policy(ctx: FixContext) -> None:
    """p2v's own policy-rc.d, left in the image by a run killed while it installed packages: the
    server would start no service on a package upgrade ever after."""
    if read_text_in_root(ctx.root, POLICY_RC_D_PATH) == POLICY_RC_D:
        remove_in_root(ctx.root, POLICY_RC_D_PATH)
        log.warning("removed %s, left by an interrupted fix", POLICY_RC_D_PATH)


def install_packages(ctx: FixContext) -> None:
    report = ctx.report("packages")
    policy = ctx.spec.fix.cloud_init
    wanted = [*(["cloud-init"] if policy.install else []), *policy.packages]
    if not wanted:
        report.status = "skipped"
        report.changes.append("nothing to install (fix.cloud_init.install is false and no packages are listed)")
        return
    missing = [name for name in wanted if not _is_installed(ctx, name)]
    if ctx.journal is not None and ctx.journal.earlier("packages") is None:
        # As an uninterrupted run would: what the server lacked before an unfinished run of this copy.
        missing = packages_to_install(wanted, missing, ctx.journal.plan_once("packages", "missing", missing))
    if not missing:
        ctx.installed_packages = wanted
        return
    codename = (ctx.layout["system"].get("os") or {}).get("codename")
    install = ctx.packaging.plan(PackageSource.from_spec(policy.source), missing, codename)
    with package_repository(ctx, PackageSource.from_spec(policy.source)), services_held_back(ctx):
        for path, text in install.files.items():
            target = resolve_in_root(ctx.root, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        try:
            for argv in install.commands:
                ctx.chroot("packages", argv, timeout=1800)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(resolve_in_root(ctx.root, APT_SCRATCH))
    still_missing = [name for name in wanted if not _is_installed(ctx, name)]
    if still_missing:
        raise P2VError(f"packages not installed after the install step: {', '.join(still_missing)}",
                       hint=f"see the log; the package source was {policy.source}")
    ctx.installed_packages = wanted
    report.changed(f"installed {', '.join(missing)} from {policy.source}")


def _is_installed(ctx: FixContext, package: str) -> bool:
    packaging = ctx.packaging
    result = chroot_run(ctx.root, list(packaging.installed_query(package)), check=False)
    return packaging.is_installed(result.returncode, result.stdout)


def clean_cloud_init(ctx: FixContext) -> None:
    report = ctx.report("cloud-init-clean")
    if not os.path.exists(resolve_in_root(ctx.root, "/usr/bin/cloud-init")):
        report.status = "skipped"
        return
    state = resolve_in_root(ctx.root, "/var/lib/cloud")
    had_state = state.is_dir() and any(p.name != "data" for p in state.iterdir())
    ctx.chroot("cloud-init-clean", ["cloud-init", "clean", "--logs"], timeout=300)
    if had_state:
        report.changed("removed cloud-init instance state and logs")


def disable_services(ctx: FixContext) -> None:
    report = ctx.report("services")
    names = ctx.spec.fix.remove_services
    if not names:
        report.status = "skipped"
        return
    for argv, description in fixes.service_commands(ctx.layout, ctx.spec.fix):
        result = chroot_run(ctx.root, list(argv), check=False, timeout=300)
        report.commands.append(" ".join(argv))
        if result.returncode == 0:
            if description:
                report.changed(description)
        else:
            report.warnings.append(f"{' '.join(argv)} exited {result.returncode} (ignored): "
                                   f"{(result.stdout + result.stderr).strip()[-200:]}")
