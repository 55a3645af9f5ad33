"""Inode flags: the letters, what the manifest records and compares, and the copy's view of them.

Setting flags for real is tested on ext4 and xfs images in tests/integration/test_inode_flags.py;
here only `d` (no dump), which an owner may set without root, where tmp_path's filesystem keeps it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tasks.lib import inodeflags
from tasks.lib.copy import FlagOutcome, _expected_view, _flag_outcome
from tasks.lib.inodeflags import DEFERRED, RECORDED, bits_of, describe, letters
from tasks.lib.manifest import Entry, Manifest, build_manifest, compare, render_differences, scan_flags


def test_letters_in_lsattrs_order_and_back() -> None:
    assert letters(bits_of("ai")) == "ia"
    assert letters(bits_of("dAsuSj")) == "suSdAj"
    assert letters(0) == "" and bits_of("") == 0
    assert describe(bits_of("ia")) == "i (immutable), a (append only)"
    with pytest.raises(ValueError, match="unknown inode flag"):
        bits_of("Z")


def test_format_flags_are_not_recorded_and_i_a_are_deferred() -> None:
    # e (extents), I (hashed index), N (inline data): the filesystem's own bookkeeping.
    assert letters(RECORDED & bits_of("eIN")) == ""
    assert letters(RECORDED) == "suSDiadAcEjtTCxFPVm"
    assert letters(DEFERRED) == "ia"
    # An unnamed bit (huge file, 0x40000) is neither recorded nor shown.
    assert letters(0x40000 | bits_of("d")) == "d"


def entry(path: str, flags: str = "", kind: str = "file") -> Entry:
    return Entry(path=path, type=kind, mode=0o644, uid=0, gid=0, mtime_ns=0, size=0,
                 sha256="0" * 64 if kind == "file" else None, flags=flags)


def manifest(*entries: Entry) -> Manifest:
    return Manifest(root="/x", entries={e.path: e for e in entries})


def test_a_flag_difference_is_one_clear_line_and_changes_the_digest() -> None:
    source = manifest(entry("/", kind="dir"), entry("/etc/resolv.conf", "i"), entry("/var/log/audit.log", "ad"))
    target = manifest(entry("/", kind="dir"), entry("/etc/resolv.conf"), entry("/var/log/audit.log", "ad"))
    differences = compare(source, target)
    assert [str(d) for d in differences] == ["/etc/resolv.conf: flags i != -"]
    assert render_differences(differences) == "/etc/resolv.conf: flags i != -"
    assert source.digest() != target.digest()
    assert Entry.from_json(source.entries["/var/log/audit.log"].to_json()).flags == "ad"


def test_the_copy_compares_the_target_with_the_source_less_deferred_and_unkept_flags() -> None:
    source = manifest(entry("/", kind="dir"), entry("/etc/resolv.conf", "ia"), entry("/data", "dC"),
                      entry("/plain"))
    refused = {"/data": {bits_of("C"): "Operation not supported"}}
    view = _expected_view(source, DEFERRED, refused)
    assert {p: e.flags for p, e in view.entries.items()} == {"/": "", "/etc/resolv.conf": "", "/data": "d",
                                                             "/plain": ""}
    # What the target holds after the copy compares equal to the view, with the view's digest.
    target = manifest(entry("/", kind="dir"), entry("/etc/resolv.conf"), entry("/data", "d"), entry("/plain"))
    assert compare(view, target) == [] and view.digest() == target.digest()
    # An i the target has too early (before fix) is a difference: pending means not yet there.
    early = dataclasses.replace(target, entries={**target.entries, "/etc/resolv.conf": entry("/etc/resolv.conf",
                                                                                               "i")})
    assert [str(d) for d in compare(view, early)] == ["/etc/resolv.conf: flags - != i"]

    outcome = _flag_outcome({"/etc/resolv.conf": bits_of("ia"), "/data": bits_of("dC")}, DEFERRED, refused)
    assert outcome.entries == 2
    assert outcome.pending == (("/etc/resolv.conf", "ia"),)
    assert outcome.dropped == (("/data", "C", "Operation not supported"),)
    assert outcome.kept == {"d": 1}
    assert outcome.warnings() == ["inode flag C (no copy on write) not kept on 1 entry of the target "
                                  "(Operation not supported): /data"]
    assert FlagOutcome.from_receipt(outcome.receipt()) == outcome


def test_warnings_group_by_flag_and_reason() -> None:
    refused = {f"/f{n}": {bits_of("j"): "Operation not permitted"} for n in range(7)}
    outcome = _flag_outcome({path: bits_of("j") for path in refused}, DEFERRED, refused)
    (line,) = outcome.warnings()
    assert line.startswith("inode flag j (data journalling) not kept on 7 entries of the target "
                           "(Operation not permitted): /f0, /f1, /f2, /f3, /f4 and 2 more")


def _settable_here(path: Path) -> bool:
    with inodeflags.opened(path) as fd:
        assert fd is not None
        got, refused = inodeflags.apply_flags(fd, bits_of("d"))
    return not refused and got == bits_of("d")


def test_manifest_and_scan_read_flags_of_files_and_directories(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("x")
    (root / "plain").write_text("y")
    os.symlink("plain", root / "link")
    os.mkfifo(root / "fifo")
    if not _settable_here(root / "dir" / "file") or not _settable_here(root / "dir"):
        pytest.skip(f"{tmp_path} does not keep the d flag")
    built = build_manifest(root)
    assert {p: e.flags for p, e in built.entries.items() if e.flags} == {"/dir": "d", "/dir/file": "d"}
    assert built.entries["/link"].flags == "" and built.entries["/fifo"].flags == ""
    assert scan_flags(root) == {"/dir": bits_of("d"), "/dir/file": bits_of("d")}
    assert scan_flags(root, ["/dir"]) == {"/dir": bits_of("d")}  # excluded contents: the directory only
    with inodeflags.opened(root / "dir" / "file") as fd:
        assert fd is not None
        inodeflags.apply_flags(fd, 0)
    assert [str(d) for d in compare(built, build_manifest(root))] == ["/dir/file: flags d != -"]
