"""The disk planner: layout.json + the spec's target policy -> DiskPlan (pure).

Where things are: `model` (DiskPlan and its parts, JSON), `context` (what every step
reads: layout, policy, source mounts; the notes), `features`, `sizing`, `swap`,
`mkfs` (the exact mkfs/mkswap commands), `layout` (which filesystems, the partitions),
`fstab_map`, `planner` (`plan_disk`, the steps in order) and `render` (`render_plan`).

No I/O here: `plan_disk(layout, spec)` decides every partition, filesystem,
feature, size, label and UUID of the target disk, and how the source's fstab
maps onto it. The disk stage (tasks/disk.py) only carries the plan out, and
records the completed plan (with the UUIDs mkfs made) as disk-plan.json.

Decisions, and why:

Policy `flatten` (default): one disk, one root filesystem that receives every
source mount, plus swap. A source `/boot` stays a separate filesystem unless
the bootloader is already known to read a filesystem like the target root
(the *proven-readable* rule):

- the bootloader is grub2 (grub legacy's grub.conf and LILO name kernels
  relative to the /boot partition; merging would need their configuration
  rewritten, so their /boot is always kept), and
- the target root has the same filesystem type as the source /boot, and
- every on-disk feature of the target root that a bootloader must understand
  (ext: INCOMPAT features; xfs: v5/crc, ftype, sparse inodes, bigtime, nrext64)
  is also on the source /boot, which that bootloader reads today.

So plain Debian servers (ext4 /boot and ext4 root, same features) get one
root partition, while an xfs root next to an ext4 /boot (lvm-bookworm) keeps
its /boot: grub 2.06 on bookworm may not read every xfs feature (grub < 2.12
refuses nrext64, older ones bigtime), and nothing on the source proves it
does. An EFI system partition (/boot/efi, /efi) is always kept.

Policy `keep`: one partition per source mount, the mount structure as it was
(no LVM on the target).

Features: a filesystem gets exactly the source filesystem's features
(`mkfs.ext4 -O none,<source features>` plus an explicit `^f` for every
feature a newer e2fsprogs would add by default; `mkfs.xfs -m ...,-i ...`
with every feature flag spelled out), so the source's own kernel, e2fsck and
bootloader can read the target. When the spec changes the root's type, the
features are the ones every source filesystem of the new type shares (proven
on that server); with none of that type, a conservative baseline for the
oldest installed kernel (see `features.era_ext_features`, `features.era_xfs_features`).

Sizes: each filesystem gets its used bytes, plus headroom (the larger of
`headroom_percent` of the used bytes and `min_headroom`), plus an estimate of
the new filesystem's own overhead (journal or log, inode tables, reserved
blocks, allocation-group metadata), rounded up to whole MiB. Partitions start
at 1 MiB and are MiB-aligned. An explicit `size` must hold at least every
filesystem's data and overhead (without headroom); the rest goes first to the
other filesystems' headroom, then to the root.

Swap (`target.swap`): as much as the source had in its fstab, swap
partitions and swap files (inspect records each file's size) alike. `source`
(the default) keeps the kind: the source's swap partitions become one swap
partition, its swap files one swap file at the first one's path, which the
fix stage writes (zeros, not sparse) and mkswaps; `partition` and `file` put
all of it into one of that kind (a file at the source's swap file path, else
/swapfile), `none` drops it. Source swap files are not copied (their content
is worthless) and their space is not counted as data. Every source swap line
of fstab is either the line of a planned swap area or removed with a reason
that names what replaced it.

Partition table (target.label auto): msdos for a BIOS server, gpt for a UEFI
one. An ESP is always kept as its own vfat partition (written by mtools: see
tasks/lib/esp.py), sized like any kept filesystem.

Layout of the disk: [BIOS boot (gpt)] [/boot] [ESP] [swap] [other mounts] [/]:
the root comes last so that cloud-init's growpart can grow it into a larger
flavor's disk. With msdos and more than four partitions, the fourth is an
extended partition holding the rest as logical ones.
"""
