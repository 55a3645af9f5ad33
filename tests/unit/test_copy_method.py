"""target.copy: which target filesystem the plan makes from its source's blocks, and why not (pure planning)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tasks.lib.planning.render import render_plan
from tasks.lib.runner import P2VError
from tests.unit.layouts import layout
from tests.unit.test_plan import plan


def methods(name: str | dict[str, Any], **target: Any) -> dict[str, tuple[str, str, str]]:
    return {c.source_mountpoint: (c.method, c.resize, c.why) for c in plan(name, **target).copies}


def test_auto_copies_by_blocks_what_keeps_its_type_and_features() -> None:
    got = methods("plain-bookworm")
    assert got["/"][:2] == ("blocks", "shrink")  # the source's device (2688 MiB) is larger than the partition
    assert "resize2fs shrinks it to the partition in a scratch copy" in got["/"][2]
    assert got["/boot"] == ("files", "none", "merged into /")
    assert got["/srv"] == ("files", "none", "merged into /")
    grown = methods("lvm-bookworm")["/boot"]  # kept separate, on a partition larger than its source
    assert grown == ("blocks", "grow", "e2image, then resize2fs grows it to the partition")


def test_files_is_files_everywhere_and_the_plan_says_so() -> None:
    assert {m for m, _, _ in methods("plain-bookworm", copy="files").values()} == {"files"}
    shown = render_plan(plan("plain-bookworm", copy="files"))
    assert "copy (target.copy: files):" in shown and "    / by files: target.copy: files" in shown


def test_blocks_refuses_in_one_line_naming_the_spec_field() -> None:
    with pytest.raises(P2VError) as caught:
        plan("lvm-bookworm", copy="blocks", keep_uuids=True)
    text = str(caught.value)
    assert text.startswith("specs/demo.yaml: target.copy: blocks, but / (lv:vg_lvmbookworm/root) cannot be copied "
                           "by blocks: xfs cannot shrink")
    assert "\n" not in text and "set target.copy to auto" in (caught.value.hint or "")


def test_a_merged_filesystem_and_the_esp_go_by_files_even_when_blocks_are_asked_for() -> None:
    got = methods("plain-bookworm", copy="blocks")
    assert got["/"][0] == "blocks" and got["/srv"][0] == "files" and got["/boot"][0] == "files"
    assert methods("uefi-bookworm", copy="blocks")["/boot/efi"] == ("files", "none", "an ESP: copied by mtools")


def test_a_type_change_goes_by_files() -> None:
    assert methods("plain-bookworm", root_fs="ext3")["/"] == ("files", "none", "the source is ext4, the target ext3")


def test_a_journal_that_needs_recovery_goes_by_files() -> None:
    dirty = copy.deepcopy(layout("plain-bookworm"))
    root = next(m["device"] for m in dirty["mounts"] if m["mountpoint"] == "/")
    next(fs for fs in dirty["filesystems"] if fs["device"] == root)["needs_recovery"] = True
    assert methods(dirty)["/"] == ("files", "none", "its journal needs recovery: copied from the replayed view")


def test_a_feature_change_goes_by_files_and_names_the_features() -> None:
    newer = copy.deepcopy(layout("plain-bookworm"))
    root = next(m["device"] for m in newer["mounts"] if m["mountpoint"] == "/")
    fs = next(fs for fs in newer["filesystems"] if fs["device"] == root)
    fs["features"] = [*fs["features"], "mmp"]  # the plan never carries mmp over
    method, _, why = methods(newer)["/"]
    assert method == "files" and why == "the target's features differ from the source's (-mmp)"


def test_too_few_inodes_after_shrinking_goes_by_files() -> None:
    crowded = copy.deepcopy(layout("plain-bookworm"))
    root = next(m["device"] for m in crowded["mounts"] if m["mountpoint"] == "/")
    next(fs for fs in crowded["filesystems"] if fs["device"] == root)["inodes"] = 1000
    method, _, why = methods(crowded)["/"]
    assert method == "files" and why.startswith("shrunk to the partition it would keep about ")


def test_xfs_needs_a_kept_uuid_and_room_to_grow() -> None:
    big = {"size": "20G", "layout": "keep"}
    method, _, why = methods("lvm-bookworm", **big)["/"]
    assert method == "files" and "xfs goes by blocks only with its UUID kept" in why
    assert methods("lvm-bookworm", keep_uuids=True, **big)["/"][:2] == ("blocks", "grow")
    method, _, why = methods("lvm-bookworm", keep_uuids=True)["/"]
    assert method == "files" and why.startswith("xfs cannot shrink")


def test_the_methods_survive_the_plan_file() -> None:
    from tasks.lib.planning.model import DiskPlan
    made = plan("plain-bookworm")
    again = DiskPlan.from_json(made.to_json())
    assert again.copies == made.copies and again.policy.copy == "auto"
