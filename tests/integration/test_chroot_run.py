"""What runs in the converted tree's chroot (package scriptlets, dracut, grub) gets a clean
environment and its own process group: no OS_* credential reaches a scriptlet, and nothing it
started in the background outlives the command, also on a timeout.

A real bookworm tree (the fixtures' cached debootstrap) and a real package installed by dpkg,
whose postinst dumps the environment it sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib.resources import chroot_binds
from tasks.lib.runner import CommandError, chroot_run, run
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.rootfs import ensure_rootfs, extract_rootfs

SECRETS = {"OS_PASSWORD": "hunter2-os-password", "OS_APPLICATION_CREDENTIAL_SECRET": "appcred-secret-42",
           "OS_AUTH_URL": "https://keystone.example:5000/v3", "OS_CLOUD": "production",
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


def test_a_package_scriptlet_sees_no_credential(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text("Package: p2v-env-dump\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: p2v tests <p2v@example.invalid>\n"
                                            "Description: dumps the environment of its postinst\n")
    (package / "DEBIAN/postinst").write_text(POSTINST)
    (package / "DEBIAN/postinst").chmod(0o755)
    run(["dpkg-deb", "--build", "--root-owner-group", str(package), str(tree / "tmp/env-dump.deb")])
    chroot_run(tree, ["dpkg", "-i", "/tmp/env-dump.deb"], timeout=120)
    seen = (tree / "root/postinst-env").read_text()
    names = {line.split("=", 1)[0] for line in seen.splitlines() if "=" in line}
    assert "DPKG_MAINTSCRIPT_NAME" in names  # really dpkg's postinst
    assert not {name for name in names if name.startswith("OS_")}, seen
    for value in SECRETS.values():
        assert value not in seen
    assert "P2V_TEST_SECRET" not in names
    assert {"PATH", "HOME", "LC_ALL"} <= names


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
