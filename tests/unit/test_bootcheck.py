"""The qemu command line of a boot check (pure); booting itself is e2e."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib.bootcheck import (
    OVMF_CODE,
    BootConfig,
    KernelBootConfig,
    boot_check,
    clean_serial_text,
    kernel_qemu_argv,
    qemu_argv,
    serial_failures,
    tagged_output,
)
from tasks.lib.runner import P2VError


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "disk1.img"
    raw.write_bytes(b"\0" * 1024)
    qcow = tmp_path / "disk2.qcow2"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 1020)
    return raw, qcow


def test_always_tcg_snapshot_and_restricted_network(disks: tuple[Path, Path]) -> None:
    argv = qemu_argv(BootConfig(disks=disks))
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-smp") + 1] == "1"
    assert "kvm" not in joined
    assert "-snapshot" in argv
    assert "user,id=net0,restrict=on" in argv


def test_source_servers_boot_on_ide_and_e1000_with_their_mac(disks: tuple[Path, Path]) -> None:
    argv = qemu_argv(BootConfig(disks=disks, disk_bus="ide", nic_model="e1000", mac="52:54:00:aa:bb:cc"))
    assert argv[argv.index("-machine") + 1] == "pc"
    assert f"file={disks[0]},format=raw,if=ide,index=0,media=disk" in argv
    assert f"file={disks[1]},format=qcow2,if=ide,index=1,media=disk" in argv
    assert "e1000,netdev=net0,mac=52:54:00:aa:bb:cc" in argv


def test_converted_images_boot_on_virtio(disks: tuple[Path, Path]) -> None:
    argv = qemu_argv(BootConfig(disks=disks[:1], disk_bus="virtio", nic_model="virtio"))
    assert argv[argv.index("-machine") + 1] == "q35"
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert "virtio-net-pci,netdev=net0" in argv
    assert not any("if=ide" in arg for arg in argv)


def test_sata_uses_ahci(disks: tuple[Path, Path]) -> None:
    argv = qemu_argv(BootConfig(disks=disks, disk_bus="sata"))
    assert "ahci,id=ahci" in argv
    assert "ide-hd,drive=disk1,bus=ahci.1" in argv


def test_missing_disk_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(P2VError, match=r"disk image .*nope.img does not exist"):
        boot_check([tmp_path / "nope.img"], [])


def test_serial_text_loses_escape_codes() -> None:
    assert clean_serial_text(b"\x1b[0;32m  OK  \x1b[0m login:\r\n") == "  OK   login:\n"
    assert clean_serial_text(b"\x1bM[ TIME ] Timed out\x1b7\x1b8\n") == "[ TIME ] Timed out\n"


def test_a_boot_stuck_in_a_rescue_shell_is_recognised() -> None:
    from tasks.lib.bootcheck import _STUCK

    assert _STUCK.search(b"Enter 'help' for a list of built-in commands.\r\n\r\n(initramfs) \x1b[6n")
    assert _STUCK.search(b"You are in emergency mode. After logging in, type ...")
    assert _STUCK.search(b"dracut:/# ")
    assert not _STUCK.search(b"Debian GNU/Linux 12 plain-bookworm ttyS0\r\n\r\nplain-bookworm login: ")


def test_a_rescue_shell_names_what_failed_first_from_anywhere_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"[  OK  ] Reached target local-fs-pre.target\r\n"
                    b"[  41.2] ata2.00: exception Emask 0x0 SAct 0x0 SErr 0x0 action 0x6 frozen\r\n"
                    b"[\x1b[0;1;31mFAILED\x1b[0m] Failed to mount home.mount - /home.\r\n"
                    b"[\x1b[0;1;33mDEPEND\x1b[0m] Dependency failed for local-fs.target\r\n"
                    + b"[  OK  ] Started something.\r\n" * 100
                    + b"You are in emergency mode.\r\n")
    assert serial_failures(log) == [
        "[  41.2] ata2.00: exception Emask 0x0 SAct 0x0 SErr 0x0 action 0x6 frozen",
        "[FAILED] Failed to mount home.mount - /home.",
        "[DEPEND] Dependency failed for local-fs.target",
    ]
    assert serial_failures(tmp_path / "absent.log") == []
    log.write_bytes(b"[  OK  ] Started everything.\r\nlogin: ")
    assert serial_failures(log) == []


def test_the_machine_can_be_chosen(disks: tuple[Path, Path]) -> None:
    argv = qemu_argv(BootConfig(disks=disks[:1], disk_bus="virtio", nic_model="virtio", machine="pc"))
    assert argv[argv.index("-machine") + 1] == "pc"
    assert not any("pflash" in arg for arg in argv)
    with pytest.raises(P2VError, match="IDE disk needs the pc machine"):
        qemu_argv(BootConfig(disks=disks[:1], disk_bus="ide", machine="q35"))


def test_uefi_boots_ovmf_read_only_with_a_varstore_of_its_own(disks: tuple[Path, Path], tmp_path: Path) -> None:
    varstore = tmp_path / "vars.fd"
    argv = qemu_argv(BootConfig(disks=disks[:1], disk_bus="virtio", machine="q35", firmware="uefi",
                                varstore=varstore))
    assert argv[argv.index("-machine") + 1] == "q35"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in argv
    assert f"if=pflash,format=raw,unit=1,file={varstore}" in argv
    with pytest.raises(P2VError, match="needs a variable store"):
        qemu_argv(BootConfig(disks=disks[:1], firmware="uefi"))


def test_a_kernel_boot_starts_qemu_as_a_disk_boot_does(disks: tuple[Path, Path]) -> None:
    # Same machine, TCG, console on stdio, writes only into qemu's snapshot.
    disk_boot = qemu_argv(BootConfig(disks=disks[:1], disk_bus="virtio", memory_mib=2048))
    kernel_boot = kernel_qemu_argv(KernelBootConfig(kernel=disks[0], initrd=disks[0], append="quiet"))
    head = disk_boot[:disk_boot.index("chardev:serial0") + 1]
    assert kernel_boot[:len(head)] == head
    assert kernel_boot[len(head):len(head) + 6] == ["-kernel", str(disks[0]), "-initrd", str(disks[0]),
                                                   "-append", "quiet"]


def test_a_commands_output_leaves_out_what_the_console_printed_in_between() -> None:
    """virt-v2v's first-boot service writes its apt output on the console while a check runs (seen in
    bench.peers: the root-virtio check read a firstboot.sh line as its answer)."""
    raw = (b"P2V| /dev/vda2\r\n"
           b"[  406.561156] firstboot.sh[421]: Ign:3 http://deb.debian.org/debian bookworm/main\r\n"
           b"P2V| \r\n"
           b"P2V| /sys/bus/virtio/drivers/virtio_blk\r\n"
           b"\x1b[0;32m  OK  \x1b[0m] Finished a unit.\r\n"
           b"P2V| ")
    assert tagged_output(raw) == "/dev/vda2\n\n/sys/bus/virtio/drivers/virtio_blk"


def test_output_without_a_final_newline_is_kept_from_the_end_markers_line() -> None:
    assert tagged_output(b"P2V| first\r\nP2V| running") == "first\nrunning"
    assert tagged_output(b"P2V| ") == ""
    assert tagged_output(b"") == ""


def test_a_line_written_after_systemds_status_erase_is_read_as_shown() -> None:
    """The hostname check of dracut-bookworm read '' in the empty-cache run of 9e4a9f5: systemd had erased its
    status line (return, blanks, return) just before the command's tagged line."""
    raw = b"\r" + b" " * 60 + b"\rP2V| dracut-bookworm\r\r\nP2V| ==P2V-END 0==\r\r\n"
    assert tagged_output(raw) == "dracut-bookworm\n==P2V-END 0=="
    assert clean_serial_text(b"progress 10%\rprogress 100%\r\n") == "progress 100%\n"
    assert clean_serial_text(b"a long status line\rshort\n") == "shortg status line\n"


def test_a_prompt_is_found_with_the_consoles_messages_after_it() -> None:
    """A verify boot of plain-bullseye (run of 0d912ad) waited out its timeout at this login prompt:
    kvm's messages came in the same read, so the prompt was not the end of the text."""
    from tasks.lib.bootcheck import _LOGIN_PROMPT, _PROMPT
    seen = b"Debian GNU/Linux 11 plain-bullseye ttyS0\r\r\n\r\r\nplain-bullseye login: [   69.072585] kvm: Nested"
    assert _LOGIN_PROMPT.search(seen)
    assert _LOGIN_PROMPT.search(b"plain-bullseye login: ")
    assert _LOGIN_PROMPT.search(b"host login: \x1b[0;32m  OK  \x1b[0m] Started")
    assert _LOGIN_PROMPT.search(b"host login: \r" + b" " * 40 + b"\r")
    assert not _LOGIN_PROMPT.search(b"host login: root (automatic login)\r\r\n")
    assert _PROMPT.search(b"root@plain-bullseye:~# [   70.1] audit: type=1400")
    assert _PROMPT.search(b"root@plain-bullseye:~# ")
    assert not _PROMPT.search(b"##########\r\r\nWelcome to a hardened server\r\r\n")
