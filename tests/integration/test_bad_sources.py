"""The catalogue of bad and unusual sources (tests/catalogue.py), each built here and run for real.

Every source is made from scratch in tmp_path: a sparse disk image of a few
tens of MiB, its table written by sfdisk/sgdisk (or by hand where the tools
refuse, as for overlapping partitions), its filesystems by mkfs from a
synthetic tree (tests/fixtures/synthetic.py), then broken the way the case
says. doit runs the real stage (and the stages before it). A refused case
must print exactly one line naming the cause with a hint, exit non-zero,
leave no target of that stage, nothing attached or mounted, and the source's
sha256 unchanged; a case that carries on must finish the stage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.runner import run
from tasks.lib.spec import load_specs
from tests.catalogue import CASES, Case
from tests.fixtures.cache import sha256
from tests.fixtures.synthetic import write_tree
from tests.integration.test_inspect import doit, host_leftovers, make_spec

MiB = 1 << 20
SECTOR = 512
ROOT_UUID = "2f7c9e1a-3b5d-4f6a-8c9e-0a1b2c3d4e5f"
SRV_UUID = "5d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
ROOT_FSTAB = f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"
TARGETS = {"inspect": "layout.json", "disk": "disk.img", "sync": "rootfs-synced.stamp", "fix": "fixed.stamp"}


@dataclass
class Built:
    """What a case's builder made: the source images, and anything the check needs."""

    images: list[Path]
    after_inspect: Callable[[Path], None] | None = None  # given the workdir, between inspect and the stage
    facts: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- builders' tools


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def tree(tmp: Path, name: str = "debian12-ifupdown", fstab: str = ROOT_FSTAB) -> Path:
    """A synthetic root tree with its own fstab."""
    root = tmp / f"tree-{name}"
    write_tree(name, root)
    (root / "etc" / "fstab").unlink()
    (root / "etc" / "fstab").write_text(fstab)
    return root


def ext4(tmp: Path, content: Path | None, uuid: str = ROOT_UUID, size: int = 24 * MiB, name: str = "root.fs") -> Path:
    image = sparse(tmp / name, size)
    populate = ["-d", str(content)] if content is not None else []
    run(["mkfs.ext4", "-q", "-F", "-U", uuid, *populate, str(image)])
    return image


def place(disk: Path, filesystem: Path, start_sector: int) -> None:
    """Copy a filesystem image into the disk image at its partition's start (sparse), then drop it."""
    run(["dd", f"if={filesystem}", f"of={disk}", "bs=1M", f"seek={start_sector * SECTOR}", "oflag=seek_bytes",
         "conv=notrunc,sparse", "status=none"])
    filesystem.unlink()


def msdos_disk(tmp: Path, script: str, parts: dict[int, Path], size: int = 32 * MiB) -> Path:
    """sfdisk `script` (after `label: dos`); parts: start sector -> filesystem image."""
    disk = sparse(tmp / "disk.img", size)
    run(["sfdisk", "--quiet", str(disk)], input="label: dos\n" + script)
    for start, filesystem in parts.items():
        place(disk, filesystem, start)
    return disk


def gpt_disk(tmp: Path, script: str, parts: dict[int, Path], size: int = 48 * MiB) -> Path:
    disk = sparse(tmp / "disk.img", size)
    run(["sfdisk", "--quiet", str(disk)], input="label: gpt\n" + script)
    for start, filesystem in parts.items():
        place(disk, filesystem, start)
    return disk


def hand_made_mbr(disk: Path, entries: list[tuple[int, int, int]]) -> None:
    """An MBR written byte by byte (type, first sector, sectors), for tables sfdisk refuses to write."""
    table = b"".join(struct.pack("<B3sB3sII", 0, b"\0\0\0", kind, b"\0\0\0", start, count)
                     for kind, start, count in entries)
    table += bytes(16 * (4 - len(entries)))
    with open(disk, "r+b") as handle:
        handle.seek(440)
        handle.write(struct.pack("<I", 0x5032760D) + b"\0\0" + table + b"\x55\xaa")


def root_disk(tmp: Path, content: Path, **ext4_options: Any) -> Path:
    """One msdos partition at 1 MiB holding an ext4 made from `content`."""
    return msdos_disk(tmp, "start=2048, size=49152, type=83, bootable\n", {2048: ext4(tmp, content, **ext4_options)})


def debugfs(filesystem: Path, request: str) -> None:
    run(["debugfs", "-w", "-R", request, str(filesystem)])


# ---------------------------------------------------------------- the cases' sources


