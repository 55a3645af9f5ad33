"""Pure parts of inspection: fstab, device resolution, root choice, LV offsets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.inspect import Discovery, plan_mounts
from tasks.lib.fstab import mount_order, parse_fstab, skip_reason
from tasks.lib.paths import read_text_in_root, resolve_in_root
from tasks.lib.runner import P2VError
from tasks.lib.source.roots import choose_root, resolve_fstab_source
from tasks.lib.storage import group_md_members, linear_lv_extent

CENTOS7_FSTAB = """\
#
# /etc/fstab
# Created by anaconda on Tue Mar  3 10:00:00 2020
#
/dev/mapper/centos-root /                       xfs     defaults        0 0
UUID=0b3c4d5e-aaaa-bbbb-cccc-0123456789ab /boot                   xfs     defaults        0 0
/dev/mapper/centos-swap swap                    swap    defaults        0 0
LABEL=data /srv/my\\040data ext4 defaults,nofail 1 2
nas:/export/home /home nfs defaults,_netdev 0 0
/srv/a /var/a none bind 0 0
tmpfs /dev/shm tmpfs defaults 0 0
/swapfile none swap sw 0 0
/dev/sr0 /media/cdrom iso9660 noauto,ro 0 0
"""

PROBES = {
    "disk1p1": {"TYPE": "xfs", "UUID": "0b3c4d5e-aaaa-bbbb-cccc-0123456789ab", "USAGE": "filesystem"},
    "disk1p2": {"TYPE": "LVM2_member", "UUID": "pv-uuid"},
    "lv:centos/root": {"TYPE": "xfs", "UUID": "1111", "USAGE": "filesystem"},
    "lv:centos/swap": {"TYPE": "swap", "UUID": "2222"},
    "disk2p1": {"TYPE": "ext4", "UUID": "3333", "LABEL": "data", "USAGE": "filesystem"},
}
LVS = [{"vg": "centos", "name": "root", "device": "lv:centos/root"},
       {"vg": "centos", "name": "swap", "device": "lv:centos/swap"}]


def test_parse_fstab_keeps_every_field_and_unescapes_paths() -> None:
    entries, warnings = parse_fstab(CENTOS7_FSTAB + "broken-line\n")
    assert [e.file for e in entries][:4] == ["/", "/boot", "swap", "/srv/my data"]
    assert entries[3].options == ("defaults", "nofail") and entries[3].passno == 2
    assert warnings == ["fstab line 14: too few fields, ignored: 'broken-line'"]


def test_skip_reasons() -> None:
    entries, _ = parse_fstab(CENTOS7_FSTAB)
    reasons = {e.file: skip_reason(e) for e in entries}
    assert reasons["/"] is None and reasons["swap"] is None
    assert reasons["/home"] == "network filesystem"
    assert reasons["/var/a"] == "bind mount"
    assert reasons["/dev/shm"] == "pseudo filesystem"
    assert reasons["/media/cdrom"] == "noauto"


@pytest.mark.parametrize(("spec", "device"), [
    ("/dev/mapper/centos-root", "lv:centos/root"),
    ("/dev/centos/swap", "lv:centos/swap"),
    ("UUID=0B3C4D5E-AAAA-BBBB-CCCC-0123456789AB", "disk1p1"),
    ("LABEL=data", "disk2p1"),
    ("/dev/sdb1", "disk2p1"),
    ("/dev/hda1", "disk1p1"),
    ("/dev/cciss/c0d1p1", "disk2p1"),
    ("UUID=pv-uuid", None),  # a PV is never a mount source
    ("UUID=nope", None),
])
def test_resolve_fstab_source(spec: str, device: str | None) -> None:
    (entry,), _ = parse_fstab(f"{spec} /x ext4 defaults 0 0\n")
    got = resolve_fstab_source(entry, PROBES, ["/img/a", "/img/b"], LVS, [])
    assert got.device == device


def test_live_device_names_resolve_through_the_spec() -> None:
    (entry,), _ = parse_fstab("/dev/sdc1 /x ext4 defaults 0 0\n")
    assert resolve_fstab_source(entry, PROBES, ["/dev/sdc", "/dev/sdd"], LVS, []).device == "disk1p1"


def test_mapper_names_double_dashes() -> None:
    (entry,), _ = parse_fstab("/dev/mapper/vg--data-lv--home /home ext4 defaults 0 0\n")
    lvs = [{"vg": "vg-data", "name": "lv-home", "device": "lv:vg-data/lv-home"}]
    assert resolve_fstab_source(entry, {}, [], lvs, []).device == "lv:vg-data/lv-home"


def test_choose_root() -> None:
    assert choose_root(["disk1p2"], PROBES, None, "specs/x.yaml") == "disk1p2"
    with pytest.raises(P2VError, match="no root filesystem found"):
        choose_root([], PROBES, None, "specs/x.yaml")
    with pytest.raises(P2VError, match=r"several root filesystems found: .*source.root: UUID="):
        choose_root(["disk1p1", "disk2p1"], PROBES, None, "specs/x.yaml")
    assert choose_root(["disk1p1", "disk2p1"], PROBES, "UUID=3333", "specs/x.yaml") == "disk2p1"
    assert choose_root(["disk1p1", "disk2p1"], PROBES, "LABEL=data", "specs/x.yaml") == "disk2p1"
    with pytest.raises(P2VError, match=r"specs/x.yaml: source.root: UUID=9 is not one of"):
        choose_root(["disk1p1", "disk2p1"], PROBES, "UUID=9", "specs/x.yaml")


def _discovery() -> Discovery:
    return Discovery(disks=[{"source": "/img/a"}, {"source": "/img/b"}], probes=PROBES,
                     lvm={"lvs": LVS}, md_arrays=[])


FILESYSTEMS = {name: {"type": info["TYPE"]} for name, info in PROBES.items() if info.get("USAGE") == "filesystem"}


def test_plan_mounts_orders_and_records_what_it_skips() -> None:
    entries, _ = parse_fstab(CENTOS7_FSTAB)
    records, mounts = plan_mounts(entries, _discovery(), "lv:centos/root", FILESYSTEMS)
    assert [m["mountpoint"] for m in mounts] == ["/", "/boot", "/srv/my data"]
    statuses = {r["file"]: r["status"] for r in records}
    assert statuses == {"/": "mounted", "/boot": "mounted", "swap": "swap", "/srv/my data": "mounted",
                        "/home": "skipped", "/var/a": "skipped", "/dev/shm": "skipped", "/media/cdrom": "skipped",
                        "none": "swapfile"}


def test_missing_device_is_an_error_unless_nofail() -> None:
    entries, _ = parse_fstab("/dev/mapper/centos-root / xfs defaults 0 0\nUUID=gone /opt ext4 defaults 0 2\n")
    with pytest.raises(P2VError, match=r"fstab line 2: UUID=gone \(/opt\) matches no device on the source disks"):
        plan_mounts(entries, _discovery(), "lv:centos/root", FILESYSTEMS)
    entries, _ = parse_fstab("/dev/mapper/centos-root / xfs defaults 0 0\nUUID=gone /opt ext4 nofail 0 2\n")
    records, mounts = plan_mounts(entries, _discovery(), "lv:centos/root", FILESYSTEMS)
    assert [m["mountpoint"] for m in mounts] == ["/"]
    assert records[1]["status"] == "unresolved"


def test_mount_order_parents_first() -> None:
    assert mount_order(["/var/log", "/", "/var", "/boot", "/var/log/audit"]) == [
        "/", "/boot", "/var", "/var/log", "/var/log/audit"]


LVM = {
    "pvs": [{"device": "disk1p2", "pe_start": 1 << 20}],
    "vgs": [{"name": "vg", "extent_size": 4 << 20}],
}


def test_linear_lv_offset() -> None:
    lv = {"vg": "vg", "name": "root", "segments": [
        {"type": "linear", "start_extent": 0, "extents": 25, "pv_ranges": [{"pv": "disk1p2", "first_extent": 10}]}]}
    assert linear_lv_extent(lv, LVM) == ("disk1p2", (1 << 20) + 10 * (4 << 20), 25 * (4 << 20))


def test_lv_types_without_fallback_name_what_is_missing() -> None:
    thin = {"vg": "vg", "name": "pool", "segments": [{"type": "thin", "pv_ranges": []}]}
    with pytest.raises(P2VError, match="LV vg/pool has segment type thin; reading it needs device-mapper"):
        linear_lv_extent(thin, LVM)
    split = {"vg": "vg", "name": "big", "segments": [
        {"type": "linear", "extents": 1, "pv_ranges": [{"pv": "disk1p2", "first_extent": 0}]},
        {"type": "linear", "extents": 1, "pv_ranges": [{"pv": "disk1p2", "first_extent": 5}]}]}
    with pytest.raises(P2VError, match="spread over 2 extent ranges"):
        linear_lv_extent(split, LVM)


def test_md_members_group_into_arrays() -> None:
    member = {"uuid": "u1", "name": "0", "level": "raid1", "metadata": "1.2", "data_offset": 2 << 20,
              "array_size": 100 << 20, "devices": 2}
    arrays = group_md_members({"disk2p1": member, "disk1p1": member})
    assert len(arrays) == 1
    assert arrays[0]["members"] == ["disk1p1", "disk2p1"] and arrays[0]["device"] == "md:0"


def test_resolve_in_root_never_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.conf").write_text("inside")
    os.symlink("/boot/grub/grub.conf", root / "etc" / "grub.conf")
    os.symlink("../../../../../../etc/passwd", root / "etc" / "escape")
    os.symlink("/etc/hostname", root / "etc" / "hostname")
    assert resolve_in_root(root, "/etc/grub.conf") == root / "boot" / "grub" / "grub.conf"
    assert read_text_in_root(root, "/etc/grub.conf") == "inside"
    assert resolve_in_root(root, "/etc/escape") == root / "etc" / "passwd"
    assert read_text_in_root(root, "/etc/escape") is None
    assert read_text_in_root(root, "/etc/hostname") is None  # a loop to itself, inside the root
    assert resolve_in_root(root, "/../../etc") == root / "etc"


# ---------------------------------------------------------------- recorded layouts, recovery


def test_recorded_layouts_are_current_and_match_the_schema() -> None:
    import json

    import jsonschema

    from tasks.inspect import LAYOUT_VERSION
    from tasks.lib.spec import PROJECT_DIR
    from tests.unit.layouts import LAYOUTS, layout

    schema = json.loads((PROJECT_DIR / "tasks" / "schemas" / "layout.schema.json").read_text())
    names = sorted(path.stem for path in LAYOUTS.glob("*.json"))
    assert names
    for name in names:
        recorded = layout(name)
        assert recorded["version"] == LAYOUT_VERSION, name
        jsonschema.Draft202012Validator(schema).validate(recorded)


def test_a_filesystem_that_needed_recovery_is_a_note_for_later() -> None:
    from tasks.inspect import later_work
    from tests.unit.layouts import layout

    recorded = layout("plain-bookworm")
    assert not [note for note in later_work(recorded) if "shut down" in note]
    for fs in recorded["filesystems"]:
        fs["needs_recovery"] = fs.get("mountpoint") == "/srv"
    assert [note for note in later_work(recorded) if "shut down" in note] == [
        "disk2p1 (/srv, xfs) was not shut down cleanly: inspect read it with its journal replayed in a throw-away "
        "overlay"]


@pytest.mark.parametrize(("features", "expected"), [
    ("has_journal ext_attr needs_recovery extent", True),
    ("has_journal ext_attr extent", False),
    ("", False),
])
def test_ext_needs_recovery_reads_the_feature_list(features: str, expected: bool) -> None:
    from tasks.lib.storage import ext_needs_recovery

    assert ext_needs_recovery({"Filesystem features": features, "Filesystem state": "clean"}) is expected


def test_xfs_log_is_clean_only_at_a_clean_unmount_record() -> None:
    from tasks.lib.storage import xfs_log_is_clean

    assert xfs_log_is_clean("log tail: 21 head: 21 state: <CLEAN>")
    assert not xfs_log_is_clean("log tail: 2 head: 11 state: <DIRTY>")


def _table(kind: str, *parts: tuple[int, int, int, str]) -> dict[str, object]:
    return {"type": kind, "partitions": [{"number": n, "start": start, "size": size, "type": t}
                                         for n, start, size, t in parts]}


def test_table_problems_are_found_before_the_kernel_reads_the_table() -> None:
    from tasks.lib.storage import table_problem

    mib = 1 << 20
    sound = _table("msdos", (1, mib, 10 * mib, "5"), (5, 2 * mib, 4 * mib, "83"), (6, 7 * mib, 4 * mib, "83"))
    assert table_problem("disk1", sound, 32 * mib) is None  # logical partitions inside the extended one
    assert table_problem("disk1", None, 32 * mib) is None
    overlap = _table("msdos", (1, mib, 10 * mib, "83"), (2, 5 * mib, 10 * mib, "83"))
    assert "partitions 1 and 2 overlap" in str(table_problem("disk1", overlap, 32 * mib))
    past = _table("gpt", (1, mib, 40 * mib, "0fc63daf-8483-4772-8e79-3d69d8477de4"))
    assert "partition 1 ends at byte 42991616, past the end" in str(table_problem("disk1", past, 32 * mib))
    protective = _table("msdos", (1, 512, 32 * mib - 512, "ee"))
    assert "its GPT is damaged" in str(table_problem("disk1", protective, 32 * mib))
    assert "4096-byte sectors" in str(table_problem("disk1", protective, 32 * mib, gpt_at_4096=True))
    short = table_problem("disk1", past, 32 * mib, gpt_disk_size=48 * mib)
    assert "is cut short: its GPT says the disk has 50331648 bytes" in str(short)


def test_no_root_says_what_the_disks_hold_and_what_to_do() -> None:
    probes = {"disk1": {}, "disk2p1": {"TYPE": "crypto_LUKS", "USAGE": "crypto"},
              "disk2p2": {"TYPE": "swap", "USAGE": "other"}}
    with pytest.raises(P2VError) as caught:
        choose_root([], probes, None, "specs/x.yaml")
    assert str(caught.value).startswith("no root filesystem found: disk1 holds nothing p2v recognises; "
                                        "disk2p1 crypto_LUKS (encrypted); disk2p2 swap; none holds etc/fstab")
    assert "decrypt the server's disks first" in str(caught.value)
    zfs = {"disk1": {"PTTYPE": "dos"}, "disk1p1": {"TYPE": "zfs_member", "USAGE": "raid"}}
    with pytest.raises(P2VError, match=r"disk1p1 zfs_member \(p2v cannot read it\).*must move to ext4 or xfs"):
        choose_root([], zfs, None, "specs/x.yaml")


def test_looks_like_root_never_follows_a_link_out_of_the_tree(tmp_path: Path) -> None:
    from tasks.lib.source.roots import looks_like_root

    (tmp_path / "usr" / "local" / "etc").mkdir(parents=True)
    (tmp_path / "usr" / "local" / "etc" / "fstab").write_text("UUID=1 / ext4 defaults 0 1\n")
    (tmp_path / "usr" / "local" / "etc" / "debian_version").write_text("12.5\n")
    (tmp_path / "etc").symlink_to("/usr/local/etc")  # absolute: on this machine it names its own
    assert looks_like_root(tmp_path)
    (tmp_path / "usr" / "local" / "etc" / "debian_version").unlink()
    assert not looks_like_root(tmp_path)
