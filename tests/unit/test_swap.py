"""Swap: what the planner makes of the source's swap partitions and swap files, and that every
word about it (fstab comments, the plan's notes and table, the fstab step's receipt line) is true.

The cross-check runs over every recorded layout (tests/unit/data/layouts), variants of them whose
swap is a file, and every synthetic tree, for each `target.swap` choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.fixes.fstab import REMOVED_MARK, fstab_why, rewrite_fstab
from tasks.lib.fstab import parse_fstab
from tasks.lib.plan import DiskPlan, MiB, render_plan, swap_summary
from tasks.lib.runner import P2VError
from tests.fixtures.synthetic import SYNTHETIC_TREES
from tests.unit.fix_layouts import completed_plan, fixture_tree, synthetic_layout
from tests.unit.layouts import LAYOUTS, layout, with_swap_file

GiB = 1 << 30
CHOICES = ["source", "partition", "file", "none"]
RECORDED = sorted(p.stem for p in LAYOUTS.glob("*.json"))
# Recorded layouts made to have swap files: (the fixture whose files they are, the layout).
VARIANTS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "swap.img": ("plain-bookworm", lambda: with_swap_file("plain-bookworm")),
    "swapfile-in-srv": ("plain-bookworm", lambda: with_swap_file("plain-bookworm", "/srv/swapfile", 700 * MiB)),
    "partition-and-file": ("plain-bookworm", lambda: with_swap_file("plain-bookworm", keep_partitions=True)),
    "missing-swap-file": ("plain-bookworm", lambda: with_swap_file("plain-bookworm", size=0,
                                                                   reason="no such file on the source")),
    "lvm-swap.img": ("lvm-bookworm", lambda: with_swap_file("lvm-bookworm", "/swap.img", 1 * GiB)),
}


def source_swap(lay: dict[str, Any]) -> int:
    return sum(int(s["size"]) for s in lay["swaps"] if s["in_fstab"]) + \
        sum(int(e.get("size") or 0) for e in lay["fstab"] if e["status"] == "swapfile")


# ---------------------------------------------------------------- the planner


def test_a_swap_file_source_keeps_a_swap_file_of_the_same_size_at_the_same_path() -> None:
    lay = with_swap_file("plain-bookworm")
    plan = completed_plan(lay)
    assert plan.swap_partition is None
    assert plan.swap_file is not None
    assert (plan.swap_file.path, plan.swap_file.size, plan.swap_file.filesystem) == ("/swap.img", 2 * GiB, "/")
    assert plan.swap_file.sources == ("/swap.img",)
    assert plan.source_swap == 2 * GiB
    line = next(c for c in plan.fstab if c.spec == "/swap.img")
    assert (line.action, line.new_spec, line.new_vfstype) == ("replace", "/swap.img", "swap")
    assert "swap file /swap.img of 2048 MiB (made by the fix stage)" in swap_summary(plan)
    # The file is not copied, so its blocks are no data to hold; the new one is planned in once.
    plain = completed_plan(lay, swap="none")
    root, root_none = plan.filesystem("/"), plain.filesystem("/")
    assert root.used_bytes == root_none.used_bytes
    assert root.used_bytes == sum(m.used_bytes for m in root.sources) - 2 * GiB
    assert plan.partition_of("/").size >= plain.partition_of("/").size + 2 * GiB


def test_each_choice_for_a_swap_file_source() -> None:
    lay = with_swap_file("plain-bookworm")
    partition = completed_plan(lay, swap="partition")
    assert partition.swap_file is None and partition.swap_partition is not None
    assert partition.swap_partition.size == 2 * GiB
    assert partition.swap_partition.swap is not None and partition.swap_partition.swap.sources == ("/swap.img",)
    line = next(c for c in partition.fstab if c.spec == "/swap.img")
    assert (line.action, line.new_spec) == ("replace", f"UUID={partition.swap_partition.swap.uuid}")
    file = completed_plan(lay, swap="file")
    assert file.swap_file is not None and (file.swap_file.path, file.swap_file.size) == ("/swap.img", 2 * GiB)
    none = completed_plan(lay, swap="none")
    assert none.swap_file is None and none.swap_partition is None
    assert next(c for c in none.fstab if c.spec == "/swap.img").reason == "swap: none"
    assert "none planned (target.swap: none)" in swap_summary(none)


def test_a_swap_file_on_another_filesystem_is_planned_into_that_one() -> None:
    lay = with_swap_file("plain-bookworm", "/srv/swapfile", 700 * MiB)
    kept = completed_plan(lay, layout="keep")
    assert kept.swap_file is not None and kept.swap_file.filesystem == "/srv"
    flat = completed_plan(lay)
    assert flat.swap_file is not None and flat.swap_file.filesystem == "/"
    without = completed_plan(lay, layout="keep", swap="none")
    assert kept.partition_of("/srv").size >= without.partition_of("/srv").size + 700 * MiB
    assert kept.partition_of("/").size == without.partition_of("/").size


def test_source_keeps_partitions_and_files_apart() -> None:
    lay = with_swap_file("plain-bookworm", keep_partitions=True)
    part_bytes = lay["swaps"][0]["size"]
    plan = completed_plan(lay)
    assert plan.swap_partition is not None and plan.swap_partition.size == -(-part_bytes // MiB) * MiB
    assert plan.swap_file is not None and plan.swap_file.size == 2 * GiB
    one = completed_plan(lay, swap="partition")
    assert one.swap_file is None and one.swap_partition is not None
    assert one.swap_partition.size == -(-(part_bytes + 2 * GiB) // MiB) * MiB
    removed = next(c for c in one.fstab if c.spec == "/swap.img")
    assert (removed.action, removed.reason) == (
        "remove", f"swap file, not copied; merged into swap partition {one.swap_partition.number}")
    into_file = completed_plan(lay, swap="file")
    assert into_file.swap_file is not None and into_file.swap_file.path == "/swap.img"
    assert into_file.swap_file.size == -(-(part_bytes + 2 * GiB) // MiB) * MiB
    partition_line = next(c for c in into_file.fstab if c.vfstype == "swap" and c.spec != "/swap.img")
    assert partition_line.reason == "merged into the swap file /swap.img"


def test_a_swap_partition_source_is_unchanged_by_default() -> None:
    plan = completed_plan(layout("plain-bookworm"))
    assert plan.swap_file is None and plan.swap_partition is not None
    assert plan.source_swap == layout("plain-bookworm")["swaps"][0]["size"]
    # target.swap: file on a partition source, as before: /swapfile.
    file = completed_plan(layout("plain-bookworm"), swap="file")
    assert file.swap_file is not None and file.swap_file.path == "/swapfile"


def test_a_swap_file_the_source_does_not_hold_is_no_swap_and_says_so() -> None:
    lay = with_swap_file("plain-bookworm", size=0, reason="no such file on the source")
    plan = completed_plan(lay)
    assert plan.swap_file is None and plan.swap_partition is None and plan.source_swap == 0
    line = next(c for c in plan.fstab if c.spec == "/swap.img")
    assert (line.action, line.reason) == ("remove", "no such file on the source: no swap planned for it")
    assert any("which it does not hold" in note for note in plan.notes)


def test_a_layout_without_the_swap_files_size_asks_for_inspect_again() -> None:
    lay = with_swap_file("plain-bookworm")
    del next(e for e in lay["fstab"] if e["status"] == "swapfile")["size"]
    with pytest.raises(P2VError, match="without its size") as error:
        completed_plan(lay)
    assert "inspect" in str(error.value.hint)


# ---------------------------------------------------------------- every word about swap is true


def _cases() -> list[tuple[str, str]]:
    names = [*RECORDED, *VARIANTS, *(f"synthetic:{name}" for name in SYNTHETIC_TREES)]
    return [(name, choice) for name in names for choice in CHOICES]


def _layout_and_fstab(name: str, root: Path) -> tuple[dict[str, Any], str]:
    if name.startswith("synthetic:"):
        lay = synthetic_layout(name.removeprefix("synthetic:"), root)
    elif name in VARIANTS:
        fixture, make = VARIANTS[name]
        lay = make()
        fixture_tree(fixture, lay, root)
    else:
        lay = layout(name)
        fixture_tree(name, lay, root)
    return lay, (root / "etc" / "fstab").read_text()


def _planned_areas(plan: DiskPlan) -> dict[str, str]:
    """fstab spec -> what it is, for every swap area the plan makes."""
    areas = {}
    part = plan.swap_partition
    if part is not None and part.swap is not None:
        areas[f"UUID={part.swap.uuid}"] = f"partition {part.number}"
        if part.swap.label:
            areas[f"LABEL={part.swap.label}"] = f"partition {part.number}"
    if plan.swap_file is not None:
        areas[plan.swap_file.path] = "file"
    return areas


def _check_claim(text: str, plan: DiskPlan, lay: dict[str, Any], where: str) -> None:
    """Every swap claim in `text` names something the plan does."""
    part = plan.swap_partition
    for number in re.findall(r"swap partition (?:p)?(\d+)", text):
        assert part is not None and part.number == int(number), f"{where}: {text!r} names a partition not planned"
    for path in re.findall(r"swap file (/[^\s,;)]+)", text):
        planned = plan.swap_file.path if plan.swap_file is not None else None
        source_files = [e["spec"] for e in lay["fstab"] if e["status"] == "swapfile"]
        if path != planned:
            # Only a source's own swap file may be named otherwise: as not copied, not held, or dropped.
            assert path in source_files, f"{where}: {text!r} names a swap file the plan does not make"
    if "swap: none" in text:
        assert plan.policy.swap == "none", f"{where}: {text!r}"
    if "made by the fix stage" in text:
        assert plan.swap_file is not None, f"{where}: {text!r}"


@pytest.mark.parametrize(("name", "choice"), _cases())
def test_fstab_plan_and_receipt_say_what_the_plan_does(name: str, choice: str, tmp_path: Path) -> None:
    lay, text = _layout_and_fstab(name, tmp_path / "tree")
    plan = completed_plan(lay, swap=choice)
    areas = _planned_areas(plan)
    had = source_swap(lay)
    assert plan.source_swap == had
    # As much swap as the source had, unless the spec says none.
    planned = (plan.swap_partition.size if plan.swap_partition else 0) + \
        (plan.swap_file.size if plan.swap_file else 0)
    if choice == "none" or not had:
        assert planned == 0 and not areas
    else:
        assert planned >= had
    new, warnings = rewrite_fstab(text, plan)
    assert warnings == []
    entries, _ = parse_fstab(new)
    active = [e.spec for e in entries if e.vfstype == "swap"]
    # Each planned swap area has exactly one line; no other swap line is left active.
    assert sorted(active) == sorted({spec for spec, what in areas.items()
                                     if not spec.startswith("LABEL=") or spec in active}), new
    assert len(set(map(areas.get, active))) == len(active)
    for line in new.splitlines():
        if line.startswith(REMOVED_MARK):
            reason = line[len(REMOVED_MARK):].split("): ", 1)[0].lstrip(" (")
            removed = line.split("): ", 1)[1]
            _check_claim(reason, plan, lay, f"fstab comment {line!r}")
            if "merged into the swap file" in reason or "merged into swap partition" in reason:
                assert areas, line
            if "no swap planned for it" in reason:
                spec = removed.split()[0]
                assert next(e for e in lay["fstab"] if e["spec"] == spec).get("size") == 0
    for note in plan.notes:
        _check_claim(note, plan, lay, f"plan note {note!r}")
    table = render_plan(plan)
    _check_claim(table, plan, lay, "the plan table")
    summary = swap_summary(plan)
    if plan.swap_partition is not None:
        assert f"swap partition p{plan.swap_partition.number}" in summary
    if plan.swap_file is not None:
        assert f"swap file {plan.swap_file.path}" in summary and plan.swap_file.path in table
    if not areas:
        assert "none planned" in summary
    _check_claim(fstab_why(plan), plan, lay, "the fstab step's receipt")
