"""The suite's clean-up never writes through a mount (a leaked read-only source)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.scratch import LARGE_BYTES, drop_large_files


def test_a_mount_below_is_not_entered(tmp_path: Path) -> None:
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "p2v-scratch-test", str(mounted)], check=True)
    try:
        inside = mounted / "big.img"
        inside.write_bytes(b"\1" * LARGE_BYTES)
        drop_large_files(tmp_path)
        assert inside.exists()
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
