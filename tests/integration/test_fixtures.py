"""The fixture servers are what facts.json and manifest.json say, and building leaks nothing.

Each fixture is built once (or taken from the cache), then its images are
attached read-only and compared with its facts: partition tables, filesystem
types and UUIDs, LVM metadata (read with --devices, never activated), fstab,
grub.cfg and every hard-to-copy file. Loop devices and mounts are checked
against this test's own images only, because other tests may run alongside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.resources import LoopDevice, loop_device, mounted, mounts_below, read_only_mount_options, remove_tree
from tasks.lib.runner import P2VError, output
from tests.fixtures import assemble, build, efi, lvm, oddities, rootfs, system
from tests.fixtures.assemble import loops_backed_by
from tests.fixtures.build import FixtureServer
from tests.fixtures.cache import cache_root
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.facts import blkid
from tests.fixtures.plugin import FIXTURE_NAMES


def assert_nothing_attached(directory: Path) -> None:
    assert loops_backed_by(directory) == [], "a loop device is still attached to a fixture image"
    assert mounts_below(directory) == [], "something is still mounted under the fixture directory"


def without_purpose(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in entry.items() if key != "purpose"} for entry in entries]


@contextlib.contextmanager
def attached(server: FixtureServer) -> Iterator[list[LoopDevice]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(loop_device(d, read_only=True, partitions=True)) for d in server.disks]


def device_of(
    location: dict[str, Any], loops: list[LoopDevice], server: FixtureServer, stack: contextlib.ExitStack
) -> str:
    """The read-only device for a facts.json `device` (a partition, or an LV at its offset)."""
    if "disk" in location:
        return loops[int(location["disk"]) - 1].partition(int(location["partition"]))
    for group in server.facts["lvm"]["volume_groups"]:
        for lv in group["lvs"]:
            if group["name"] == location["volume_group"] and lv["name"] == location["logical_volume"]:
                (segment,) = lv["segments"]
                disk = server.disks[segment["pv_device"]["disk"] - 1]
                loop = stack.enter_context(
                    loop_device(disk, read_only=True, offset=segment["disk_offset"], size=lv["size"])
                )
                return str(loop.path)
    raise AssertionError(f"no such LV in facts: {location}")


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def server(request, fixture_server):
    return fixture_server(request.param)


def test_cache_layout_and_warm_call(server: FixtureServer) -> None:
    assert server.directory.name.startswith(server.name + "-")
    assert not server.directory.name.endswith(".partial")
    assert [d.name for d in server.disks] == [f"disk{n}.img" for n in range(1, len(server.disks) + 1)]
    started = time.monotonic()
    again = build.build_server(server.name)
    assert time.monotonic() - started < 1.0
    assert again.directory == server.directory
    for disk in server.disks:  # sparse: far fewer bytes allocated than the apparent size
        assert disk.stat().st_blocks * 512 < disk.stat().st_size


def test_partition_tables_match_facts(server: FixtureServer) -> None:
    for disk, facts in zip(server.disks, server.facts["disks"], strict=True):
        table = json.loads(output(["sfdisk", "--json", str(disk)]))["partitiontable"]
        assert table["label"] == facts["table"] == ("gpt" if server.firmware == "uefi" else "dos")
        assert table["id"] == facts["disk_id"]
        found = [(p["start"] * 512, p["size"] * 512, p["type"], bool(p.get("bootable"))) for p in table["partitions"]]
        expected = [(p["start"], p["size"], p["type_id"], p["bootable"]) for p in facts["partitions"]]
        assert found == expected
        assert facts["size"] == disk.stat().st_size
    # BIOS: grub-pc in the MBR. UEFI: nothing there; the firmware reads the ESP (test below).
    assert server.facts["bootloader"]["mbr_has_grub"] == (server.firmware == "bios")


def test_uefi_server_has_its_loader_on_the_esp_and_its_boot_entry_in_nvram(server: FixtureServer) -> None:
    if server.firmware != "uefi":
        pytest.skip("a BIOS server")
    from virt.firmware.efi import bootentry  # type: ignore[import-untyped]
    from virt.firmware.varstore import edk2  # type: ignore[import-untyped]

    nvram = server.facts["bootloader"]["nvram"]
    (disk,) = [d for d in server.facts["disks"] if d["file"] == server.disks[0].name]
    esp_part = next(p for p in disk["partitions"] if p["number"] == nvram["partition"])
    assert esp_part["type_id"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    with attached(server) as loops:
        node = loops[0].partition(nvram["partition"])
        assert efi.esp_listing(node) == server.facts["bootloader"]["esp"]
        assert blkid(node)["PART_ENTRY_UUID"] == nvram["partuuid"]
    assert f"{nvram['loader']}" in server.facts["bootloader"]["esp"]
    assert not [p for p in server.facts["bootloader"]["esp"] if p.upper().startswith("/EFI/BOOT")]
    assert server.varstore is not None
    variables = edk2.Edk2VarStore(str(server.varstore)).get_varlist()
    entry = bootentry.BootEntry(data=variables[nvram["entry"]].data)
    assert str(entry.title) == nvram["title"]
    path = str(entry.devicepath)  # Partition(nr=1)/FilePath(\EFI\debian\grubx64.efi)
    assert f"nr={nvram['partition']}" in path and nvram["loader"].replace("/", "\\") in path
    assert [str(elem.get_partuuid()) for elem in entry.devicepath if elem.get_partuuid()] == [nvram["partuuid"]]
    assert variables["BootOrder"].data == (1).to_bytes(2, "little")
    assert_nothing_attached(server.directory)


def test_filesystems_swap_and_lvm_match_facts(server: FixtureServer) -> None:
    with attached(server) as loops, contextlib.ExitStack() as stack:
        for fs in server.facts["filesystems"]:
            probed = blkid(device_of(fs["device"], loops, server, stack))
            assert (probed.get("TYPE"), probed.get("UUID")) == (fs["fstype"], fs["uuid"]), fs["mountpoint"]
        for swap in server.facts["swap"]:
            probed = blkid(device_of(swap["device"], loops, server, stack))
            assert (probed.get("TYPE"), probed.get("UUID")) == ("swap", swap["uuid"])
        for group in server.facts["lvm"]["volume_groups"]:
            pvs = [loops[pv["device"]["disk"] - 1].partition(pv["device"]["partition"]) for pv in group["pvs"]]
            report = json.loads(
                lvm.lvm_command(
                    [
                        "lvs",
                        "--readonly",
                        "--reportformat",
                        "json",
                        "--units",
                        "b",
                        "--nosuffix",
                        "-o",
                        "vg_name,vg_uuid,lv_name,lv_uuid,lv_size,seg_pe_ranges",
                    ],
                    pvs,
                ).stdout
            )["report"][0]["lv"]
            assert {(r["vg_name"], r["vg_uuid"]) for r in report} == {(group["name"], group["uuid"])}
            found = {r["lv_name"]: (r["lv_uuid"], int(r["lv_size"])) for r in report}
            assert found == {lv["name"]: (lv["uuid"], lv["size"]) for lv in group["lvs"]}
    assert_nothing_attached(server.directory)


def test_fstab_grub_network_and_oddities_match(server: FixtureServer, tmp_path: Path) -> None:
    facts = server.facts
    manifest = server.manifest_entries()
    by_mountpoint = {fs["mountpoint"]: fs for fs in facts["filesystems"]}
    with attached(server) as loops, contextlib.ExitStack() as stack:

        def mount(point: str) -> Path:
            fs = by_mountpoint[point]
            target = tmp_path / ("root" if point == "/" else point.strip("/").replace("/", "_"))
            target.mkdir()
            device = device_of(fs["device"], loops, server, stack)
            options = read_only_mount_options(fs["fstype"])
            return stack.enter_context(mounted(device, target, fstype=fs["fstype"], options=options))

        root = mount("/")
        boot = mount("/boot")
        assert (root / "etc/fstab").read_text() == facts["fstab"]
        assert (root / "etc/hostname").read_text().strip() == facts["hostname"]
        for binding in facts["network"]["mac_bindings"]:
            assert binding["mac"] in (root / binding["file"].lstrip("/")).read_text()
        for interface in facts["network"]["interfaces"]:
            assert f"address {interface['address']}" in (root / "etc/network/interfaces").read_text()
        grub_cfg = (boot / "grub/grub.cfg").read_text()
        assert "loop" not in grub_cfg
        assert f"root={facts['bootloader']['root_spec']} " in grub_cfg
        assert "console=ttyS0,115200n8" in facts["bootloader"]["cmdline"]
        for kernel in facts["kernels"]:
            # Debian kernels and initramfs (MODULES=most, dracut no-hostonly) carry virtio disks.
            assert kernel["virtio_blk"] and kernel["initrd_modules"]["virtio_blk"]
            assert kernel["initrd_modules"]["virtio_pci"] and kernel["initrd_modules"]["dm_mod"]
            assert (boot / Path(kernel["vmlinuz"]).name).is_file()
            assert (boot / Path(kernel["initrd"]).name).is_file()
        assert facts["os"]["id"] == "debian"
        for point, entries in manifest.items():
            fs_root = root if point == "/" else mount(point)
            assert without_purpose(oddities.read_manifest(fs_root, point)) == without_purpose(entries)
    assert_nothing_attached(server.directory)


def test_manifest_covers_every_oddity(server: FixtureServer) -> None:
    for point, entries in server.manifest_entries().items():
        types = {e["type"] for e in entries}
        assert types == {"file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"}, point
        by_name = {bytes.fromhex(e["path_hex"]).rsplit(b"/", 1)[1]: e for e in entries}
        sparse = by_name[b"sparse.img"]
        assert sparse["size"] == oddities.SPARSE_APPARENT and sparse["blocks"] * 512 < 1024 * 1024
        assert by_name[b"caf\xe9-latin1.txt"]["path"].endswith("caf\\xe9-latin1.txt")
        assert by_name[b"file-with-access-acl"]["acl_access"].startswith("user::rw-,user:4242:rw-")
        assert by_name[b"dir-with-default-acl"]["acl_default"]
        assert by_name[b"file-with-user-xattrs"]["xattrs"]["user.p2v.binary"] == "0001feff"
        assert "security.capability" in by_name[b"cap-net-raw"]["xattrs"]
        assert by_name[b"setuid-root"]["mode"] == "4755"
        assert by_name[b"orphan-file"]["uid"] == oddities.ORPHAN_UID
        assert by_name[b"before-epoch"]["mtime_ns"] == oddities.BEFORE_EPOCH
        assert by_name[b"dangling"]["target"] == "no-such-file"
        assert by_name[b"char-null"]["rdev"] == [1, 3]
        trio = {by_name[n]["link_group"] for n in (b"trio-1", b"trio-2", b"trio-3")}
        assert len(trio) == 1 and None not in trio


# ---------------------------------------------------------------- failures leak nothing


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of our own that shares the (expensive) debootstrap tarballs."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shared = cache_root() / "rootfs"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "rootfs").symlink_to(shared)
    monkeypatch.setenv("P2V_CACHE", str(cache))
    return cache


class InjectedFailure(Exception):
    pass


@pytest.mark.parametrize(
    ("name", "module", "function"),
    [
        # Everything mounted, chroot binds up, LVs not involved.
        ("plain-bookworm", system, "install_grub"),
        # LVM metadata written and the LVs attached at their offsets; nothing mounted yet.
        ("lvm-bookworm", assemble, "make_filesystems"),
    ],
)
def test_failure_mid_build_leaks_nothing(private_cache, monkeypatch, caplog, name, module, function) -> None:
    def fail(*args, **kwargs):
        raise InjectedFailure(f"injected into {function}")

    monkeypatch.setattr(module, function, fail)
    with caplog.at_level(logging.WARNING), pytest.raises(InjectedFailure):
        build.build_server(name)
    fixtures = private_cache / "fixtures"
    assert_nothing_attached(private_cache)
    assert sorted(p.name for p in fixtures.iterdir()) == [f"{name}.failed.log", f"{name}.lock"]
    assert "injected into" in (fixtures / f"{name}.failed.log").read_text()
    # The ExitStack released everything itself: the leftover sweep had nothing to do.
    assert "left behind" not in caplog.text and "left attached" not in caplog.text


def test_a_dracut_tree_whose_apt_fails_leaves_no_tree_mount_or_tarball(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dracut tree is the plain tree plus apt (tests/fixtures/rootfs.py): apt failing inside the
    chroot, its binds up, leaves nothing mounted and nothing cached, and the plain tree is untouched."""
    plain_packages = (*BASE_PACKAGES, "initramfs-tools")
    plain = rootfs.ensure_rootfs("bookworm", plain_packages)  # the shared cache's, built if needed
    cache = tmp_path / "cache"
    (cache / "rootfs").mkdir(parents=True)
    (cache / "rootfs" / plain.name).symlink_to(plain)
    monkeypatch.setenv("P2V_CACHE", str(cache))
    before = plain.stat().st_mtime_ns

    def failing_chroot_run(root: Path, argv: list[str], **kwargs: Any) -> None:
        assert mounts_below(root), "the chroot's binds should be up when apt runs"
        raise InjectedFailure(f"injected into {' '.join(argv)}")

    monkeypatch.setattr(rootfs, "chroot_run", failing_chroot_run)
    dracut = (*BASE_PACKAGES, "dracut")
    with pytest.raises(InjectedFailure, match="apt-get install"):
        rootfs.ensure_rootfs("bookworm", dracut)
    key = rootfs.rootfs_key("bookworm", dracut)
    assert_nothing_attached(cache)
    assert sorted(p.name for p in (cache / "rootfs").iterdir()) == sorted([plain.name, f"{key}.lock"])
    assert plain.stat().st_mtime_ns == before


