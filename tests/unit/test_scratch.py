"""The suite's clean-up of big files: images go, logs and links stay."""

from __future__ import annotations

from pathlib import Path

from tests.scratch import LARGE_BYTES, drop_large_files


def test_images_go_logs_and_links_stay(tmp_path: Path) -> None:
    (tmp_path / "work" / "logs").mkdir(parents=True)
    image = tmp_path / "work" / "disk.img"
    with image.open("wb") as handle:  # sparse: large by size, small by allocation
        handle.truncate(4 * LARGE_BYTES)
    dense = tmp_path / "work" / "upload.raw"
    dense.write_bytes(b"\1" * LARGE_BYTES)
    log = tmp_path / "work" / "logs" / "sync.log"
    log.write_text("every command\n")
    outside = tmp_path.parent / f"{tmp_path.name}-cache.img"
    with outside.open("wb") as handle:
        handle.truncate(4 * LARGE_BYTES)
    link = tmp_path / "work" / "source.img"
    link.symlink_to(outside)
    try:
        freed = drop_large_files(tmp_path / "work")
        assert not image.exists() and not dense.exists()
        assert freed >= LARGE_BYTES  # the dense one's blocks; the sparse one had few
        assert log.read_text() == "every command\n"
        assert link.is_symlink() and outside.exists()  # never follows a link into the cache
    finally:
        outside.unlink()
