"""The fixture builder's pure parts: descriptions, layout arithmetic, config text, manifest codecs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.fixtures import facts, layout, oddities, system
from tests.fixtures.cache import all_names
from tests.fixtures.description import (
    REST,
    DescriptionError,
    GiB,
    MiB,
    load_description,
    parse_description,
    parse_size,
)


def test_every_description_parses() -> None:
    names = all_names()
    assert {"plain-bookworm", "plain-bullseye", "plain-trixie", "lvm-bookworm"} <= set(names)
    for name in names:
        desc = load_description(name)
        assert desc.name == name
        assert desc.initramfs in desc.install_packages
        for disk in desc.disks:
            planned = layout.plan_partitions(disk)
            assert all(p.start + p.size <= disk.size for p in planned)


def test_lvm_bookworm_is_the_centos_shape() -> None:
    desc = load_description("lvm-bookworm")
    (group,) = desc.volume_groups
    root = next(lv for lv in group.volumes if lv.volume.mount == "/")
    assert (root.volume.fs, root.volume.fstab_source) == ("xfs", "mapper")
    assert desc.disks[0].partitions[1].lvm_pv == group.name


def test_sizes() -> None:
    assert parse_size("256MiB") == 256 * MiB
    assert parse_size("3GiB") == 3 * GiB
    assert parse_size("rest") == REST
    with pytest.raises(ValueError):
        parse_size("3G")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BASE = """
suite: bookworm
hostname: bad
network: [{name: eth0, mac: "52:54:00:00:00:01", address: 192.0.2.9/24}]
"""


@pytest.mark.parametrize(
    ("disks", "message"),
    [
        ("disks: [{size: 1GiB, partitions: [{size: rest, fs: ext4, mount: /}]}]", "/boot"),
        ("disks: [{size: 1GiB, partitions: [{size: rest, fs: ntfs, mount: /}]}]", "partitions[0].fs"),
        (
            "disks: [{size: 1GiB, partitions: [{size: rest, fs: ext4, mount: /boot},"
            " {size: 1MiB, fs: ext4, mount: /}]}]",
            "only the last partition",
        ),
        ("disks: [{size: 1GiB, partitions: [{size: rest, lvm_pv: nope}]}]", "unknown volume group nope"),
        ("disks: [{size: 1GiB, partitions: [{size: rest, lvm_pv: vg, fs: xfs}]}]", "exactly one of fs or lvm_pv"),
        ("disks: [{size: 1GiB, partitions: [{size: rest, fs: ext4, mount: /, extra: 1}]}]", "extra"),
    ],
)
def test_bad_descriptions_say_where(tmp_path: Path, disks: str, message: str) -> None:
    with pytest.raises(DescriptionError, match=re.escape(message)):
        parse_description(_write(tmp_path, BASE + disks))


def test_logical_partitions_sit_in_an_extended_one(tmp_path: Path) -> None:
    desc = parse_description(
        _write(
            tmp_path,
            BASE
            + """
disks:
  - size: 4GiB
    partitions:
      - {size: 256MiB, fs: ext4, mount: /boot, bootable: true}
      - {size: 3GiB, fs: ext4, mount: /}
      - {size: 256MiB, fs: swap, logical: true}
      - {size: rest, fs: xfs, mount: /srv, logical: true}