def build_not_a_disk(tmp: Path) -> Built:
    image = tmp / "random.img"
    noise = random.Random(13).randbytes(2 * MiB)
    image.write_bytes(noise[:510] + b"\0\0" + noise[512:])  # never an MBR signature by chance
    return Built([image])


def build_empty_image(tmp: Path) -> Built:
    return Built([sparse(tmp / "empty.img", 0)])


def build_truncated_image(tmp: Path) -> Built:
    root = ext4(tmp, tree(tmp))
    disk = gpt_disk(tmp, "start=2048, size=49152, type=linux\nstart=51200, size=40960, type=linux\n", {2048: root},
                    size=48 * MiB)
    os.truncate(disk, 40 * MiB)  # partition 2 now runs past the end, and the backup GPT is gone
    return Built([disk])


def build_partition_past_end(tmp: Path) -> Built:
    disk = sparse(tmp / "disk.img", 32 * MiB)
    place(disk, ext4(tmp, tree(tmp)), 2048)
    hand_made_mbr(disk, [(0x83, 2048, 80 * 2048)])  # 80 MiB on a 32 MiB disk
    return Built([disk])


def build_overlapping_partitions(tmp: Path) -> Built:
    disk = sparse(tmp / "disk.img", 32 * MiB)
    place(disk, ext4(tmp, tree(tmp)), 2048)
    hand_made_mbr(disk, [(0x83, 2048, 49152), (0x83, 40960, 16384)])
    return Built([disk])


def build_gpt_bad_crc(tmp: Path) -> Built:
    disk = gpt_disk(tmp, "start=2048, size=49152, type=linux\n", {2048: ext4(tmp, tree(tmp))})
    size = disk.stat().st_size
    with open(disk, "r+b") as handle:
        for header in (SECTOR, size - SECTOR):  # the CRC field of each header
            handle.seek(header + 16)
            handle.write(b"\xde\xad\xbe\xef")
    return Built([disk])


def build_gpt_primary_lost(tmp: Path) -> Built:
    disk = gpt_disk(tmp, "start=2048, size=49152, type=linux\n", {2048: ext4(tmp, tree(tmp))})
    with open(disk, "r+b") as handle:
        handle.seek(SECTOR)
        handle.write(bytes(33 * SECTOR))  # header and entries; the protective MBR and the backup stay
    return Built([disk])


def build_msdos_logical(tmp: Path) -> Built:
    fstab = ROOT_FSTAB + f"UUID={SRV_UUID} /srv ext4 defaults 0 2\n"
    srv = tmp / "srv-content"
    (srv / "data").mkdir(parents=True)
    (srv / "data" / "hello.txt").write_text("on a logical partition\n")
    disk = sparse(tmp / "disk.img", 64 * MiB)
    run(["sfdisk", "--quiet", str(disk)], input=(
        "label: dos\n"
        f"{disk}1 : start=2048, size=129024, type=5\n"
        f"{disk}5 : start=4096, size=49152, type=83\n"
        f"{disk}6 : start=55296, size=20480, type=83\n"))
    place(disk, ext4(tmp, tree(tmp, fstab=fstab)), 4096)
    place(disk, ext4(tmp, srv, uuid=SRV_UUID, size=10 * MiB, name="srv.fs"), 55296)
    return Built([disk])


def build_hybrid_mbr(tmp: Path) -> Built:
    disk = gpt_disk(tmp, "start=2048, size=49152, type=linux\n", {2048: ext4(tmp, tree(tmp))})
    run(["sgdisk", "--hybrid=1", str(disk)])
    return Built([disk])


def build_sector_4k(tmp: Path) -> Built:
    disk = sparse(tmp / "disk4k.img", 32 * MiB)
    loop = run(["losetup", "--sector-size", "4096", "--find", "--show", str(disk)]).stdout.strip()
    try:
        run(["sfdisk", "--quiet", loop], input="label: gpt\nstart=256, size=6144, type=linux\n")
    finally:
        run(["losetup", "--detach", loop])
    return Built([disk])


def build_btrfs_root(tmp: Path) -> Built:
    content = tree(tmp, fstab=f"UUID={ROOT_UUID} / btrfs defaults 0 0\n")
    filesystem = sparse(tmp / "root.fs", 128 * MiB)
    run(["mkfs.btrfs", "--quiet", "--uuid", ROOT_UUID, "--rootdir", str(content), str(filesystem)])
    return Built([msdos_disk(tmp, "start=2048, size=262144, type=83\n", {2048: filesystem}, size=160 * MiB)])


