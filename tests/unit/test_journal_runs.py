"""The journal's data blocks the block copy discards: all but its superblock, never a mapping block."""

from __future__ import annotations

import pytest

from tasks.lib.copy.blocks import journal_data_runs

pytestmark = pytest.mark.unit

# `debugfs -R "stat <8>"` of a 256 MiB ext4 (1 KiB blocks), as mke2fs made its journal, and after
# resize2fs shrank it to 112 MiB and moved the journal (read on this machine, e2fsprogs 1.47.0).
FRESH = """Inode: 8   Type: regular    Mode:  0600   Flags: 0x80000
Size of extra inode fields: 32
EXTENTS:
(0-8191):114689-122880
"""
MOVED = """Inode: 8   Type: regular    Mode:  0600   Flags: 0x80000
EXTENTS:
(ETB0):58766, (0-179):8013-8192, (180-1456):8964-10240, (1457-3245):24836-26624, (3246-5034):41220-43008,
 (5035-7082):55297-57344, (7083-8190):57604-58711, (8191):58712
"""
# An ext3 journal mapped by indirect blocks.
INDIRECT = """Inode: 8   Type: regular    Mode:  0600   Flags: 0x0
BLOCKS:
(0-11):1000-1011, (IND):1012, (12-1035):1013-2036, (DIND):2037, (IND):2038, (1036-1099):2039-2102
TOTAL: 1103
"""


def test_a_fresh_journal_keeps_its_first_block() -> None:
    assert journal_data_runs(FRESH) == [(114690, 8191)]


def test_a_moved_journal_keeps_its_superblock_and_its_extent_tree_block() -> None:
    runs = journal_data_runs(MOVED)
    assert runs[0] == (8014, 179)  # logical block 0 is 8013, not the tree block listed first
    assert all(not start <= 58766 < start + count for start, count in runs)
    assert all(not start <= 8013 < start + count for start, count in runs)
    assert sum(count for _, count in runs) == 8191


def test_an_indirect_journal_keeps_its_mapping_blocks() -> None:
    runs = journal_data_runs(INDIRECT)
    assert runs == [(1001, 11), (1013, 1024), (2039, 64)]
