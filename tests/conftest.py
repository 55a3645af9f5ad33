"""Test tiers: unit (default, no root), integration (root, loop devices), e2e (qemu).

A test's tier comes from its folder; tests that need root skip, with the
reason, when not run as root.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scratch import drop_large_files

pytest_plugins = ["tests.fixtures.plugin", "tests.services.fixture"]

TIERS = ("unit", "integration", "e2e")


# What the integration and e2e tiers need free under pytest's temporary directory
# at the start (images of a batch conversion, Glance's store, fixture builds into
# the cache on the same disk); P2V_TEST_MIN_FREE_GIB sets another figure.
MIN_FREE_GIB = float(os.environ.get("P2V_TEST_MIN_FREE_GIB", "15"))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI timeout or `kill` sends SIGTERM: end the session as ^C does, so that every
    # fixture's teardown runs (services, namespaces, mounts, qemu) instead of none.
    signal.signal(signal.SIGTERM, _interrupt)


# P2V_TEST_TIMELINE=<file>: one line per test phase as the controller hears of it (wall time,
# worker, phase, its duration, test id), to see which file ran where and when: the end of a run
# where one worker idles comes from the order files were handed out in (LONGEST_FIRST below).
TIMELINE = os.environ.get("P2V_TEST_TIMELINE")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not TIMELINE or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller writes it (or a run in one process)
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", "main")
    with open(TIMELINE, "a") as handle:
        handle.write(f"{time.time():.1f} {worker} {report.when} {report.duration:.1f} {report.nodeid}\n")


def _free_gib(path: Path) -> float:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize / (1 << 30)


# bin/test hands test files to two workers in this order (pytest-xdist, --dist loadfile
# --no-loadscope-reorder): the longest first, so that no long file starts last while the other
# worker idles. Roughly measured minutes with a warm cache; an order, not a promise.
LONGEST_FIRST = (
    "e2e/test_convert.py",  # the batch: every fixture converted, two uploaded and booted (~24)
    "e2e/test_pxe_convert.py",  # two PXE boots that refuse (~11)
    "e2e/test_md_lvm_paths.py",  # one live-guest job (~6; 10.5 before its disks went from 1 GiB to 256 MiB)
    "e2e/test_convert_swap_file.py",
    # The fixtures' own boots keep their own systemd timeouts (90 s for a mount), which twice ran
    # out beside the batch's conversions: after them, when the batch is past its copies.
    "e2e/test_fixture_boot.py",  # every fixture booted (~6)
    "e2e/test_power_cut.py",
    "e2e/test_convert_uefi.py",
    "e2e/test_live_boot.py",
    "e2e/test_convert_initrd.py",
    "integration/test_sync.py",
    "integration/test_inspect.py",
    "integration/test_kill_matrix.py",  # two conversions to fix, one of them killed eight times (~3.5)
    "integration/test_copy.py",
    "integration/test_fixtures.py",
    "integration/test_upload.py",
    "integration/test_bad_sources.py",
)


def _file_rank(item: pytest.Item) -> tuple[int, int]:
    path = Path(str(item.fspath))
    relative = f"{path.parent.name}/{path.name}"
    tier = TIERS.index(path.parent.name) if path.parent.name in TIERS else len(TIERS)
    longest = LONGEST_FIRST.index(relative) if relative in LONGEST_FIRST else len(LONGEST_FIRST)
    return (longest, -tier)  # then e2e before integration before unit


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_file_rank)  # stable: a file's tests keep their order and stay together
    heavy = any(Path(str(item.fspath)).parent.name in ("integration", "e2e") for item in items)
    if heavy and os.geteuid() == 0:
        base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        free = _free_gib(base)
        if free < MIN_FREE_GIB:
            # One line now, rather than a run that fills the disk half-way and fails everywhere.
            pytest.exit(f"only {free:.1f} GiB free under {base}; the integration and e2e tests need "
                        f"{MIN_FREE_GIB:.0f} GiB: free some (old /tmp/pytest-of-*, `bin/openstack-services wipe`, "
                        "stale entries in $P2V_CACHE) or set P2V_TEST_MIN_FREE_GIB", returncode=3)
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("integration", "e2e") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"{tier} tests need root (loop devices, mounts)"))


@pytest.fixture(autouse=True)
def _drop_images_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A passed test's tmp_path goes whole (pyproject: retention "failed"); a failed
    test's keeps its logs but not its images, so failures cannot fill the disk."""
    # Asked for at setup (the test asks for it anyway), so that this teardown runs
    # before tmp_path's own.
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and path.exists():
        drop_large_files(path)


# Session-scoped services keep their state (Glance's image store) for the whole run.
SESSION_DIRS = ("openstack",)


@pytest.fixture(scope="module", autouse=True)
def _drop_module_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What a module's fixtures made with tmp_path_factory (sources, disk.img, overlays)
    loses its images when the module is done; set up first, so torn down last, after
    those fixtures have unmounted and detached what they used."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for entry in set(base.iterdir()) - before:
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(SESSION_DIRS):
            drop_large_files(entry)
