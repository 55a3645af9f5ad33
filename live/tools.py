"""The commands the live system must have.

STAGE_TOOLS is what p2v's stages run on the server's side (not inside the
target's chroot). tests/unit/test_live_tools.py reads every call site in
tasks/ and fails when a stage calls a command missing here. The builder checks
that each of these is in the squashfs, and the live boot test that each is on
PATH in the booted system.
"""

from __future__ import annotations

STAGE_TOOLS: tuple[str, ...] = (
    "blkdiscard", "blkid", "blockdev", "chattr", "chroot", "dd", "debugfs", "dmesg", "dmsetup", "dpkg-deb", "du",
    "dumpe2fs", "e2fsck", "e2image", "find", "findmnt", "fstrim", "losetup", "lsblk", "lvs", "mattrib", "mcopy",
    "mdadm", "mdel", "mdeltree", "mdir", "minfo", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4", "mkfs.fat", "mkfs.xfs",
    "mkswap", "mmd", "modprobe", "mount", "openssl", "partx", "pkill", "pvs", "qemu-img", "qemu-storage-daemon",
    "qemu-system-x86_64", "resize2fs", "rsync", "sfdisk", "sync", "tar", "tune2fs", "umount", "vgchange", "vgs",
    "xfs_admin", "xfs_copy", "xfs_db", "xfs_growfs", "xfs_logprint",
)

# Not run by a stage today, but part of the live system on purpose: what the
# in-live runner and an operator on the console need (NFS, LVM and md by hand,
# module loading, partition and archive tools, the runner's power-off).
OPERATOR_TOOLS: tuple[str, ...] = (
    "busybox", "cpio", "curl", "fdisk", "file", "getfacl", "getfattr", "ip", "lvm", "mcopy", "mkfs.vfat",
    "mksquashfs", "mount.nfs", "mount.nfs4", "parted", "python3", "setfacl", "setfattr", "systemctl",
    "udevadm", "unsquashfs", "wipefs", "xfs_repair", "e2fsck", "zstd",
)

LIVE_TOOLS: tuple[str, ...] = tuple(sorted(set(STAGE_TOOLS) | set(OPERATOR_TOOLS)))

# Where a command may be in the live root (Debian bookworm has a merged /usr).
BIN_DIRS: tuple[str, ...] = ("usr/sbin", "usr/bin", "usr/local/sbin", "usr/local/bin")
