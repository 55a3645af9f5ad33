"""The kernel command line that boots the live system.

One place for it: the boot test uses it, and the PXE menus are rendered from it.
"""

from __future__ import annotations

from collections.abc import Sequence

SQUASHFS_NAME = "squashfs.img"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"

# The console: tty0 for a screen (or the BMC's), ttyS0 last so that it is
# /dev/console and the serial log has everything.
CONSOLE_ARGS: tuple[str, ...] = ("console=tty0", "console=ttyS0,115200n8")


def live_cmdline(squashfs_url: str, extra: Sequence[str] = ()) -> str:
    """Arguments for a live boot that fetches the squashfs root from `squashfs_url` (http://...).

    dracut's livenet downloads the image into RAM once the network is up
    (`ip=dhcp rd.neednet=1`); dmsquash-live mounts it under a tmpfs overlay
    (`rd.live.overlay.overlayfs=1`; without it dracut 059 stops in its
    emergency shell), so the live root is writable and nothing is written
    anywhere but RAM. `extra` goes last (BOOTIF=, p2v.*, rd.shell).
    """
    if not squashfs_url.startswith(("http://", "https://")):
        raise ValueError(f"the squashfs URL must be http(s)://, got {squashfs_url!r}")
    return " ".join((f"root=live:{squashfs_url}", "rd.live.overlay.overlayfs=1", "ip=dhcp", "rd.neednet=1",
                     *CONSOLE_ARGS, *extra))