""",
        )
    )
    planned = layout.plan_partitions(desc.disks[0])
    assert [(p.number, p.type_id) for p in planned] == [(1, "83"), (2, "83"), (3, "5"), (5, "82"), (6, "83")]
    extended = planned[2]
    assert extended.start + extended.size == 4 * GiB
    for previous, logical in itertools.pairwise(planned[3:]):
        assert logical.start >= previous.start + previous.size + layout.ALIGN  # room for the EBR
    assert planned[3].start > extended.start
    script = layout.sfdisk_script(planned, "0x12345678")
    assert "label: dos" in script and "type=5" in script and "bootable" in script


def test_partitions_are_aligned_and_rest_fills_the_disk() -> None:
    desc = load_description("plain-bookworm")
    planned = layout.plan_partitions(desc.disks[0])
    assert all(p.start % layout.ALIGN == 0 for p in planned)
    assert planned[-1].start + planned[-1].size == desc.disks[0].size
    assert layout.disk_identifier("x", 1) == layout.disk_identifier("x", 1) != layout.disk_identifier("x", 2)


def test_lv_offsets() -> None:
    assert layout.parse_pe_ranges("/dev/loop3p2:0-639") == ("/dev/loop3p2", 0, 640)
    assert layout.parse_pe_ranges("/dev/loop3p2:640-766\n") == ("/dev/loop3p2", 640, 127)
    with pytest.raises(ValueError):
        layout.parse_pe_ranges("/dev/a:0-1 /dev/b:0-1")
    segment = layout.Segment(lv_start_extent=0, pv_start_extent=640, extents=127)
    offset, size = layout.lv_byte_range(512 * MiB + MiB, MiB, 4 * MiB, segment)
    assert offset == 513 * MiB + MiB + 640 * 4 * MiB
    assert size == 127 * 4 * MiB
    assert layout.lv_size_argument(REST) == ["--extents", "100%FREE"]
    assert layout.lv_size_argument(2 * GiB) == ["--size", "2048m"]


def test_grub_defaults_are_rewritten_in_place() -> None:
    text = 'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n#GRUB_TERMINAL=console\nOTHER=1\n'
    out = system.set_shell_variables(text, {"GRUB_TIMEOUT": "1", "GRUB_TERMINAL": "console serial", "NEW": "a b"})
    assert out.splitlines() == [
        "GRUB_TIMEOUT=1",
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet"',
        "GRUB_TERMINAL='console serial'",
        "OTHER=1",
        "NEW='a b'",
    ]


def test_kernel_root_is_pinned() -> None:
    cfg = (
        "menuentry 'Debian' {\n"
        "\tlinux\t/vmlinuz-6.1.0-50-amd64 root=/dev/loop0p2 ro console=ttyS0,115200n8\n"
        "}\n"
        "\t\tlinux\t/vmlinuz-6.1.0-50-amd64 root=/dev/loop0p2 ro single\n"
    )
    fixed = system.pin_kernel_root(cfg, "UUID=abc")
    assert "loop" not in fixed
    assert fixed.count("root=UUID=abc ro") == 2
    with pytest.raises(Exception, match="no `linux"):
        system.pin_kernel_root("menuentry {}\n", "UUID=abc")


def test_config_texts() -> None:
    desc = load_description("plain-bookworm")
    interfaces = system.interfaces_text(desc.interfaces)
    assert "iface eth0 inet static" in interfaces and "address 192.0.2.12/24" in interfaces
    rules = system.udev_net_rules_text(desc.interfaces)
    assert 'ATTR{address}=="52:54:00:a0:00:12"' in rules and 'NAME="eth0"' in rules
    fstab = system.fstab_text([system.FstabEntry("UUID=x", "/", "ext4", "errors=remount-ro", 1)])
    assert fstab.endswith("UUID=x / ext4 errors=remount-ro 0 1\n")
    assert system.fsck_pass("xfs", "/") == 0 and system.fsck_pass("ext4", "/srv") == 2
    assert "192.0.2.12\tplain-bookworm.p2v.example\tplain-bookworm" in system.hosts_text("plain-bookworm", "192.0.2.12")


def test_acl_codec_round_trips() -> None:
    text = "user::rw-,user:4242:rw-,group::r--,group:4343:r--,mask::rw-,other::r--"
    assert oddities.acl_from_xattr(oddities.acl_to_xattr(text)) == text
    assert oddities.printable(b"caf\xe9\nx") == "caf\\xe9\\nx"


def test_feature_parsers() -> None:
    xfs = facts.parse_xfs_info(
        "meta-data=/dev/loop1p1         isize=512    agcount=4, agsize=65472 blks\n"
        "         =                       crc=1        finobt=1, sparse=1, rmapbt=0\n"
        "         =                       reflink=1    bigtime=1 inobtcount=1\n"
        "data     =                       bsize=4096   blocks=261888, imaxpct=25\n"
        "naming   =version 2              bsize=4096   ascii-ci=0, ftype=1\n"
        "log      =internal log           bsize=4096   blocks=16384, version=2\n"
    )
    assert xfs["meta-data.crc"] == "1" and xfs["meta-data.bigtime"] == "1"
    assert xfs["data.bsize"] == "4096" and xfs["data.blocks"] == "261888" and xfs["naming.ftype"] == "1"
    ext = facts.parse_tune2fs(
        "Filesystem features:      has_journal ext_attr needs_recovery extent 64bit\nBlock size:               4096\n"
    )
    assert ext == {"features": ["has_journal", "ext_attr", "extent", "64bit"], "block_size": 4096}
    assert facts.grub_cmdline("\tlinux\t/vmlinuz-1 root=UUID=a ro quiet\n") == "root=UUID=a ro quiet"
    release = facts.parse_os_release('ID=debian\nVERSION_ID="12"\n# c\n')
    assert release == {"ID": "debian", "VERSION_ID": "12"}