def build_reiserfs_srv(tmp: Path) -> Built:
    content = tree(tmp, fstab=ROOT_FSTAB + f"UUID={SRV_UUID} /srv reiserfs defaults 0 2\n")
    srv = sparse(tmp / "srv.fs", 40 * MiB)
    run(["mkreiserfs", "-q", "-f", "-f", "-u", SRV_UUID, str(srv)])
    return Built([msdos_disk(tmp, "start=2048, size=49152, type=83\nstart=51200, size=81920, type=83\n",
                             {2048: ext4(tmp, content), 51200: srv}, size=96 * MiB)])


def build_luks_root(tmp: Path) -> Built:
    volume = sparse(tmp / "luks.fs", 8 * MiB)
    key = tmp / "key"
    key.write_text("p2v-catalogue-test-key")
    run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--pbkdf-force-iterations", "1000",
         "--key-file", str(key), str(volume)])
    return Built([msdos_disk(tmp, "start=2048, size=49152, type=83\n", {2048: volume})])


def build_zfs_member(tmp: Path) -> Built:
    """ZFS uberblocks (magic 0x00bab10c) in all four vdev labels: what blkid recognises as zfs_member
    (on a member of at least 64 MiB; sparse here)."""
    size = 72 * MiB
    member = sparse(tmp / "zfs.fs", size)
    with open(member, "r+b") as handle:
        for label in (0, 256 * 1024, size - 512 * 1024, size - 256 * 1024):
            for slot in range(32):
                handle.seek(label + 128 * 1024 + slot * 1024)
                handle.write(struct.pack("<QQQQQ", 0x00BAB10C, 5000, 100 + slot, 0x1234, 1700000000))
    return Built([msdos_disk(tmp, "start=2048, size=147456, type=bf\n", {2048: member}, size=80 * MiB)])


def build_fs_errors(tmp: Path) -> Built:
    root = ext4(tmp, tree(tmp))
    debugfs(root, "ssv state 3")  # valid, with errors: what the kernel records when it met corruption
    return Built([msdos_disk(tmp, "start=2048, size=49152, type=83, bootable\n", {2048: root})])


def build_ext4_newer_features(tmp: Path) -> Built:
    root = ext4(tmp, tree(tmp))
    debugfs(root, "feature FEATURE_I28")  # an incompat bit no kernel or e2fsprogs knows yet
    return Built([msdos_disk(tmp, "start=2048, size=49152, type=83, bootable\n", {2048: root})])


def build_no_os(tmp: Path) -> Built:
    content = tmp / "data"
    (content / "srv").mkdir(parents=True)
    (content / "srv" / "report.csv").write_text("a,b\n1,2\n")
    return Built([root_disk(tmp, content)])


def build_fstab_garbage(tmp: Path) -> Built:
    fstab = ("not-an-fstab-line\n" + ROOT_FSTAB + "proc /proc\n"
             f"UUID={SRV_UUID} /srv ext4 defaults zero one\n")
    srv = tmp / "srv-content"
    srv.mkdir()
    return Built([msdos_disk(tmp, "start=2048, size=49152, type=83\nstart=51200, size=10240, type=83\n",
                             {2048: ext4(tmp, tree(tmp, fstab=fstab)),
                              51200: ext4(tmp, srv, uuid=SRV_UUID, size=5 * MiB, name="srv.fs")})])


def build_fstab_missing_device(tmp: Path) -> Built:
    fstab = ROOT_FSTAB + f"UUID={SRV_UUID} /srv ext4 defaults 0 2\n"
    return Built([root_disk(tmp, tree(tmp, fstab=fstab))])


def build_fstab_duplicate_mount(tmp: Path) -> Built:
    other = "6e2f3a4b-5c6d-4e7f-8091-a2b3c4d5e6f7"
    fstab = ROOT_FSTAB + f"UUID={SRV_UUID} /srv ext4 defaults 0 2\nUUID={other} /srv ext4 defaults 0 2\n"
    empty = tmp / "empty"
    empty.mkdir()
    return Built([msdos_disk(
        tmp, "start=2048, size=49152, type=83\nstart=51200, size=10240, type=83\nstart=61440, size=2048, type=83\n",
        {2048: ext4(tmp, tree(tmp, fstab=fstab)), 51200: ext4(tmp, empty, uuid=SRV_UUID, size=5 * MiB, name="a.fs"),
         61440: ext4(tmp, empty, uuid=other, size=1 * MiB, name="b.fs")})])


def build_fstab_symlink_loop(tmp: Path) -> Built:
    content = tree(tmp)
    (content / "etc" / "fstab").unlink()
    (content / "etc" / "fstab").symlink_to("fstab")
    return Built([root_disk(tmp, content)])