def test_leftovers_of_a_killed_build_are_released(tmp_path: Path) -> None:
    """What `kill -9` leaves in a .partial directory is released before the next build."""
    partial = tmp_path / "plain-x-0123456789ab.partial"
    (partial / "mnt").mkdir(parents=True)
    image = partial / "disk1.img"
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    output(["mkfs.ext4", "-q", str(image)])
    loop = output(["losetup", "--find", "--show", str(image)])
    output(["mount", loop, str(partial / "mnt")])
    output(["mount", "-t", "tmpfs", "tmpfs", str(partial / "mnt/lost+found")])
    try:
        with pytest.raises(P2VError, match="still mounted"):
            remove_tree(partial)  # rmtree would walk into the mounts
        assemble.release_leftovers(partial)
        assert_nothing_attached(partial)
    finally:  # if release_leftovers is broken, do its job so nothing leaks from this test
        for point in mounts_below(partial):
            output(["umount", point], check=False)
        for leftover in loops_backed_by(partial):
            output(["losetup", "-d", leftover], check=False)
    assert os.path.exists(image)


def test_old_cache_entries_are_pruned_but_the_newest_is_kept(private_cache: Path) -> None:
    fixtures = private_cache / "fixtures"
    names = ["x-000000000001", "x-000000000002", "x-000000000003.partial", "x-extra-000000000004", "x-000000000009"]
    for age, name in enumerate(names):
        (fixtures / name).mkdir(parents=True)
        os.utime(fixtures / name, (1_000_000 + age, 1_000_000 + age))
    assemble.remove_old_entries("x", fixtures / "x-000000000009")
    # The newest older build stays (another session may use it), a killed build's
    # .partial goes, and another fixture whose name starts alike is not touched.
    assert sorted(p.name for p in fixtures.iterdir()) == ["x-000000000002", "x-000000000009", "x-extra-000000000004"]
