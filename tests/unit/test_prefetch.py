"""The prefetch's order: what each build needs is done before it starts (pure planning)."""

from __future__ import annotations

import pytest

from tests.fixtures.description import BASE_PACKAGES, load_description
from tests.fixtures.rootfs import INSTALL_AFTERWARDS, base_packages, rootfs_key
from tests.prefetch import Job, jobs, next_ready

pytestmark = pytest.mark.unit


def _noop() -> str:
    return ""


def test_every_need_is_a_job_listed_before_its_dependant() -> None:
    listed = jobs()
    seen: set[str] = set()
    for job in listed:
        assert job.needs <= seen, (job.name, job.needs - seen)
        seen.add(job.name)
    assert len(seen) == len(listed)


def test_each_fixture_needs_the_tree_it_extracts_and_a_derived_tree_needs_its_plain_one() -> None:
    by_name = {job.name: job for job in jobs()}
    for name, job in by_name.items():
        if not name.startswith("fixture "):
            continue
        desc = load_description(job.args[0])
        tree = f"root tree {rootfs_key(desc.suite, desc.install_packages)}"
        assert job.needs == {tree}
        base = base_packages(desc.install_packages)
        if base is not None:
            assert by_name[tree].needs == {f"root tree {rootfs_key(desc.suite, base)}"}


def test_a_tree_with_dracut_is_made_from_the_plain_tree_of_its_suite() -> None:
    plain = (*BASE_PACKAGES, "initramfs-tools")
    assert base_packages(plain) is None
    with_dracut = (*BASE_PACKAGES, *INSTALL_AFTERWARDS)
    assert base_packages(with_dracut) == tuple(sorted(plain))
    # Its key names the plain tree's: a new plain tree makes a new derived one.
    assert rootfs_key("bookworm", with_dracut) != rootfs_key("bookworm", plain)


def test_next_ready_takes_the_first_job_whose_needs_are_done() -> None:
    a = Job("a", _noop)
    b = Job("b", _noop, needs=frozenset({"a"}))
    c = Job("c", _noop)
    assert next_ready([b, c], done=set()) is c
    assert next_ready([b, c], done={"a"}) is b
    assert next_ready([b], done=set()) is None
    assert next_ready([a], done=set()) is a
