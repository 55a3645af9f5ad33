"""Which inode table blocks a block copy may discard: read from dumpe2fs as e2fsprogs 1.47 prints it."""

from __future__ import annotations

from tasks.lib.copy.blocks import unused_inode_table_runs

HEADER = "Filesystem features:      has_journal ext_attr flex_bg metadata_csum\nInode size:\t          256\n" \
         "Block size:               4096\nInodes per group:         8192\n"
GROUPS = """\
Group 0: (Blocks 0-32767) csum 0x4844 [ITABLE_ZEROED]
  Primary superblock at 0, Group descriptors at 1-1
  Inode table at 369-880 (+369)
  22081 free blocks, 0 free inodes, 1119 directories
  Free blocks: 10687-32767
  Free inodes:
Group 2: (Blocks 65536-98303) csum 0x7935 [ITABLE_ZEROED]
  Inode table at 1393-1904 (bg #0 + 1393)
  67 free blocks, 8076 free inodes, 57 directories, 6909 unused inodes
Group 3: (Blocks 98304-131071) csum 0xcf05 [INODE_UNINIT, ITABLE_ZEROED]
  Inode table at 1905-2416 (bg #0 + 1905)
  186 free blocks, 8192 free inodes, 0 directories, 8192 unused inodes
Group 4: (Blocks 131072-163839) csum 0x93bc [INODE_UNINIT, ITABLE_ZEROED]
  Inode table at 2417-2928 (bg #0 + 2417)
  10 free blocks, 8192 free inodes, 0 directories, 15 unused inodes
"""


def test_the_unused_end_of_each_table_in_whole_blocks() -> None:
    # Group 0: every inode used. Group 2: 6909 unused = 431 whole blocks of 16 inodes (13 inodes share a block
    # with used ones). Group 3: the whole table. Group 4: 15 unused inodes are less than a block.
    assert unused_inode_table_runs(HEADER + GROUPS) == [(1904 + 1 - 431, 431), (1905, 512)]


def test_a_filesystem_without_group_checksums_gives_nothing() -> None:
    """ext2/ext3 without uninit_bg: dumpe2fs prints no unused count, and every inode may be read."""
    plain = GROUPS.replace(", 6909 unused inodes", "").replace(", 8192 unused inodes", "") \
        .replace(", 15 unused inodes", "")
    assert unused_inode_table_runs(HEADER + plain) == []
    assert unused_inode_table_runs(GROUPS) == []  # no inode or block size read: nothing
