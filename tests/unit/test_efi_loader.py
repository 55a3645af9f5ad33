"""Planning the UEFI boot chain of the target (pure): which loader goes where, built how."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.lib.fixes import bootloader_install_commands, describe, efi_loader
from tasks.lib.plan import plan_disk
from tasks.lib.runner import P2VError
from tests.unit.fix_layouts import completed_plan, make_spec
from tests.unit.layouts import layout, with_extra_mounts


def uefi_layout(binaries: list[str], boot_separate: bool = True) -> dict[str, Any]:
    """plain-bookworm as if it booted by UEFI: an ESP at /boot/efi and these loaders on it."""
    lay = with_extra_mounts("plain-bookworm", ["/boot/efi"])
    esp = next(f for f in lay["filesystems"] if f.get("mountpoint") == "/boot/efi")
    esp.update(type="vfat", uuid="abcd-1234", label="EFI", features=None, block_size=None, inode_size=None)
    lay["mounts"][-1]["fstype"] = "vfat"
    lay["fstab"][-1]["vfstype"] = "vfat"
    lay["boot"]["firmware"] = "uefi"
    lay["system"]["bootloader"].update(firmware="uefi", efi_binaries=binaries, esp_mountpoint="/boot/efi")
    return lay


def test_debian_unsigned_grub_gets_a_new_core_image_at_its_own_path_and_the_fallback() -> None:
    lay = uefi_layout(["/boot/efi/EFI/debian/grubx64.efi"])
    plan = completed_plan(lay)
    assert plan.label == "gpt"  # target.label auto
    loader = efi_loader(describe(lay), plan)
    assert loader is not None
    assert loader.written == ("/boot/efi/EFI/debian/grubx64.efi", "/boot/efi/EFI/BOOT/BOOTX64.EFI")
    # plain-bookworm's /boot merges into / under flatten: the core image looks for the root, prefix /boot/grub.
    root = plan.filesystem("/").uuid
    assert loader.load_cfg == f"search.fs_uuid {root} root\nset prefix=($root)'/boot/grub'\n"
    argv = [c.argv for c in loader.commands]
    assert argv[0] == ("mkdir", "-p", "/boot/efi/EFI/BOOT", "/boot/efi/EFI/debian", "/boot/grub/x86_64-efi")
    assert argv[1] == ("cp", "-a", "/usr/lib/grub/x86_64-efi/.", "/boot/grub/x86_64-efi/")
    assert loader.commands[2].input == loader.load_cfg
    assert argv[3] == ("grub-mkimage", "-O", "x86_64-efi", "-o", "/boot/efi/EFI/debian/grubx64.efi", "-c",
                       "/run/p2v-grub-efi-load.cfg", "-p", "/boot/grub", "part_gpt", "part_msdos", "ext2",
                       "search_fs_uuid")
    assert argv[4] == ("cp", "/boot/efi/EFI/debian/grubx64.efi", "/boot/efi/EFI/BOOT/BOOTX64.EFI")
    assert "EFI/debian/grubx64.efi and EFI/BOOT/BOOTX64.EFI" in loader.why
    assert [c.argv for c in bootloader_install_commands(lay, plan, "/dev/loop7")] == argv


def test_a_kept_boot_is_searched_for_with_a_prefix_relative_to_it() -> None:
    lay = uefi_layout(["/boot/efi/EFI/debian/grubx64.efi"])
    draft = plan_disk(lay, make_spec(lay["host"], layout="keep"))
    plan = draft.with_uuids({p.number: f"{p.number:08d}-aaaa-4bbb-8ccc-{p.number:012d}" if p.filesystem is None
                             or p.filesystem.fstype != "vfat" else "ABCD-1234" for p in draft.partitions
                             if p.filesystem is not None or p.swap is not None})
    assert plan.filesystem("/boot").mountpoint == "/boot"
    loader = efi_loader(describe(lay), plan)
    assert loader is not None
    assert loader.load_cfg == f"search.fs_uuid {plan.filesystem('/boot').uuid} root\nset prefix=($root)'/grub'\n"


def test_the_esps_own_spelling_of_the_fallback_is_kept() -> None:
    lay = uefi_layout(["/boot/efi/EFI/debian/grubx64.efi", "/boot/efi/EFI/Boot/bootx64.efi"])
    loader = efi_loader(describe(lay), completed_plan(lay))
    assert loader is not None and loader.written[1] == "/boot/efi/EFI/Boot/bootx64.efi"


def test_a_signed_chain_is_kept_and_only_a_missing_fallback_written() -> None:
    shim = ["/boot/efi/EFI/debian/shimx64.efi", "/boot/efi/EFI/debian/grubx64.efi"]
    with_fallback = uefi_layout([*shim, "/boot/efi/EFI/BOOT/BOOTX64.EFI", "/boot/efi/EFI/BOOT/fbx64.efi"])
    assert efi_loader(describe(with_fallback), completed_plan(with_fallback)) is None
    without = uefi_layout(shim)
    loader = efi_loader(describe(without), completed_plan(without))
    assert loader is not None and loader.written == ("/boot/efi/EFI/BOOT/BOOTX64.EFI",)
    assert "signed shim chain is left as it was" in loader.why


def test_uefi_without_an_esp_in_the_plan_is_an_error() -> None:
    lay = layout("plain-bookworm")
    lay["boot"]["firmware"] = "uefi"
    with pytest.raises(P2VError, match="no EFI system partition"):
        efi_loader(describe(lay), completed_plan(lay))