def build_etc_symlinked(tmp: Path) -> Built:
    content = tree(tmp)
    (content / "usr" / "local").mkdir(parents=True, exist_ok=True)
    shutil.move(content / "etc", content / "usr" / "local" / "etc")
    (content / "etc").symlink_to("/usr/local/etc")  # absolute: on the conversion host it names the host's
    return Built([root_disk(tmp, content)])


def build_redhat_release_only(tmp: Path) -> Built:
    content = tree(tmp, "centos7")
    for name in ("etc/os-release", "usr/lib/os-release"):
        (content / name).unlink()
    return Built([root_disk(tmp, content)], facts={"os": ("centos", "7")})


def build_no_kernel(tmp: Path) -> Built:
    content = tree(tmp)
    for path in [*(content / "boot").glob("vmlinuz-*"), content / "vmlinuz"]:
        path.unlink()
    return Built([root_disk(tmp, content)])


def build_no_initrd_tool(tmp: Path) -> Built:
    content = tree(tmp)
    for name in ("usr/sbin/mkinitramfs", "usr/sbin/update-initramfs"):
        (content / name).unlink()
    shutil.rmtree(content / "etc" / "initramfs-tools")
    return Built([root_disk(tmp, content)])


def build_no_bootloader(tmp: Path) -> Built:
    content = tree(tmp)
    shutil.rmtree(content / "boot" / "grub")
    (content / "etc" / "default" / "grub").unlink()
    return Built([root_disk(tmp, content)])


def build_layout_edited(tmp: Path) -> Built:
    def edit(workdir: Path) -> None:
        path = workdir / "layout.json"
        layout = json.loads(path.read_text())
        layout["used_bytes"] = "about a gigabyte"
        path.write_text(json.dumps(layout))

    return Built([root_disk(tmp, tree(tmp))], after_inspect=edit)


def build_spec_changed(tmp: Path) -> Built:
    def change(workdir: Path) -> None:
        spec = workdir.parent.parent / "specs" / f"{workdir.name}.yaml"
        spec.write_text(spec.read_text() + "target:\n  headroom_percent: 30\n")

    return Built([root_disk(tmp, tree(tmp))], after_inspect=change)


def build_disk_img_deleted(tmp: Path) -> Built:
    return Built([root_disk(tmp, tree(tmp))])


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "not-a-disk": build_not_a_disk,
    "empty-image": build_empty_image,
    "truncated-image": build_truncated_image,
    "partition-past-end": build_partition_past_end,
    "overlapping-partitions": build_overlapping_partitions,
    "gpt-bad-crc": build_gpt_bad_crc,
    "gpt-primary-lost": build_gpt_primary_lost,
    "msdos-logical": build_msdos_logical,
    "hybrid-mbr": build_hybrid_mbr,
    "sector-4k": build_sector_4k,
    "btrfs-root": build_btrfs_root,
    "reiserfs-srv": build_reiserfs_srv,
    "luks-root": build_luks_root,
    "zfs-member": build_zfs_member,
    "fs-errors": build_fs_errors,
    "ext4-newer-features": build_ext4_newer_features,
    "no-os": build_no_os,
    "fstab-garbage": build_fstab_garbage,
    "fstab-missing-device": build_fstab_missing_device,
    "fstab-duplicate-mount": build_fstab_duplicate_mount,
    "fstab-symlink-loop": build_fstab_symlink_loop,
    "etc-symlinked": build_etc_symlinked,
    "redhat-release-only": build_redhat_release_only,
    "no-kernel": build_no_kernel,
    "no-initrd-tool": build_no_initrd_tool,
    "no-bootloader": build_no_bootloader,
    "layout-edited": build_layout_edited,
    "spec-changed": build_spec_changed,
    "disk-img-deleted": build_disk_img_deleted,
}


# ---------------------------------------------------------------- what carrying on means, per case


def layout_of(workdir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workdir / "layout.json").read_text())
    return data


