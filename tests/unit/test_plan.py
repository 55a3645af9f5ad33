"""The disk planner on the recorded layouts (pure: no root, no devices)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tasks import plan as plan_task
from tasks.lib.plan import (
    GPT_TYPES,
    DiskPlan,
    MiB,
    made_differences,
    plan_disk,
    render_plan,
)
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy, GlancePolicy, Source, Spec, TargetPolicy
from tests.unit.layouts import LAYOUTS, layout, with_extra_mounts, without_xfs

NAMES = sorted(p.stem for p in LAYOUTS.glob("*.json"))
PLAIN = ["plain-bookworm", "plain-bullseye", "plain-trixie"]
LVM = ["lvm-bookworm", "dracut-bookworm"]


def make_spec(workdir: Path = Path("/nonexistent/work"), **target: Any) -> Spec:
    return Spec(host="demo", path=Path("/nonexistent/specs/demo.yaml"), file="specs/demo.yaml",
                source=Source(images=(Path("/nonexistent/disk1.img"),)), workdir=workdir,
                target=TargetPolicy(**target), fix=FixPolicy(), glance=GlancePolicy())


def plan(name: str | dict[str, Any], **target: Any) -> DiskPlan:
    return plan_disk(layout(name) if isinstance(name, str) else name, make_spec(**target))


def roles(p: DiskPlan) -> list[str]:
    return [part.filesystem.mountpoint if part.filesystem else part.role for part in p.partitions]


def mkfs_option(argv: tuple[str, ...], option: str) -> str:
    return argv[argv.index(option) + 1]


def check_geometry(p: DiskPlan) -> None:
    """MiB-aligned, first at 1 MiB, no overlaps, disk ends after the last partition."""
    position = MiB
    for part in p.partitions:
        assert part.start % MiB == 0 and part.size % MiB == 0, part
        if part.kind == "logical":
            assert part.start >= position + MiB  # room for its EBR
        elif part.kind != "extended":
            assert part.start == position, part
        position = part.start + (0 if part.kind == "extended" else part.size)
    assert p.partitions[0].start == MiB
    assert p.size == position + (MiB if p.label == "gpt" else 0)
    assert p.size % MiB == 0


# ---------------------------------------------------------------- flatten


@pytest.mark.parametrize("name", NAMES)
def test_every_layout_plans_deterministically_and_round_trips(name: str) -> None:
    for policy in ({}, {"layout": "keep"}, {"label": "gpt"}, {"swap": "file"}, {"keep_uuids": True}):
        first, second = plan(name, **policy), plan(name, **policy)
        assert first == second
        assert json.dumps(first.to_json(), sort_keys=True) == json.dumps(second.to_json(), sort_keys=True)
        assert DiskPlan.from_json(json.loads(json.dumps(first.to_json()))) == first
        check_geometry(first)
        for fs in first.filesystems:
            part = first.partition_of(fs.mountpoint)
            assert part.size >= fs.used_bytes + fs.headroom + fs.overhead - MiB  # rounded up, never short


@pytest.mark.parametrize("name", PLAIN)
def test_flatten_plain_is_one_root_and_swap(name: str) -> None:
    p = plan(name)
    assert roles(p) == ["swap", "/"]
    root = p.filesystem("/")
    assert [s.mountpoint for s in root.sources] == ["/", "/boot", "/srv"]
    assert {c.source_mountpoint: c.target_mountpoint for c in p.copies} == {"/": "/", "/boot": "/", "/srv": "/"}
    assert p.partition_of("/").flags == ("boot",)
    assert any(n.startswith("/boot merged into /") for n in p.notes)
    actions = {c.file: (c.action, c.target) for c in p.fstab}
    assert actions == {"/": ("replace", "/"), "/boot": ("remove", "/"), "/srv": ("remove", "/"),
                       "none": ("replace", "swap")}


@pytest.mark.parametrize("name", LVM)
def test_flatten_keeps_boot_next_to_an_xfs_root(name: str) -> None:
    p = plan(name)
    assert roles(p) == ["/boot", "swap", "/"]
    assert p.filesystem("/").fstype == "xfs"
    assert p.filesystem("/boot").fstype == "ext4"
    assert p.partition_of("/boot").flags == ("boot",)
    assert any("/boot kept separate" in n and "xfs" in n for n in p.notes)
    assert any("LVM on the source is not recreated" in n for n in p.notes)
    second = next(m for m in layout(name)["mounts"] if m["mountpoint"] not in ("/", "/boot"))["mountpoint"]
    change = next(c for c in p.fstab if c.file == second)
    assert (change.action, change.target, change.reason) == ("remove", "/", "merged into /")


def test_sizes_are_used_plus_headroom_plus_overhead() -> None:
    lay = layout("plain-bookworm")
    p = plan(lay)
    root = p.filesystem("/")
    used = sum(fs["used_bytes"] for fs in lay["filesystems"])
    assert root.used_bytes == used
    assert root.headroom == 1 << 30  # 20% of ~0.8 GiB is less than min_headroom 1G
    bigger = plan(lay, headroom_percent=200)
    assert bigger.filesystem("/").headroom == used * 2
    swap = next(part for part in p.partitions if part.role == "swap")
    assert swap.size == 511 * MiB  # the source's 535822336 bytes, rounded up to MiB
    assert p.size == swap.size + p.partition_of("/").size + MiB


# ---------------------------------------------------------------- keep


@pytest.mark.parametrize("name", NAMES)
def test_keep_is_one_partition_per_mount(name: str) -> None:
    lay = layout(name)
    p = plan(lay, layout="keep")
    mounts = [m["mountpoint"] for m in lay["mounts"]]
    by_mount = {m["mountpoint"]: m for m in lay["mounts"]}
    assert sorted(fs.mountpoint for fs in p.filesystems) == sorted(mounts)
    assert roles(p)[-1] == "/"  # the root last, for growpart
    assert roles(p)[0] == "/boot"
    assert sum(1 for part in p.partitions if part.role == "swap") == 1
    for fs in p.filesystems:
        assert fs.fstype == by_mount[fs.mountpoint]["fstype"]
        assert [s.mountpoint for s in fs.sources] == [fs.mountpoint]
    assert all(c.action in ("replace", "keep") for c in p.fstab)


def test_keep_refuses_a_filesystem_it_cannot_make() -> None:
    lay = layout("plain-bookworm")
    fs = next(f for f in lay["filesystems"] if f["device"] == "disk2p1")
    fs["type"] = "btrfs"
    lay["mounts"][2]["fstype"] = "btrfs"
    with pytest.raises(P2VError, match=r"keep cannot recreate /srv \(btrfs\)"):
        plan(lay, layout="keep")
    assert plan(lay).filesystem("/").fstype == "ext4"  # flatten copies it into the root


def test_msdos_with_more_than_four_partitions_uses_logical_ones() -> None:
    lay = with_extra_mounts("plain-bookworm", ["/var", "/home"])
    p = plan(lay, layout="keep")
    check_geometry(p)
    kinds = [(part.number, part.kind) for part in p.partitions]
    assert kinds == [(1, "primary"), (2, "primary"), (3, "primary"), (4, "extended"), (5, "logical"),
                     (6, "logical"), (7, "logical")]
    extended = p.partitions[3]
    assert extended.type_id == "05" and extended.end == p.size
    assert p.partitions[4].start == extended.start + MiB
    assert roles(p)[-1] == "/"
    gpt = plan(lay, layout="keep", label="gpt")
    assert [part.kind for part in gpt.partitions] == ["primary"] * 7  # bios_boot + 6


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("name", ["plain-bookworm", "plain-bullseye", "lvm-bookworm", "dracut-bookworm"])
def test_ext4_of_older_sources_never_gets_newer_features(name: str) -> None:
    for policy in ({}, {"layout": "keep"}):
        for fs in plan(name, **policy).filesystems:
            if fs.fstype != "ext4":
                continue
            assert "metadata_csum_seed" not in fs.features and "orphan_file" not in fs.features
            pins = mkfs_option(fs.mkfs, "-O").split(",")
            assert pins[0] == "none"
            assert "^metadata_csum_seed" in pins and "^orphan_file" in pins
            assert {"64bit", "metadata_csum"} <= set(pins)  # what the source had stays


def test_ext4_of_trixie_keeps_its_features_and_inode_and_block_sizes() -> None:
    lay = layout("plain-trixie")
    p = plan(lay, layout="keep")
    for fs in p.filesystems:
        source = next(f for f in lay["filesystems"] if f.get("mountpoint") == fs.mountpoint)
        if fs.fstype == "ext4":
            assert set(fs.features) == set(source["features"])
            assert mkfs_option(fs.mkfs, "-b") == str(source["block_size"])
            assert mkfs_option(fs.mkfs, "-I") == str(source["inode_size"])
    boot = p.filesystem("/boot")
    assert boot.block_size == 1024
    bullseye_boot = plan("plain-bullseye", layout="keep").filesystem("/boot")
    assert bullseye_boot.inode_size == 128


@pytest.mark.parametrize(("name", "meta", "inode"), [
    ("plain-bookworm", "crc=1,finobt=1,rmapbt=0,reflink=1,inobtcount=1,bigtime=1", "size=512,sparse=1,nrext64=0"),
    ("plain-bullseye", "crc=1,finobt=1,rmapbt=0,reflink=1,inobtcount=0,bigtime=0", "size=512,sparse=1,nrext64=0"),
    ("plain-trixie", "crc=1,finobt=1,rmapbt=1,reflink=1,inobtcount=1,bigtime=1", "size=512,sparse=1,nrext64=1"),
])
def test_xfs_pins_every_flag_from_the_source(name: str, meta: str, inode: str) -> None:
    srv = plan(name, layout="keep").filesystem("/srv")
    assert srv.mkfs[0] == "mkfs.xfs"
    assert mkfs_option(srv.mkfs, "-m") == meta
    assert mkfs_option(srv.mkfs, "-i") == inode
    assert mkfs_option(srv.mkfs, "-n") == "size=4096,ftype=1"
    assert "-L" not in srv.mkfs  # no label on the source


def test_root_fs_ext4_from_an_xfs_root_uses_the_sources_ext4_features_and_merges_boot() -> None:
    p = plan("lvm-bookworm", root_fs="ext4")
    assert roles(p) == ["swap", "/"]
    root = p.filesystem("/")
    assert root.fstype == "ext4" and root.mkfs[0] == "mkfs.ext4"
    assert "shared by the source's ext4 filesystems" in root.features_from
    assert "metadata_csum" in root.features and "orphan_file" not in root.features
    change = next(c for c in p.fstab if c.file == "/")
    assert (change.new_vfstype, change.new_passno) == ("ext4", 1)


def test_root_fs_xfs_from_an_ext4_root_drops_ext_options_and_keeps_boot() -> None:
    p = plan("plain-bullseye", root_fs="xfs")
    assert roles(p) == ["/boot", "swap", "/"]
    root = p.filesystem("/")
    assert root.fstype == "xfs"
    assert "shared by the source's xfs filesystems (disk2p1)" in root.features_from
    assert "bigtime=0" in root.features and "inobtcount=0" in root.features  # as bullseye's /srv
    change = next(c for c in p.fstab if c.file == "/")
    assert change.new_options == ("defaults",) and change.dropped_options == ("errors=remount-ro",)
    assert change.new_passno == 0


@pytest.mark.parametrize(("kernel", "crc", "finobt", "reflink", "isize"), [
    ("2.6.32-754.el6.x86_64", 0, 0, 0, 256),
    ("3.10.0-1160.el7.x86_64", 1, 0, 0, 512),
    ("4.18.0-513.el8.x86_64", 1, 1, 1, 512),
    ("6.1.0-50-amd64", 1, 1, 1, 512),
])
def test_xfs_features_by_kernel_era_when_no_source_proves_them(kernel: str, crc: int, finobt: int, reflink: int,
                                                              isize: int) -> None:
    root = plan(without_xfs("plain-bookworm", kernel), root_fs="xfs").filesystem("/")
    flags = dict(f.split("=") for f in root.features)
    assert (int(flags["crc"]), int(flags["finobt"]), int(flags["reflink"])) == (crc, finobt, reflink)
    assert flags["bigtime"] == flags["inobtcount"] == flags["nrext64"] == flags["rmapbt"] == "0"
    assert root.inode_size == isize and f"kernel {kernel}" in root.features_from


def test_ext4_by_kernel_era_is_the_e2fsprogs_142_baseline() -> None:
    lay = layout("lvm-bookworm")
    lay["filesystems"] = [f for f in lay["filesystems"] if f["type"] != "ext4"]
    lay["mounts"] = [m for m in lay["mounts"] if m["fstype"] != "ext4"]
    lay["fstab"] = [e for e in lay["fstab"] if e["vfstype"] != "ext4"]
    lay["system"]["kernels"] = [{**lay["system"]["kernels"][0], "version": "2.6.32-754.el6.x86_64"}]
    root = plan(lay, root_fs="ext4").filesystem("/")
    assert "64bit" not in root.features and "metadata_csum" not in root.features
    assert {"extent", "flex_bg", "uninit_bg", "has_journal"} <= set(root.features)
    lay["system"]["kernels"][0]["version"] = "2.6.18-398.el5"
    with pytest.raises(P2VError, match=r"ext4 needs a kernel of 2\.6\.28 or later"):
        plan(lay, root_fs="ext4")


def test_grub_legacy_always_keeps_boot() -> None:
    p = plan(without_xfs("plain-bookworm", "2.6.32-754.el6.x86_64", bootloader="grub-legacy"))
    assert roles(p) == ["/boot", "swap", "/"]
    assert any("bootloader is grub-legacy" in n for n in p.notes)
    with pytest.raises(P2VError, match="grub legacy cannot boot from a GPT disk"):
        plan(without_xfs("plain-bookworm", "2.6.32-754.el6.x86_64", bootloader="grub-legacy"), label="gpt")


def test_esp_is_kept_with_its_type() -> None:
    lay = with_extra_mounts("plain-bookworm", ["/boot/efi"])
    esp = next(f for f in lay["filesystems"] if f.get("mountpoint") == "/boot/efi")
    esp.update(type="vfat", uuid="ABCD-1234", label="EFI", features=None)
    lay["mounts"][-1]["fstype"] = "vfat"
    lay["fstab"][-1]["vfstype"] = "vfat"
    lay["boot"]["firmware"] = "uefi"
    for label, type_id in (("msdos", "ef"), ("gpt", GPT_TYPES["esp"])):
        p = plan(lay, label=label, keep_uuids=True)
        part = p.partition_of("/boot/efi")
        assert (part.type_id, part.flags) == (type_id, ("esp",))
        assert part.filesystem is not None
        assert part.filesystem.mkfs == ("mkfs.fat", "-F", "32", "-n", "EFI", "-i", "ABCD1234")
        assert "bios_boot" not in roles(p)


# ---------------------------------------------------------------- swap, label, size, UUIDs


def test_swap_none_and_file() -> None:
    source = plan("plain-bookworm")
    none = plan("plain-bookworm", swap="none")
    assert roles(none) == ["/"] and none.swap_file is None
    swap_line = next(c for c in none.fstab if c.vfstype == "swap")
    assert (swap_line.action, swap_line.reason) == ("remove", "swap: none")
    file = plan("plain-bookworm", swap="file")
    assert roles(file) == ["/"]
    assert file.swap_file is not None
    assert (file.swap_file.path, file.swap_file.size) == ("/swapfile", 511 * MiB)
    assert file.partition_of("/").size >= none.partition_of("/").size + 511 * MiB
    swap_line = next(c for c in file.fstab if c.vfstype == "swap")
    assert (swap_line.action, swap_line.new_spec, swap_line.new_vfstype) == ("replace", "/swapfile", "swap")
    assert source.size > none.size


def test_gpt_gets_a_bios_boot_partition_for_grub2() -> None:
    p = plan("plain-bookworm", label="gpt")
    first = p.partitions[0]
    assert (first.role, first.start, first.size, first.flags) == ("bios_boot", MiB, MiB, ("bios_grub",))
    assert first.type_id == GPT_TYPES["bios_boot"]
    assert p.partition_of("/").type_id == GPT_TYPES["filesystem"]
    assert "boot" not in p.partition_of("/").flags
    assert p.size == p.partitions[-1].end + MiB  # the backup GPT
    assert all(part.role != "bios_boot" for part in plan("plain-bookworm").partitions)


def test_explicit_size_too_small_says_the_numbers() -> None:
    with pytest.raises(P2VError) as caught:
        plan("plain-bookworm", size="1G")
    message = str(caught.value)
    match = re.search(r"target size 1024 MiB is too small: the data needs (\d+) MiB \((.*)\)", message)
    assert match, message
    needed = int(match.group(1))
    assert 1300 < needed < 1500
    assert "swap 511 MiB" in match.group(2) and "/ " in match.group(2)
    assert f"at least {needed}M" in message
    assert plan("plain-bookworm", size=f"{needed}M").size == needed * MiB  # exactly enough is fine


def test_explicit_size_gives_the_rest_to_the_root() -> None:
    p = plan("lvm-bookworm", size="20G")
    assert p.size == 20 << 30
    check_geometry(p)
    auto = plan("lvm-bookworm")
    assert p.partition_of("/boot").size == auto.partition_of("/boot").size
    assert p.partition_of("/").size == (20 << 30) - auto.partition_of("/boot").size - 508 * MiB - MiB


def test_explicit_size_short_of_headroom_is_noted() -> None:
    auto = plan("plain-bookworm")
    p = plan("plain-bookworm", size=f"{(auto.size >> 20) - 300}M")
    assert any(n.startswith("/: about") and "less than the policy's 1024 MiB headroom" in n for n in p.notes)


def test_keep_uuids_reuses_the_sources_and_new_uuids_come_at_completion() -> None:
    lay = layout("dracut-bookworm")
    p = plan(lay, layout="keep", keep_uuids=True)
    for fs in p.filesystems:
        source = next(f for f in lay["filesystems"] if f.get("mountpoint") == fs.mountpoint)
        assert fs.uuid == source["uuid"] and fs.keep_uuid
        if fs.fstype == "xfs":
            assert f"uuid={source['uuid']}" in mkfs_option(fs.mkfs, "-m")
        else:
            assert mkfs_option(fs.mkfs, "-U") == source["uuid"]
    swap = next(part.swap for part in p.partitions if part.swap)
    assert swap.uuid == lay["swaps"][0]["uuid"] and "-U" in swap.mkswap
    boot = next(c for c in p.fstab if c.file == "/boot")
    assert boot.new_spec == "LABEL=boot"  # the source's style, the label kept
    fresh = plan(lay, layout="keep")
    assert all(fs.uuid is None and "-U" not in fs.mkfs for fs in fresh.filesystems)
    root_line = next(c for c in fresh.fstab if c.file == "/")
    assert root_line.new_spec is None
    numbers = {part.number: f"11111111-2222-4333-8444-5555555555{part.number:02d}" for part in fresh.partitions}
    done = fresh.with_uuids(numbers)
    assert done.complete and not fresh.complete
    assert done.filesystem("/").uuid == numbers[fresh.partition_of("/").number]
    assert next(c for c in done.fstab if c.file == "/").new_spec == f"UUID={done.filesystem('/').uuid}"
    assert str(next(c for c in done.fstab if c.vfstype == "swap").new_spec).startswith("UUID=11111111")
    with pytest.raises(P2VError, match="not the kept"):
        p.with_uuids(numbers)


def test_made_differences() -> None:
    p = plan("plain-bookworm", layout="keep")
    srv = p.partition_of("/srv")
    assert srv.filesystem is not None
    features = {k: int(v) for k, v in (f.split("=") for f in srv.filesystem.features)}
    good = {"features": {**features, "isize": 512, "data.bsize": 4096}}
    assert made_differences(srv, {"TYPE": "xfs", "UUID": "x"}, good) == []
    bad = {"features": {**features, "nrext64": 1, "isize": 512}}
    assert made_differences(srv, {"TYPE": "xfs", "UUID": "x"}, bad) == ["xfs nrext64=1 (planned nrext64=0)"]
    root = p.partition_of("/")
    fs = root.filesystem
    assert fs is not None
    found = {"features": [*fs.features, "orphan_file"], "block_size": 4096, "inode_size": 256}
    problems = made_differences(root, {"TYPE": "ext4", "LABEL": "x"}, found)
    assert problems == ["label 'x', planned ''", "features orphan_file not planned, - missing"]


def test_unknown_plan_documents_are_refused() -> None:
    data = plan("plain-bookworm").to_json()
    with pytest.raises(P2VError, match="not a p2v-disk-plan version 1"):
        DiskPlan.from_json({**data, "version": 2})
    with pytest.raises(P2VError, match="unknown field"):
        DiskPlan.from_json({**data, "surprise": 1})


# ---------------------------------------------------------------- the table and the task


def test_render_plan_table() -> None:
    text = render_plan(plan("lvm-bookworm"))
    lines = text.splitlines()
    assert lines[0].startswith("demo: flatten, msdos, ")
    header = next(line for line in lines if line.strip().startswith("SOURCE"))
    assert re.findall(r"[A-Z]+", header) == ["SOURCE", "DEVICE", "TYPE", "USED", "TARGET", "PART", "TYPE", "SIZE",
                                             "COPY"]
    assert re.search(r"^  /boot +disk1p1 +ext4 +58 MiB +-> +/boot +p1 +ext4 +\d+ MiB +blocks$", text, re.M)
    assert re.search(r"^  /var/log +disk2p1 +ext4 +1 MiB +-> +\(into /\) +p3 +files$", text, re.M)
    assert "    / by files: xfs goes by blocks only with its UUID kept (target.keep_uuids: true)" in text
    assert "    /boot by blocks: e2image, then resize2fs grows it to the partition" in text
    assert re.search(r"^  swap +lv:vg_lvmbookworm/swap +swap +-> +swap +p2 +swap +508 MiB$", text, re.M)
    assert re.search(r"^  p3 .* xfs / new UUID$", text, re.M)
    assert "crc=1,finobt=1,rmapbt=0,reflink=1,inobtcount=1,bigtime=1,sparse=1,nrext64=0,ftype=1" in text
    assert "line 6: /var/log (UUID=4a7aba93-86e9-431b-a98b-1d45b68c0f90) removed: merged into /" in text
    assert "- /boot kept separate" in text
    gpt = render_plan(plan("plain-bookworm", label="gpt", swap="file"))
    assert re.search(r"^  p1 +1 MiB \+ +1 MiB +primary +bios +bios_boot \[bios_grub\]$", gpt, re.M)
    assert "/swapfile" in gpt


def test_plan_tasks_and_show_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = [make_spec(workdir=tmp_path / "work")]
    tasks = list(plan_task.plan_tasks(specs))
    assert tasks[0] == {"basename": "plan", "name": None, "doc": "show the target disk plan (writes nothing)"}
    task = tasks[1]
    assert task["name"] == "demo" and task["uptodate"] == [False]
    assert task["file_dep"] == [str(tmp_path / "work" / "layout.json")]
    assert "targets" not in task
    action, args = task["actions"][0]
    failed = action(*args)
    assert failed is not None and "layout.json does not exist" in str(failed)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "layout.json").write_text((LAYOUTS / "plain-bookworm.json").read_text())
    assert action(*args) is None
    out = capsys.readouterr().out
    assert out.startswith("demo: flatten, msdos")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["layout.json"]  # nothing written


def test_label_auto_is_msdos_for_bios_and_gpt_for_uefi() -> None:
    assert plan("plain-bookworm").label == "msdos"
    lay = with_extra_mounts("plain-bookworm", ["/boot/efi"])
    esp = next(f for f in lay["filesystems"] if f.get("mountpoint") == "/boot/efi")
    esp.update(type="vfat", uuid="abcd-1234", label="EFI", features=None)
    lay["mounts"][-1]["fstype"] = "vfat"
    lay["fstab"][-1]["vfstype"] = "vfat"
    lay["boot"]["firmware"] = "uefi"
    uefi = plan(lay)
    assert uefi.label == "gpt" and uefi.policy.label == "gpt"
    # flatten merges /boot into / but keeps the ESP, a vfat partition of its own, and no BIOS boot partition
    assert roles(uefi) == ["/boot/efi", "swap", "/"]
    assert uefi.partition_of("/boot/efi").type_id == GPT_TYPES["esp"]
    assert plan(lay, label="msdos").label == "msdos"  # the spec's explicit choice stands
