"""The planned swap file: zeros (not sparse), mode 0600, mkswap."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.lib.fixes.steps.context import FixContext
from tasks.lib.paths import resolve_in_root
from tasks.lib.runner import P2VError, run

SWAP_SIGNATURE = b"SWAPSPACE2"  # mkswap's v1 header ends the first 4 KiB page with it (x86_64)
SWAP_PAGE = 4096


def is_swap_area(path: Path, size: int) -> bool:
    """Whether `path` is a regular file of `size` bytes with a swap signature (made by an earlier run)."""
    try:
        info = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or info.st_size != size:
            return False
        with open(path, "rb") as handle:
            handle.seek(SWAP_PAGE - len(SWAP_SIGNATURE))
            return handle.read(len(SWAP_SIGNATURE)) == SWAP_SIGNATURE
    except OSError:
        return False


def make_swap_file(ctx: FixContext) -> None:
    """The plan's swap file: written with zeros (swapon refuses holes, and older kernels the unwritten
    extents fallocate leaves on xfs), mode 0600, mkswap from the server's own util-linux; made under a
    temporary name and renamed, so that a killed run never leaves a half-made one at the planned path."""
    report = ctx.report("swap-file")
    planned = ctx.plan.swap_file
    if planned is None:
        report.status = "skipped"
        report.changes.append("no swap file in the plan")
        return
    size_mib = planned.size // (1 << 20)
    path = resolve_in_root(ctx.root, planned.path, follow_last=False)
    if os.path.lexists(path):
        if is_swap_area(path, planned.size):
            if os.lstat(path).st_mode & 0o777 != 0o600:
                os.chmod(path, 0o600)
                report.changed(f"{planned.path}: mode 0600")
            report.changes.append(f"{planned.path} is already the planned {size_mib} MiB swap area")
            return
        raise P2VError(f"{planned.path} exists on the target and is not the planned {size_mib} MiB swap file, "
                       "so the swap-file step would overwrite a file of the server",
                       hint=f"choose target.swap: partition (or none) in {ctx.spec.file}, or move that file on "
                            "the server")
    partial = path.with_name(f".{path.name}.p2v-partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.chmod(partial, 0o600)  # past the umask
    argv = ["dd", "if=/dev/zero", f"of={partial}", "bs=1M", f"count={size_mib}", "conv=notrunc,fsync",
            "status=none"]
    report.commands.append(" ".join(argv))
    run(argv, timeout=3600)
    ctx.chroot("swap-file", ["mkswap", "/" + str(partial.relative_to(ctx.root))], timeout=600)
    os.replace(partial, path)
    report.changed(f"made the swap file {planned.path}: {size_mib} MiB of zeros (not sparse), mode 0600, mkswap")