def carried_on(case: Case, workdir: Path, built: Built, output: str) -> None:
    layout = layout_of(workdir)
    mounts = {m["mountpoint"]: m["device"] for m in layout["mounts"]}
    if case.id == "gpt-primary-lost":
        assert layout["disks"][0]["table"]["type"] == "gpt"
        assert "The primary GPT table is corrupt, but the backup appears OK, so that will be used." in output
        assert mounts == {"/": "disk1p1"}
    elif case.id == "msdos-logical":
        assert mounts == {"/": "disk1p5", "/srv": "disk1p6"}
        assert [p["number"] for p in layout["disks"][0]["table"]["partitions"]] == [1, 5, 6]
        assert "disk1p6  ext4" in output  # the plan, printed by plan:<host>
    elif case.id == "hybrid-mbr":
        assert layout["disks"][0]["table"]["type"] == "gpt"
        assert mounts == {"/": "disk1p1"}
    elif case.id == "fstab-garbage":
        warnings = "\n".join(layout["warnings"])
        assert "fstab line 1: too few fields, ignored: 'not-an-fstab-line'" in warnings
        assert "fstab line 3: too few fields, ignored: 'proc /proc'" in warnings
        assert "fstab line 4: dump/pass are not numbers, taken as 0" in warnings
        assert mounts == {"/": "disk1p1", "/srv": "disk1p2"}
    elif case.id == "etc-symlinked":
        assert [e["file"] for e in layout["fstab"]] == ["/"]  # the source's fstab, not this machine's
        assert layout["system"]["os"]["id"] == "debian"
    elif case.id == "redhat-release-only":
        osinfo = layout["system"]["os"]
        assert (osinfo["id"], osinfo["version"].split(".")[0]) == built.facts["os"]
    elif case.id == "spec-changed":
        assert f"-- inspect:{layout['host']}" in output and f".  disk:{layout['host']}" in output, output
        assert "headroom 30% or at least" in output  # the plan disk printed was made with the new spec
    elif case.id == "disk-img-deleted":
        assert (workdir / "disk.img").exists() and (workdir / "rootfs-synced.stamp").exists()
        assert ".  disk:" in output  # doit saw the missing target and made it again
    else:
        raise AssertionError(f"no check for {case.id}")


def commands(case: Case, host: str) -> list[list[str]]:
    """The doit runs of a case: the stage (doit runs what it needs before it)."""
    if case.id in ("msdos-logical", "redhat-release-only"):
        return [[f"inspect:{host}", f"plan:{host}"]]
    if case.id == "disk-img-deleted":
        return [[f"disk:{host}"], [f"sync:{host}"]]
    if case.id in ("layout-edited", "spec-changed"):
        return [[f"disk:{host}"] if case.id == "spec-changed" else [f"inspect:{host}"], [f"disk:{host}"]]
    return [[f"{case.stage}:{host}"]]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_source(case: Case, tmp_path: Path) -> None:
    built = BUILDERS[case.id](tmp_path)
    host = f"bad-{case.id}"[:63].rstrip("-")
    before = {image: sha256(image) for image in built.images}
    spec_dir = make_spec(tmp_path / "project", host, built.images)
    workdir = tmp_path / "project" / "work" / host
    results: list[subprocess.CompletedProcess[str]] = []
    for number, args in enumerate(commands(case, host)):
        if number == 1 and built.after_inspect is not None:
            built.after_inspect(workdir)
        if case.id == "disk-img-deleted" and number == 1:
            (workdir / "disk.img").unlink()
        results.append(doit(spec_dir, *args))
    last = results[-1]
    output = last.stdout + last.stderr
    assert "Traceback" not in "".join(r.stdout + r.stderr for r in results), output
    for earlier in results[:-1]:
        assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    if case.carries_on:
        assert last.returncode == 0, output
        carried_on(case, workdir, built, output)
    else:
        assert last.returncode != 0, output
        lines = [line for line in last.stdout.splitlines() if line.startswith(f"{case.stage}:{host}: ")]
        assert len(lines) == 1, last.stdout
        (line,) = lines
        message, _, log = line.removeprefix(f"{case.stage}:{host}: ").rpartition(" [log: ")
        assert log == f"{workdir}/logs/{case.stage}.log]", line
        words = message.replace(str(workdir), "<workdir>").replace(str(tmp_path), "<tmp>")
        assert words == f"{case.says} (hint: {case.hint})".replace("{host}", host)
        assert not (workdir / TARGETS[case.stage]).exists()
        assert not (workdir / f"{TARGETS[case.stage]}.partial").exists()
    assert host_leftovers(spec_dir) == []
    (spec,) = load_specs(spec_dir)
    assert _qemu_processes([workdir, spec.run_dir]) == []
    assert {image: sha256(image) for image in built.images} == before


def _qemu_processes(places: list[Path]) -> list[str]:
    """qemu or qemu-storage-daemon processes whose command line names this host's workdir or run directory."""
    found = subprocess.run(["pgrep", "-a", "qemu"], capture_output=True, text=True, check=False).stdout
    return [line for line in found.splitlines() if any(str(place) in line for place in places)]


def test_every_case_has_a_builder() -> None:
    assert set(BUILDERS) == {case.id for case in CASES}
