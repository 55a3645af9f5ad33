"""The fix planner's parts on snippets: kernel arguments, formats, kernels, commands, the writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.lib.fixes import choose_kernel, service_commands
from tasks.lib.fixes.bootconfig import GrubenvOverflow, rewrite_grubenv
from tasks.lib.fixes.cmdline import CmdlineTarget, rewrite_args
from tasks.lib.fixes.network import drop_netplan_macs, drop_networkd_macs, drop_udev_rules
from tasks.lib.fixes.text import set_shell_var
from tasks.lib.paths import RootTreeReader, remove_in_root, write_text_in_root
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy
from tests.unit.layouts import layout

TARGET = CmdlineTarget(root="UUID=r", root_fstype="ext4", resume="UUID=s", pin_ifnames=True)


def test_rewrite_args_strips_lvm_md_luks_and_keeps_disabling_flags():
    args = ("ro", "root=/dev/mapper/vg-root", "rd.lvm.lv=vg/root", "rd_LVM_LV=vg/swap", "rd.md.uuid=x",
            "rd.luks.uuid=y", "rd_NO_LVM", "rd.lvm=0", "resume=/dev/vg/swap", "console=ttyS1,57600", "quiet")
    assert rewrite_args(args, TARGET, primary=True, set_root=True) == (
        "ro", "root=UUID=r", "rd_NO_LVM", "rd.lvm=0", "resume=UUID=s", "quiet",
        "net.ifnames=0", "biosdevname=0", "console=tty0", "console=ttyS0,115200n8")


def test_rewrite_args_without_swap_drops_resume_and_secondary_lines_only_lose_things():
    no_swap = CmdlineTarget(root="UUID=r", root_fstype="xfs", resume=None, pin_ifnames=False)
    args = ("resume=UUID=old", "resume_offset=1234", "rootfstype=ext4", "console=ttyS0", "splash")
    assert rewrite_args(args, no_swap, primary=False, set_root=False) == ("rootfstype=xfs", "splash")
    # root= is added only where the line must carry it
    assert rewrite_args((), no_swap, primary=False, set_root=True) == ("root=UUID=r",)
    assert rewrite_args(("net.ifnames=1",), TARGET, primary=True, set_root=False)[:2] == (
        "net.ifnames=0", "biosdevname=0")


def test_rewrite_args_is_idempotent():
    once = rewrite_args(("root=/dev/sda1", "console=ttyS0,115200n8", "net.ifnames=0"), TARGET,
                        primary=True, set_root=True)
    assert rewrite_args(once, TARGET, primary=True, set_root=True) == once


def test_grubenv_keeps_its_block_size():
    text = "# GRUB Environment Block\nkernelopts=root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root\nsaved_entry=x\n"
    text += "#" * (1024 - len(text))
    new = rewrite_grubenv(text, TARGET)
    assert new is not None and len(new.encode()) == 1024
    assert "kernelopts=root=UUID=r ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8\n" in new
    assert "saved_entry=x\n" in new
    assert rewrite_grubenv("# GRUB Environment Block\n" + "#" * 999, TARGET) is None
    full = "# GRUB Environment Block\nkernelopts=root=/dev/sda1 " + "x" * 960 + "\n"
    with pytest.raises(GrubenvOverflow) as overflow:
        rewrite_grubenv(full + "#" * (1024 - len(full)), TARGET)
    assert overflow.value.size == 1024 and overflow.value.needed > 1024
    assert overflow.value.kernelopts == ("root=/dev/sda1", "x" * 960)


def test_udev_rules_keep_other_rules_and_go_when_empty():
    rule = 'SUBSYSTEM=="net", ATTR{address}=="%s", NAME="%s"\n'
    text = "# PCI device 0x8086 (igb)\n" + rule % ("52:54:00:00:00:01", "eth0") + 'KERNEL=="sd*", OWNER="disk"\n'
    assert drop_udev_rules(text, {"52:54:00:00:00:01"}) == 'KERNEL=="sd*", OWNER="disk"\n'
    assert drop_udev_rules(rule % ("52:54:00:00:00:01", "eth0"), {"52:54:00:00:00:01"}) is None


def test_networkd_match_by_mac_becomes_match_by_name():
    text = "[Match]\nMACAddress=52:54:00:00:00:01\n\n[Network]\nAddress=192.0.2.5/24\n"
    assert drop_networkd_macs(text, False, "eth0") == (
        "[Match]\nName=eth0\n\n[Network]\nAddress=192.0.2.5/24\n", None)
    new, finding = drop_networkd_macs(text, False, None)
    assert new is not None and "Type=ether" in new and finding
    link = "[Match]\nMACAddress=52:54:00:00:00:01\n\n[Link]\nName=lan0\nMACAddress=02:00:00:00:00:01\n"
    assert drop_networkd_macs(link, True, "lan0") == (None, None)


def test_netplan_without_set_name_is_a_finding_and_no_mac_means_no_change():
    text = "network:\n  ethernets:\n    lan:\n      match:\n        macaddress: 52:54:00:00:00:01\n      dhcp4: true\n"
    new, findings = drop_netplan_macs(text)
    assert "macaddress" not in new and "lan:" in new and findings
    assert drop_netplan_macs("network:\n  ethernets:\n    eth0: {dhcp4: true}\n")[0] == \
        "network:\n  ethernets:\n    eth0: {dhcp4: true}\n"


def test_set_shell_var_leaves_an_equal_value_as_written():
    text = "A='x y'\nB=1\n"
    assert set_shell_var(text, "A", "x y") == text
    assert set_shell_var(text, "A", "z") == 'A="z"\nB=1\n'
    assert set_shell_var(text, "C", "$HOME") == 'A=\'x y\'\nB=1\nC="\\$HOME"\n'


def test_choose_kernel_refuses_a_server_without_virtio():
    lay = layout("plain-bookworm")
    assert choose_kernel(lay) == "6.1.0-50-amd64"
    for kernel in lay["system"]["kernels"]:
        kernel["virtio"]["virtio_blk"] = "missing"
    with pytest.raises(P2VError, match="no installed kernel can boot on virtio") as raised:
        choose_kernel(lay)
    assert raised.value.hint


def test_check_convertible_needs_an_initrd_tool_and_a_bootloader_unless_their_step_is_skipped():
    from tasks.lib.fixes import check_convertible

    lay = layout("plain-bookworm")
    assert check_convertible(lay, FixPolicy()) == "6.1.0-50-amd64"
    lay["system"]["initrd"]["tool"] = None
    lay["system"]["bootloader"]["kind"] = "unknown"
    with pytest.raises(P2VError, match="initrd tool none found"):
        check_convertible(lay, FixPolicy())
    with pytest.raises(P2VError, match="bootloader unknown: p2v configures grub2 and grub legacy only"):
        check_convertible(lay, FixPolicy(skip=("initrd",)))
    assert check_convertible(lay, FixPolicy(skip=("initrd", "bootloader-config"))) == "6.1.0-50-amd64"


def test_service_commands_by_init_system():
    lay = layout("plain-bookworm")
    policy = FixPolicy(remove_services=("hp-health.service",))
    assert service_commands(lay, policy) == [(["systemctl", "disable", "hp-health.service"],
                                              "disabled the hardware-specific service hp-health.service")]
    lay["system"]["os"].update(family="rhel", id="centos", major=6)
    assert service_commands(lay, policy, has_systemd=False)[0][0] == ["chkconfig", "hp-health", "off"]


def test_writer_keeps_mode_and_replaces_atomically(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    target = tmp_path / "etc" / "fstab"
    target.write_text("old\n")
    target.chmod(0o600)
    write_text_in_root(tmp_path, "/etc/fstab", "new\n", mode=0o644)
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path / "etc")) == ["fstab"]  # no temporary file left
    write_text_in_root(tmp_path, "/etc/new/dir/file", "x", mode=0o600)
    assert ((tmp_path / "etc/new/dir/file").stat().st_mode & 0o777) == 0o600


def test_remover_deletes_links_not_their_targets_and_refuses_directories(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "real").write_text("keep")
    (tmp_path / "etc" / "link").symlink_to("/etc/real")
    assert remove_in_root(tmp_path, "/etc/link")
    assert (tmp_path / "etc" / "real").read_text() == "keep"
    assert not remove_in_root(tmp_path, "/etc/link")
    with pytest.raises(P2VError):
        remove_in_root(tmp_path, "/etc")


def test_root_tree_reader_stays_in_the_tree(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("tree hosts")
    (tmp_path / "etc" / "link").symlink_to("../../../../etc/hosts")
    tree = RootTreeReader(tmp_path)
    assert tree.read("/etc/link") == "tree hosts"
    assert tree.exists("/etc/link") and not tree.exists("/etc/passwd")
    assert tree.listdir("/etc") == ["hosts", "link"] and tree.listdir("/nowhere") == []
