"""What runs in the converted tree's chroot (package scriptlets, dracut, grub) gets a clean
environment and its own process group: no OS_* credential reaches a scriptlet, and nothing it
started in the background outlives the command, also on a timeout.

A real bookworm tree (the fixtures' cached debootstrap) and a real package installed by dpkg,
whose postinst dumps the environment it sees.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tasks.lib.fixes.model import EditPlan
from tasks.lib.fixes.steps.context import FixContext
from tasks.lib.fixes.steps.packages import install_packages
from tasks.lib.resources import LoopDevice, chroot_binds
from tasks.lib.runner import CommandError, chroot_run, run
from tasks.lib.spec import CloudInitPolicy, FixPolicy
from tasks.lib.target import MountedTarget
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.rootfs import ensure_rootfs, extract_rootfs
from tests.unit.fix_layouts import completed_plan, make_spec
from tests.unit.layouts import layout

SECRETS = {"OS_PASSWORD": "hunter2-os-password", "OS_APPLICATION_CREDENTIAL_SECRET": "appcred-secret-42",
           "OS_AUTH_URL": "https://keystone.example:5000/v3", "OS_CLOUD": "production",
           "OS_CLIENT_CONFIG_FILE": "/work/host/p2v-clouds.yaml",
           "P2V_TEST_SECRET": "not-for-scriptlets"}

POSTINST = """#!/bin/sh
env > /root/postinst-env
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("chroot") / "root"
    root.mkdir()
    extract_rootfs(ensure_rootfs("bookworm", [*BASE_PACKAGES, "initramfs-tools"]), root)
    with chroot_binds(root):
        yield root


def processes_in(root: Path) -> list[str]:
    """Processes whose root directory is the tree: what a chroot command left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.path.realpath(entry / "root") == str(root):
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    found.append(f"{entry.name}: {command}")
            except OSError:
                continue
    return found


def env_dump_deb(directory: Path, name: str = "p2v-env-dump") -> Path:
    """A package whose postinst writes the environment it sees to /root/postinst-env."""
    package = directory / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: p2v tests <p2v@example.invalid>\n"
                                            "Description: dumps the environment of its postinst\n")
    (package / "DEBIAN/postinst").write_text(POSTINST)
    (package / "DEBIAN/postinst").chmod(0o755)
    debs = directory / "debs"
    debs.mkdir()
    deb = debs / f"{name}_1.0_all.deb"
    run(["dpkg-deb", "--build", "--root-owner-group", str(package), str(deb)])
    return deb


def assert_no_secret_in(seen: str) -> None:
    names = {line.split("=", 1)[0] for line in seen.splitlines() if "=" in line}
    assert "DPKG_MAINTSCRIPT_NAME" in names  # really dpkg's postinst
    assert not {name for name in names if name.startswith("OS_")}, seen
    for value in SECRETS.values():
        assert value not in seen
    assert "P2V_TEST_SECRET" not in names
    assert {"PATH", "HOME", "LC_ALL"} <= names


def test_a_package_scriptlet_sees_no_credential(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    deb = env_dump_deb(tmp_path)
    (tree / "tmp/env-dump.deb").write_bytes(deb.read_bytes())
    chroot_run(tree, ["dpkg", "-i", "/tmp/env-dump.deb"], timeout=120)
    assert_no_secret_in((tree / "root/postinst-env").read_text())


def test_the_fix_package_step_keeps_credentials_from_scriptlets(tree: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """fix's own package step (a directory source: apt in the chroot, then dpkg, then the postinst)
    with OS_* variables in p2v's environment: the live runner gives doit OS_CLOUD and
    OS_CLIENT_CONFIG_FILE (tasks/lib/livecloud.py) for all the stages it runs, fix among them,
    and an operator's shell may hold OS_PASSWORD."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    deb = env_dump_deb(tmp_path, "p2v-env-dump-fix")
    (tree / "root/postinst-env").unlink(missing_ok=True)
    base = make_spec("env-dump")
    spec = dataclasses.replace(base, fix=FixPolicy(cloud_init=CloudInitPolicy(
        install=False, source=str(deb.parent), packages=("p2v-env-dump-fix",))))
    server = layout("plain-bookworm")  # apt, bookworm: what the tree is
    target = MountedTarget(loop=cast(LoopDevice, None), root=tree)  # the package step uses only the root
    ctx = FixContext(spec=spec, layout=server, plan=completed_plan(server), target=target,
                     edits=EditPlan(edits=(), findings=(), kernel_cmdline=(), kernel=""))
    install_packages(ctx)
    assert ctx.installed_packages == ["p2v-env-dump-fix"]
    assert ctx.reports["packages"].commands[-1].startswith("apt-get ")  # the postinst ran under fix's apt-get
    assert_no_secret_in((tree / "root/postinst-env").read_text())
    assert sorted(p.name for p in deb.parent.iterdir()) == [deb.name]  # the operator's directory untouched


def test_a_timeout_kills_the_whole_group(tree: Path) -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 2 s"):
        chroot_run(tree, ["sh", "-c", "sleep 600 & sleep 600"], timeout=2)
    assert time.monotonic() - started < 30
    assert processes_in(tree) == []


def test_what_a_command_leaves_in_the_background_ends_with_it(tree: Path) -> None:
    result = chroot_run(tree, ["sh", "-c", "(sleep 600 > /dev/null 2>&1 &); echo started"], timeout=60)
    assert result.stdout.strip() == "started"
    assert processes_in(tree) == []
