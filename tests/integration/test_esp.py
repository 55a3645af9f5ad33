"""The ESP read and written by mtools on real FAT filesystems, through loop devices (no vfat mount)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.lib import esp
from tasks.lib.resources import loop_device
from tasks.lib.runner import P2VError, run
from tests.fixtures.cache import sha256


def fat_image(path: Path, size_mib: int = 64) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size_mib << 20)
    run(["mkfs.fat", "-F", "32", "-n", "EFI", str(path)])
    return path


def tree(root: Path) -> Path:
    (root / "EFI/debian").mkdir(parents=True)
    (root / "EFI/Empty Dir").mkdir()
    (root / "EFI/debian/grubx64.efi").write_bytes(os.urandom(300_000))
    (root / "EFI/debian/BOOTX64.CSV").write_bytes("shimx64.efi,debian,,\n".encode("utf-16-le"))
    (root / "startup.nsh").write_text("fs0:\\EFI\\debian\\grubx64.efi\n")
    return root


def test_copy_from_a_read_only_source_is_complete_and_the_source_unchanged(tmp_path: Path) -> None:
    source_image, target_image = fat_image(tmp_path / "source.img"), fat_image(tmp_path / "target.img")
    with loop_device(source_image, read_only=False) as loop:
        esp.write_tree(loop.path, tree(tmp_path / "files"), before=esp.EMPTY,
                       attributes_of={"/EFI/debian/grubx64.efi": "HS", "/startup.nsh": "R"}, scratch=tmp_path)
    before = sha256(source_image)
    with loop_device(source_image, read_only=True) as source, loop_device(target_image, read_only=False) as target:
        receipt = esp.copy_esp(source.path, target.path, tmp_path)
        assert receipt["verified"] and receipt["files"] == 3 and receipt["changed_entries"] == 6
        copied = esp.snapshot(target.path, tmp_path)
        assert esp.differences(esp.snapshot(source.path, tmp_path), copied) == []
        assert copied.by_path["/EFI/debian/grubx64.efi"].attributes == "HS"
        assert copied.by_path["/startup.nsh"].attributes == "R"
        again = esp.copy_esp(source.path, target.path, tmp_path)  # a rerun writes nothing
        assert again["changed_entries"] == 0 and again["digest"] == receipt["digest"]
    assert sha256(source_image) == before
    size, used = esp.usage(str(target_image))
    assert 60 << 20 < size < 64 << 20 and 300_000 < used < 400_000


def test_working_copy_is_written_back_only_on_success(tmp_path: Path) -> None:
    image = fat_image(tmp_path / "esp.img")
    point = tmp_path / "view"
    point.mkdir()
    with loop_device(image, read_only=False) as loop:
        esp.write_tree(loop.path, tree(tmp_path / "files"), before=esp.EMPTY,
                       attributes_of={"/startup.nsh": "R"}, scratch=tmp_path)
        first = esp.snapshot(loop.path, tmp_path)
        with pytest.raises(RuntimeError), esp.esp_working_copy(loop.path, point, tmp_path) as view:
            (view / "EFI/BOOT").mkdir()
            (view / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ")
            raise RuntimeError("a fix step failed")
        assert esp.snapshot(loop.path, tmp_path) == first
        with esp.esp_working_copy(loop.path, point, tmp_path) as view:
            (view / "EFI/BOOT").mkdir()
            (view / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ")
            (view / "startup.nsh").unlink()  # read-only on FAT: cleared before it goes
            (view / "EFI/debian/BOOTX64.CSV").write_text("changed")
        after = esp.snapshot(loop.path, tmp_path).by_path
    assert after["/EFI/BOOT/BOOTX64.EFI"].size == 2 and "/startup.nsh" not in after
    assert after["/EFI/debian/BOOTX64.CSV"].size == 7
    assert after["/EFI/debian/grubx64.efi"] == first.by_path["/EFI/debian/grubx64.efi"]
    assert not os.path.ismount(point)


def test_a_view_is_read_only_and_a_symlink_cannot_go_to_fat(tmp_path: Path) -> None:
    image = fat_image(tmp_path / "esp.img")
    point = tmp_path / "view"
    point.mkdir()
    with loop_device(image, read_only=True) as loop:
        assert esp.listing(loop.path) == {}
        with esp.esp_view(loop.path, point) as view, pytest.raises(OSError):
            (view / "x").write_text("no")
    with loop_device(image, read_only=False) as loop, esp.esp_working_copy(loop.path, point, tmp_path) as view:
        (view / "link").symlink_to("nowhere")
        with pytest.raises(P2VError, match="only files and directories"):
            esp.write_tree(loop.path, view, before=esp.EMPTY, attributes_of={}, scratch=tmp_path)
        (view / "link").unlink()
