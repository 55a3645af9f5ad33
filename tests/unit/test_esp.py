"""Reading mtools' output and comparing ESP snapshots (pure; the mtools runs are in integration and e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib import esp
from tasks.lib.esp import EspEntry, EspSnapshot
from tasks.lib.runner import P2VError

MDIR_BARE = """::/EFI/
::/empty/
::/.hidden
::/EFI/debian/
::/EFI/BOOT/
::/EFI/debian/grubx64.efi
::/EFI/debian/Mixed Case name.txt
::/EFI/BOOT/BOOTX64.EFI
"""

MATTRIB = """             ::/
             ::/EFI
             ::/EFI/debian
  A  SH      ::/EFI/debian/grubx64.efi
  A     R    ::/EFI/debian/Mixed Case name.txt
             ::/EFI/BOOT
  A          ::/EFI/BOOT/BOOTX64.EFI
"""

MINFO = """device information:
===================
filename="esp.img"
bootsector information
======================
banner:"mkfs.fat"
sector size: 512 bytes
cluster size: 1 sectors
reserved (boot) sectors: 32
fats: 2
max available root directory slots: 0
small size: 0 sectors
big size: 262144 sectors
Big fatlen=2017
Infosector:
free clusters=257818
"""


def test_listing_and_attributes() -> None:
    assert esp.parse_mdir_bare(MDIR_BARE) == {
        "/EFI": "dir", "/empty": "dir", "/.hidden": "file", "/EFI/debian": "dir", "/EFI/BOOT": "dir",
        "/EFI/debian/grubx64.efi": "file", "/EFI/debian/Mixed Case name.txt": "file", "/EFI/BOOT/BOOTX64.EFI": "file"}
    assert esp.parse_mattrib(MATTRIB) == {"/EFI": "", "/EFI/debian": "", "/EFI/debian/grubx64.efi": "HS",
                                          "/EFI/debian/Mixed Case name.txt": "R", "/EFI/BOOT": "",
                                          "/EFI/BOOT/BOOTX64.EFI": ""}


def test_usage_counts_data_clusters_like_statvfs() -> None:
    info = esp.parse_minfo(MINFO)
    assert info["big_size"] == 262144 and info["big_fatlen"] == 2017 and info["cluster_sectors"] == 1
    assert esp.parse_free_bytes(" 4 files   131 078 bytes\n   132 002 816 bytes free\n") == 132002816
    size, used = esp.fat_usage(info, 132002816)
    assert size == (262144 - 32 - 2 * 2017) * 512
    assert used == size - 132002816


def test_differences_name_every_loss() -> None:
    source = EspSnapshot((EspEntry("/EFI", "dir", 0, None, ""), EspEntry("/EFI/a.efi", "file", 3, "aa", "H"),
                          EspEntry("/EFI/b.cfg", "file", 1, "bb", "")))
    assert esp.differences(source, source) == []
    target = EspSnapshot((EspEntry("/EFI", "dir", 0, None, ""), EspEntry("/EFI/a.efi", "file", 3, "cc", ""),
                          EspEntry("/EFI/c", "file", 0, "dd", "")))
    assert esp.differences(source, target) == [
        "/EFI/b.cfg: missing", "/EFI/c: not on the source",
        "/EFI/a.efi: 3 bytes sha256 cc, not 3 bytes sha256 aa", "/EFI/a.efi: attributes -, not H"]
    assert source.digest() != target.digest() and source.files == 2 and source.bytes == 4


def test_local_tree_as_a_snapshot(tmp_path: Path) -> None:
    (tmp_path / "EFI/BOOT").mkdir(parents=True)
    (tmp_path / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ")
    snap = esp.local_entries(tmp_path, {"/EFI/BOOT/BOOTX64.EFI": "R"})
    assert [(e.path, e.kind, e.size, e.attributes) for e in snap.entries] == [
        ("/EFI", "dir", 0, ""), ("/EFI/BOOT", "dir", 0, ""), ("/EFI/BOOT/BOOTX64.EFI", "file", 2, "R")]
    (tmp_path / "EFI/link").symlink_to("BOOT")
    with pytest.raises(P2VError, match="only files and directories"):
        esp.local_entries(tmp_path)
