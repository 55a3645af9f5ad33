"""Fix-stage pieces that meet the conversion host, in a real Debian chroot on a loop device:

- grub-mkconfig must not list the conversion host's disks: os-prober, enabled on
  purpose in the image, sees a foreign OS on an attached disk, and p2v's run of
  grub-mkconfig still leaves it out;
- grub-pc's debconf answer points at the virtio disk afterwards;
- the package step gets a working resolver even where /etc/resolv.conf is a
  link into /run (systemd-resolved), and the link is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib.debconf import CONFIG_DAT, question_value
from tasks.lib.fixes import GRUB_PC_INSTALL_DEVICES, VIRTIO_BOOT_DISK, debconf_install_device_command
from tasks.lib.fixes.steps.boot import os_prober_hidden
from tasks.lib.fixes.steps.context import StepReport
from tasks.lib.fixes.steps.packages import host_resolver
from tasks.lib.paths import read_text_in_root
from tasks.lib.resources import chroot_binds, loop_device, mounted
from tasks.lib.runner import chroot_run, run
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.packages import ensure_package_dir
from tests.fixtures.rootfs import ensure_rootfs, extract_rootfs
from tests.integration.test_inspect import leftovers
from tests.unit.fix_layouts import completed_plan
from tests.unit.layouts import layout

FOREIGN = "Foreign Linux 9.9"
GiB = 1 << 30


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


@contextlib.contextmanager
def foreign_disk(tmp: Path) -> Iterator[str]:
    """A partitioned disk holding another Linux, attached read-only like a second disk of the host."""
    image = sparse_file(tmp / "foreign.img", 64 << 20)
    run(["sfdisk", "--quiet", str(image)], input="label: dos\n,,L\n")
    with loop_device(image, read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", "-L", "foreign", loop.partition(1)])
        with mounted(loop.partition(1), tmp / "foreign") as point:
            for directory in ("etc", "lib", "boot"):
                (point / directory).mkdir()
            (point / "etc/os-release").write_text(f'NAME="Foreign"\nID=foreign\nPRETTY_NAME="{FOREIGN}"\n')
            (point / "lib/ld-linux-x86-64.so.2").write_bytes(b"\x7fELF")
            (point / "boot/vmlinuz-9.9.0-foreign").write_bytes(b"MZ" + b"\0" * 1024)
            (point / "boot/initrd.img-9.9.0-foreign").write_bytes(b"\x1f\x8b" + b"\0" * 64)
    with loop_device(image, read_only=True, partitions=True) as loop:
        yield loop.partition(1)


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bookworm tree the fixture servers start from, with os-prober added, on an ext4 loop."""
    tmp = tmp_path_factory.mktemp("fixchroot")
    tarball = ensure_rootfs("bookworm", [*BASE_PACKAGES, "initramfs-tools"])
    os_prober = ensure_package_dir("bookworm", ("os-prober",))
    image = sparse_file(tmp / "root.img", 3 * GiB)
    # Partitioned, like the image the fix stage works on: grub-probe maps a
    # whole-disk loop to its backing file, which the chroot cannot see.
    run(["sfdisk", "--quiet", str(image)], input="label: dos\n,,L\n")
    (tmp / "root").mkdir()
    (tmp / "foreign").mkdir()
    with loop_device(image, read_only=False, partitions=True) as loop:
        run(["mkfs.ext4", "-q", "-L", "fixroot", loop.partition(1)])
        with mounted(loop.partition(1), tmp / "root") as root:
            (root / "boot/grub").mkdir(parents=True)
            # As the fix stage does: grub's probes name hd0, not the loop device.
            (root / "boot/grub/device.map").write_text(f"(hd0) {loop.path}\n")
            yield from _with_tree(root, tarball, os_prober)
    assert leftovers([image], []) == []  # its own image; its mounts are in its tmp dir, not /run/p2v


def _with_tree(root: Path, tarball: Path, os_prober: Path) -> Iterator[Path]:
    extract_rootfs(tarball, root)
    debs = sorted(p.name for p in os_prober.glob("*.deb") if p.name.startswith("os-prober_"))
    assert debs, f"no os-prober package in {os_prober}"
    (root / "tmp/os-prober.deb").write_bytes((os_prober / debs[0]).read_bytes())
    with chroot_binds(root):
        chroot_run(root, ["dpkg", "-i", "/tmp/os-prober.deb"], timeout=300)
    (root / "tmp/os-prober.deb").unlink()
    defaults = root / "etc/default/grub"
    defaults.write_text(defaults.read_text() + "GRUB_DISABLE_OS_PROBER=false\n")
    yield root


