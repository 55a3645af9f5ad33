"""A live build that fails leaves no mount, no chroot bind and no half-built directory behind.

The build itself (minutes) is exercised by tests/e2e/test_live_boot.py; here
a step fails while the chroot binds are up, and after debootstrap-style
mounts it did not undo itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from live.assemble import build_in_partial
from tasks.lib.resources import chroot_binds, mounts_below
from tasks.lib.runner import P2VError, run


class Boom(Exception):
    pass


def test_a_failure_inside_the_chroot_binds_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "live" / "0123456789ab"
    seen: list[str] = []

    def make(work: Path) -> None:
        tree = work / "tree"
        tree.mkdir()
        with chroot_binds(tree):
            seen.extend(mounts_below(work))
            raise Boom("dracut failed")

    with pytest.raises(Boom):
        build_in_partial(final, make)
    assert len(seen) >= 4  # dev, proc, sys, run were up
    assert mounts_below(tmp_path) == []
    assert not final.exists() and not final.with_name(final.name + ".partial").exists()


def test_mounts_a_failed_step_left_are_released(tmp_path: Path) -> None:
    final = tmp_path / "live" / "base-0123456789ab"

    def make(work: Path) -> None:
        # What debootstrap leaves when it fails half-way: /proc and /sys mounted in the tree.
        for name in ("proc", "sys"):
            (work / "tree" / name).mkdir(parents=True)
        run(["mount", "-t", "proc", "proc", str(work / "tree/proc")])
        run(["mount", "-t", "sysfs", "sysfs", str(work / "tree/sys")])
        raise P2VError("debootstrap failed")

    with pytest.raises(P2VError, match="debootstrap failed"):
        build_in_partial(final, make)
    assert mounts_below(tmp_path) == []
    assert not final.exists() and not final.with_name(final.name + ".partial").exists()


def test_a_partial_left_by_a_killed_build_is_replaced(tmp_path: Path) -> None:
    final = tmp_path / "live" / "0123456789ab"
    stale = final.with_name(final.name + ".partial")
    (stale / "tree/proc").mkdir(parents=True)
    run(["mount", "-t", "proc", "proc", str(stale / "tree/proc")])  # a SIGKILLed build's leftover
    (stale / "junk").write_text("half")

    def make(work: Path) -> None:
        (work / "manifest.json").write_text("{}")

    build_in_partial(final, make)
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]
    assert mounts_below(tmp_path) == []
    assert not stale.exists()
