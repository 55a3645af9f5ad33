"""The catalogue of bad and unusual sources and environments: what p2v says, what to do.

Two tables, and docs/errors.md is rendered from them (`python -m tests.catalogue`
writes it; tests/unit/test_errors_doc.py fails when the page differs):

- `CASES`: each is built from scratch in tests/integration/test_bad_sources.py
  (tiny sparse images, synthetic trees) and run through the real stage by doit;
  a refused case must print exactly one line holding `says` and `hint`, exit
  non-zero, leave no target for the stage, nothing attached or mounted, and
  the source's sha256 unchanged. A case that carries on must finish the stage.
- `ELSEWHERE`: cases proven by other tests (named by node id); a unit test
  checks that each named test exists and holds the quoted message.

The spec errors come from tests/unit/test_spec.py's own table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tests.unit.test_spec import BAD_SPECS

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
REGENERATE = ".venv/bin/python -m tests.catalogue"


@dataclass(frozen=True)
class Case:
    id: str
    group: str  # disks and tables | filesystems | operating systems | work area and runs
    source: str  # what the source (or environment) is
    stage: str  # the stage that stops (or carries on)
    # The whole line after `<stage>:<host>: ` and before its hint and log path ({host}: the host,
    # <workdir>: its workdir, <tmp>: where the test made the images); for a case that carries on,
    # what p2v does instead.
    says: str
    hint: str  # the hint, whole: what the operator should do ("" when it carries on)
    carries_on: bool = False
    note: str = ""  # how the case is made, where that matters (a signature rather than a real filesystem)


GRUB_HINT = "install grub on the server, then rerun inspect:<host>"
CONVERTS = "(it converts ext2, ext3, ext4, xfs and vfat)"
NO_ROOT = "; none holds etc/fstab and an OS release file"
CHECK_DISKS = "check source.devices/source.images in the spec names the server's system disks"

CASES: list[Case] = [
    # ------------------------------------------------ disks and tables
    Case("not-a-disk", "disks and tables", "an image file of random bytes (not a disk)", "inspect",
         "no root filesystem found: disk1 holds nothing p2v recognises" + NO_ROOT, CHECK_DISKS),
    Case("empty-image", "disks and tables", "an image file of 0 bytes", "inspect",
         "disk1 (<tmp>/empty.img) is empty (0 bytes)", CHECK_DISKS),
    Case("truncated-image", "disks and tables",
         "a GPT disk image cut short (its backup GPT and the end of its last partition are gone)", "inspect",
         "disk1 is cut short: its GPT says the disk has 50331648 bytes, but it has 41943040",
         "the image is incomplete: copy the whole disk again"),
    Case("partition-past-end", "disks and tables", "an msdos table whose partition runs past the end of the disk",
         "inspect", "disk1: partition 1 ends at byte 84934656, past the end of the disk (33554432 bytes)",
         "the image is incomplete (cut short while copied) or the table is wrong: copy the whole disk again"),
    Case("overlapping-partitions", "disks and tables", "an msdos table with two partitions that overlap",
         "inspect", "disk1: partitions 1 and 2 overlap (bytes 20971520 to 26214400)",
         "repair the partition table on the server: p2v does not guess which partition holds the data"),
    Case("gpt-bad-crc", "disks and tables", "a GPT whose primary and backup headers both fail their CRC", "inspect",
         "disk1: its GPT is damaged: neither the primary nor the backup GPT header is valid, and only its "
         "protective MBR is readable",
         "repair the GPT on the server (gdisk's recovery menu), or check that the image is a complete copy of the "
         "disk"),
    Case("gpt-primary-lost", "disks and tables", "a GPT whose primary header and table are zeroed, the backup intact",
         "inspect", "the backup GPT is read (as sfdisk and the kernel read it), and sfdisk's warning is logged", "",
         carries_on=True),
    Case("msdos-logical", "disks and tables",
         "an msdos table with an extended partition and logical partitions (root on p5, /srv on p6)",
         "inspect", "root disk1p5 and /srv on disk1p6 found; plan:{host} makes the plan", "", carries_on=True),
    Case("hybrid-mbr", "disks and tables", "a GPT with a hybrid MBR (sgdisk --hybrid: real MBR entries beside 0xEE)",
         "inspect", "the GPT is read, the MBR's copies of its entries are not used", "", carries_on=True),
    Case("sector-4k", "disks and tables", "a 4Kn disk image (4096-byte sectors, GPT at byte 4096)", "inspect",
         "disk1 has 4096-byte sectors (its GPT header is at byte 4096); p2v reads image files as disks of 512-byte "
         "sectors",
         "convert this server from its live system (source.devices), where the kernel reads the disk with its own "
         "sector size",
         note="the live-system path with a 4Kn disk is not tested"),
    # ------------------------------------------------ filesystems
    Case("btrfs-root", "filesystems", "the root filesystem is btrfs", "inspect",
         f"fstab line 1: / is disk1p1, a btrfs filesystem, which p2v does not convert {CONVERTS}",
         "move / to ext4 or xfs on the server first"),
    Case("reiserfs-srv", "filesystems", "/srv on reiserfs (this machine's kernel cannot mount it)", "inspect",
         f"fstab line 2: /srv is disk1p2, a reiserfs filesystem, which p2v does not convert {CONVERTS}",
         "move /srv to ext4 or xfs on the server first"),
    Case("luks-root", "filesystems", "the only partition is LUKS-encrypted (LUKS1, made by cryptsetup)", "inspect",
         "no root filesystem found: disk1p1 crypto_LUKS (encrypted)" + NO_ROOT,
         "p2v cannot read encrypted volumes: decrypt the server's disks first (cryptsetup reencrypt --decrypt), or "
         "convert it another way"),
    Case("zfs-member", "filesystems", "the only partition is a ZFS pool member", "inspect",
         "no root filesystem found: disk1p1 zfs_member (p2v cannot read it)" + NO_ROOT,
         "p2v converts ext2, ext3, ext4, xfs and vfat: a root on another filesystem must move to ext4 or xfs first",
         note="no ZFS tools or driver here: the partition carries ZFS uberblocks in its four labels, which blkid "
              "recognises as zfs_member; it is not a whole pool"),
    Case("fs-errors", "filesystems", "the root ext4 records errors (state 'clean with errors'): it needs fsck",
         "inspect",
         "fstab line 1: / is disk1p1: its ext4 records errors (state 'clean with errors'); a copy would carry the "
         "damage",
         "run e2fsck -f on it from a rescue system (or on a copy of the image), then inspect again"),
    Case("ext4-newer-features", "filesystems",
         "the root ext4 has an incompatible feature this machine's kernel and e2fsprogs do not know", "inspect",
         "disk1p1 (ext4) has features this machine does not know (tune2fs: Filesystem has unsupported feature(s))",
         "convert it from a live system whose kernel and e2fsprogs are at least as new as the server's"),
    # ------------------------------------------------ operating systems
    Case("no-os", "operating systems", "an ext4 filesystem with data but no /etc/fstab or OS release file",
         "inspect", "no root filesystem found: disk1p1 ext4" + NO_ROOT, CHECK_DISKS),
    Case("fstab-garbage", "operating systems", "an fstab with garbage lines among the good ones", "inspect",
         "each garbage line is a warning in layout.json; the good lines are used", "", carries_on=True),
    Case("fstab-missing-device", "operating systems", "an fstab naming a UUID that no source disk holds",
         "inspect",
         "fstab line 2: UUID=5d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6 (/srv) matches no device on the source disks",
         "add the missing disk to the spec's source, or mark the entry nofail on the server"),
    Case("fstab-duplicate-mount", "operating systems", "an fstab mounting two filesystems on /srv", "inspect",
         "fstab line 3: /srv is mounted twice",
         "keep one line per mount point in the server's /etc/fstab (the second mount hides the first)"),
    Case("fstab-symlink-loop", "operating systems", "/etc/fstab is a symlink to itself", "inspect",
         "the root's /etc/fstab cannot be read (root filesystem disk1p1): a dangling symlink or a symlink loop",
         "make /etc/fstab on the server a file the server itself can read"),
    Case("etc-symlinked", "operating systems", "/etc is an absolute symlink (/etc -> /usr/local/etc)", "inspect",
         "the root is found and its fstab read inside the source's tree, never this machine's", "",
         carries_on=True),
    Case("redhat-release-only", "operating systems",
         "a CentOS 7 root without /etc/os-release, with /etc/redhat-release", "inspect",
         "the OS is read from /etc/redhat-release (centos 7); plan:{host} makes the plan", "", carries_on=True),
    Case("no-kernel", "operating systems", "a root with no kernel in /boot", "fix",
         "no installed kernel can boot on virtio; kernels: none",
         "install the distribution's current kernel package on the server (it has CONFIG_VIRTIO_BLK and "
         "CONFIG_VIRTIO_PCI), then rerun inspect:<host>"),
    Case("no-initrd-tool", "operating systems", "a root without dracut, initramfs-tools or mkinitrd", "fix",
         "initrd tool none found: p2v rebuilds initrds with dracut or initramfs-tools",
         "install dracut or initramfs-tools on the server, then rerun inspect:<host>"),
    Case("no-bootloader", "operating systems", "no grub configuration in the tree and no boot code on any disk",
         "fix", "bootloader unknown: p2v configures grub2 and grub legacy only", GRUB_HINT),
    # ------------------------------------------------ work area and runs
    Case("layout-edited", "work area and runs", "layout.json edited by hand (a field of the wrong type)", "disk",
         "<workdir>/layout.json: used_bytes: expected integer, got str 'about a gigabyte' (schema "
         "layout.schema.json)",
         "remove layout.json and run inspect:{host} again: it writes the file anew"),
    Case("spec-changed", "work area and runs", "the spec's target.headroom_percent changed after inspect and disk "
         "finished", "disk", "disk runs again with the new plan; inspect, whose spec fields (source.*) did not "
         "change, does not", "", carries_on=True),
    Case("disk-img-deleted", "work area and runs", "disk.img deleted between the disk and sync stages", "sync",
         "doit makes disk.img again, then sync copies into it", "", carries_on=True),
]


@dataclass(frozen=True)
class Elsewhere:
    id: str
    group: str
    source: str
    stage: str
    says: str
    hint: str
    test: str  # pytest node id of the test that proves it


ELSEWHERE: list[Elsewhere] = [
    Elsewhere("two-roots", "operating systems", "two disks, each with a root filesystem", "inspect",
              "several root filesystems found: disk1p2 (UUID=", "pick one in specs/twins.yaml with source.root: UUID=",
              "tests/integration/test_inspect.py::test_two_roots_is_an_error_that_says_how_to_pick"),
    Elsewhere("data-disk-only", "operating systems", "only the data disk of a real server", "inspect",
              "no root filesystem found", "",
              "tests/integration/test_inspect.py::test_no_root_is_an_error"),
    Elsewhere("missing-disk", "operating systems", "a real server with one of its two disks left out of the spec",
              "inspect", "(/srv) matches no device on the source disks", "",
              "tests/integration/test_inspect.py::test_missing_fstab_device_is_an_error"),
    Elsewhere("striped-lv", "filesystems", "a striped LV, where the kernel has no device-mapper", "inspect",
              "has segment type striped; reading it needs device-mapper", "",
              "tests/integration/test_inspect.py::test_unsupported_lvm_segment_type_names_what_is_missing"),
    Elsewhere("second-run", "work area and runs", "two doit runs of one host at once", "any",
              "another p2v run is working on host web1", "",
              "tests/unit/test_pipeline.py::test_a_second_run_on_the_same_host_is_refused"),
    Elsewhere("read-only-work-area", "work area and runs", "a work area p2v cannot write (immutable)", "disk",
              "Operation not permitted", "the workdir must be writable",
              "tests/integration/test_disk.py::test_unwritable_workdir_is_a_clear_error"),
    Elsewhere("full-work-area", "work area and runs", "a work area too small for the copy", "sync",
              "MiB free, and the copy needs about", "",
              "tests/integration/test_sync.py::test_full_work_area_is_refused_with_the_numbers"),
    Elsewhere("target-fills-up", "work area and runs", "the target filesystem fills up during the copy", "sync",
              "target filesystem full while copying /: ", "",
              "tests/integration/test_copy.py::test_disk_full_is_a_clear_error"),
    Elsewhere("target-too-small", "work area and runs", "target.size smaller than the data", "disk",
              "is too small: the data needs", "",
              "tests/integration/test_disk.py::test_target_too_small_is_a_clear_error"),
    Elsewhere("glance-down", "work area and runs", "Glance stops answering during the upload", "upload",
              "gave up after 3 attempts", "",
              "tests/integration/test_upload.py::test_glance_stopped_during_upload"),
    Elsewhere("glance-wrong-password", "work area and runs", "a wrong password in clouds.yaml", "upload",
              "wrong user name or password", "",
              "tests/integration/test_upload.py::test_refused_credentials_fail_in_one_line"),
    Elsewhere("glance-no-role", "work area and runs", "a user with no role on the project", "upload",
              "has no role on project", "",
              "tests/integration/test_upload.py::test_refused_credentials_fail_in_one_line"),
    Elsewhere("glance-reader", "work area and runs", "a user with the reader role only", "upload",
              "may not do this in", "",
              "tests/integration/test_upload.py::test_refused_credentials_fail_in_one_line"),
    Elsewhere("unknown-cloud", "work area and runs", "glance.cloud names no clouds.yaml entry", "upload",
              "clouds there: p2v-", "",
              "tests/integration/test_upload.py::test_refused_credentials_fail_in_one_line"),
]


def render() -> str:
    """docs/errors.md, from the tables."""
    lines = [
        "# What p2v says when a source or the work area is wrong, and what to do",
        "",
        f"Generated by `{REGENERATE}` from `tests/catalogue.py`; "
        "`tests/unit/test_errors_doc.py` fails when this page differs from the tables.",
        "",
        "Every refusal is one line, `<stage>:<host>: <what> (hint: <what to do>) [log: <file>]`, with a "
        "non-zero exit. The stage leaves no target (no layout.json, disk.img or stamp), nothing stays mounted "
        "or attached (no loop device, mount, FUSE export or qemu process), and the source's sha256 is "
        "unchanged. `tests/integration/test_bad_sources.py` checks all of it for each case marked *built*, "
        "making the source from scratch (tiny sparse images, synthetic trees) and comparing the whole line "
        "with the words below; the cases marked *proven by* quote the tests that cover them.",
        "",
        "Where a case *carries on*, p2v handles the source and the stage finishes; that the converted "
        "result boots is not proven by these tests (no boot is run for them).",
        "",
    ]
    for group in ("disks and tables", "filesystems", "operating systems", "work area and runs"):
        lines += [f"## {group[0].upper()}{group[1:]}", ""]
        for case in (c for c in CASES if c.group == group):
            source = case.source + (f" ({case.note})" if case.note else "")
            lines.append(f"- **`{case.id}`**: {source}. Built.  ")
            if case.carries_on:
                lines.append(f"  `{case.stage}` carries on: {_words(case.says)}.")
            else:
                lines.append(f"  `{case.stage}` stops: `{_words(case.says)}`  ")
                lines.append(f"  **What to do**: {_words(case.hint)}.")
        for other in (e for e in ELSEWHERE if e.group == group):
            says = f": `…{_words(other.says)}…`" if other.says else ""
            lines.append(f"- **`{other.id}`**: {other.source}. Proven by `{other.test}`.  ")
            lines.append(f"  `{other.stage}` stops{says}" + (f"  \n  **What to do**: {_words(other.hint)}."
                                                          if other.hint else ""))
        lines.append("")
    lines += ["## Specs", "",
              "A bad spec stops doit before any task runs, with one line "
              "`p2v: spec error: specs/<file>: <field>: <what>`; the operator fixes that field. Proven by "
              "`tests/unit/test_spec.py::test_bad_spec_is_one_clear_line`, one case each:", ""]
    for bad in BAD_SPECS:
        lines.append(f"- {bad.case}: `{bad.field or '(the whole file)'}`: `…{_words(bad.says)}…`")
    built = len(CASES)
    lines += ["", f"{built + len(ELSEWHERE) + len(BAD_SPECS)} cases in all: {built} built by "
              f"tests/integration/test_bad_sources.py ({sum(c.carries_on for c in CASES)} of them carry on), "
              f"{len(ELSEWHERE)} proven by other tests, {len(BAD_SPECS)} spec errors.", ""]
    return "\n".join(lines)


def _words(text: str) -> str:
    return text.replace("{host}", "<host>").replace("`", "'")


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