def grub_cfg_after_mkconfig(root: Path, *, hidden: bool) -> str:
    report = StepReport("bootloader-install")
    with chroot_binds(root), foreign_disk(root.parent) as partition:
        assert partition
        stack = contextlib.ExitStack()
        with stack:
            if hidden:
                stack.enter_context(os_prober_hidden(root, report))
            chroot_run(root, ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"], timeout=600,
                       env={"GRUB_DISABLE_OS_PROBER": "true"} if hidden else None)
    return (root / "boot/grub/grub.cfg").read_text()


def test_grub_mkconfig_lists_no_system_of_the_conversion_host(debian_root: Path) -> None:
    script = debian_root / "etc/grub.d/30_os-prober"
    before = script.read_bytes(), script.stat().st_mode
    # The precondition that makes this test mean something: left alone, os-prober
    # in the chroot does find the host's foreign disk and grub.cfg lists it.
    exposed = grub_cfg_after_mkconfig(debian_root, hidden=False)
    assert FOREIGN in exposed, "os-prober did not find the foreign disk: the test proves nothing"
    cfg = grub_cfg_after_mkconfig(debian_root, hidden=True)
    assert FOREIGN not in cfg
    assert "os-prober" not in cfg.split("### BEGIN /etc/grub.d/30_os-prober ###")[-1].split("### END")[0]
    assert (script.read_bytes(), script.stat().st_mode) == before  # the image keeps its own script
    assert not (debian_root / "run/p2v-os-prober-off").exists()


def test_grub_pc_debconf_answer_points_at_the_virtio_disk(debian_root: Path) -> None:
    lay = layout("plain-bookworm")
    command = debconf_install_device_command(lay, completed_plan(lay))
    assert command is not None
    with chroot_binds(debian_root):
        # What a physical server's answer looks like.
        chroot_run(debian_root, ["debconf-set-selections"],
                   input=f"grub-pc {GRUB_PC_INSTALL_DEVICES} multiselect /dev/disk/by-id/ata-OLD_DISK_1234\n")
        assert question_value(read_text_in_root(debian_root, CONFIG_DAT) or "", GRUB_PC_INSTALL_DEVICES) == \
            "/dev/disk/by-id/ata-OLD_DISK_1234"
        chroot_run(debian_root, list(command.argv), input=command.input)
        shown = chroot_run(debian_root, ["debconf-show", "grub-pc"]).stdout
    assert question_value(read_text_in_root(debian_root, CONFIG_DAT) or "", GRUB_PC_INSTALL_DEVICES) == \
        VIRTIO_BOOT_DISK
    assert f"* {GRUB_PC_INSTALL_DEVICES}: {VIRTIO_BOOT_DISK}" in shown


@pytest.mark.parametrize("link", ["../run/systemd/resolve/stub-resolv.conf", "/run/resolvconf/resolv.conf",
                                  "../var/lib/resolv/none.conf", None])
def test_the_package_step_resolves_names_and_leaves_the_link_alone(debian_root: Path, link: str | None) -> None:
    resolv = debian_root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    if link is not None:
        os.symlink(link, resolv)
    host = Path("/etc/resolv.conf").read_text()
    try:
        with chroot_binds(debian_root):
            assert chroot_run(debian_root, ["cat", "/etc/resolv.conf"], check=False).returncode != 0
            with host_resolver(debian_root):
                seen = chroot_run(debian_root, ["cat", "/etc/resolv.conf"]).stdout
                lookup = chroot_run(debian_root, ["getent", "hosts", "localhost"], check=False)
            assert chroot_run(debian_root, ["cat", "/etc/resolv.conf"], check=False).returncode != 0
        assert seen == host
        assert lookup.returncode == 0, lookup
        if link is None:
            assert not os.path.lexists(resolv)
        else:
            assert resolv.is_symlink() and os.readlink(resolv) == link
        assert not (debian_root / "var/lib/resolv").exists()
    finally:
        resolv.unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
    subprocess.run(["sync"], check=False)
