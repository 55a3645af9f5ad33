"""Scratch space for tests that make disk images, and its clean-up.

The suite makes tens of GB of images (sources, disk.img, uploads) on a disk that
other tenants share; a run that kept them filled it and failed in CI. So images
leave as soon as the tests that use them are done, passed or failed, while the
small files a failure is read from (logs, serial consoles, JSON) stay until the
next session (pytest keeps one, see pyproject.toml).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# Logs, consoles and JSON stay below this; every image is far above it.
LARGE_BYTES = 8 * 1024 * 1024


def drop_large_files(top: Path, limit: int = LARGE_BYTES) -> int:
    """Unlink regular files under `top` whose size or allocation reaches `limit`.

    Never descends into a mount point (a leaked read-only source mount must not be
    written through) nor follows a symlink (demo specs link into the cache).
    Returns the bytes freed.
    """
    freed = 0
    for directory, subdirs, files in os.walk(top):
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(directory, d))]
        for name in files:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and max(info.st_size, info.st_blocks * 512) >= limit:
                os.unlink(path)
                freed += info.st_blocks * 512
    return freed
