"""The source model: describe the operating system of a mounted source tree, without changing it.

The inspect stage mounts the source server's filesystems read-only as one tree
and calls `describe_system(root)`. The result says what later stages need to
plan: which distribution, which kernels (and whether they have virtio), which
initrd tool and bootloader, the kernel command lines, the network
configuration with every place a MAC address is bound, hostname and SELinux.

Where things are: `model` (the dataclasses), `tree` (`SourceTree`), the
describers `os`, `kernels`, `boot`, `network` and `describe` (`describe_system`),
`codec` (JSON); the parsers of each on-disk format are in `tasks.lib.formats`.

Rules this package keeps:

- It only reads. No subprocess, no write, no chroot.
- Every path is resolved inside `root`: an absolute symlink such as
  `/etc/grub.conf -> /boot/grub/grub.conf` is followed *within the tree*, and
  `..` never climbs above `root` (`SourceTree`, on top of
  `tasks.lib.paths.resolve_in_root`). The host's own files are never read
  through a link, and FIFOs or huge files are skipped, not read.
- fstab belongs to inspect (`tasks.lib.fstab`); here it only says whether an
  EFI system partition is mounted.
- A malformed or unreadable file is a warning in the description, not a
  crash.
- Each format has its own small parser (`tasks.lib.formats`) that works on
  text, so that it can be tested on a snippet.
- Output is deterministic: lists of unordered things (kernels, interfaces,
  MAC bindings, files) are sorted; ordered things (kernel arguments, boot menu
  entries, addresses) keep the order of the file. `to_json` sorts keys.
"""
