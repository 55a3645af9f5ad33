"""A server that lost power, converted end to end: what it fsync'ed last is in the image.

The plain-bookworm fixture (/ ext4 on disk1, /srv xfs on disk2) is copied,
its / and /srv are mounted read-write, a file is written and fsync'ed on
each, and the disk images are copied while still mounted
(tests/fixtures/powercut.py). Mounted as p2v used to mount every source
(ro,noload / ro,norecovery), those copies lack both files. `doit report:`
then runs inspect, disk, sync, fix and verify (a boot on virtio) and the
report, once. The files must be in the converted image, layout.json must
record both filesystems as needing recovery, the sync receipt and report.md
must say "journal replayed" for both, the source images must hash the same,
and nothing may stay mounted, attached or running.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.plan import DiskPlan
from tasks.lib.spec import load_specs
from tests.e2e.test_convert import conversion_spec, doit
from tests.fixtures.build import build_server
from tests.fixtures.cache import sha256
from tests.fixtures.powercut import Cut, needs_recovery, power_cut, read_only_view, source_node, write_synced
from tests.integration.test_replay import leftovers
from tests.integration.test_sync import image_tree

HOST = "plain-bookworm"
WRITTEN = {"/": ("root", "var/lib/p2v-power-cut.txt"), "/srv": ("srv", "p2v-power-cut.txt")}  # mount -> (tag, path)
WHERE = {"/": (0, 2), "/srv": (1, 1)}  # mount -> (disk index, partition) on plain-bookworm


def words(tag: str) -> str:
    return f"{tag}: written and fsync'ed just before the power cut\n"


def writer(tag: str, path: str) -> Callable[[Path], None]:
    return lambda tree: write_synced(tree / path, words(tag))


@pytest.fixture(scope="module")
def power_cut_conversion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fixture = build_server(HOST)
    root = tmp_path_factory.mktemp("power-cut")
    sources = [root / disk.name for disk in fixture.disks]
    started = time.monotonic()
    cuts = [Cut(fixture.disks[WHERE[mount][0]], WHERE[mount][1], writer(tag, path), absent=(path,))
            for mount, (tag, path) in WRITTEN.items()]
    attempts = power_cut(cuts, dict(zip(fixture.disks, sources, strict=True)))
    cut_seconds = time.monotonic() - started
    server = dataclasses.replace(fixture, disks=tuple(sources))
    project = root / "project"
    spec_dir = conversion_spec(project, server, "flatten")
    before = {image: sha256(image) for image in sources}
    started = time.monotonic()
    result = doit(spec_dir, f"report:{HOST}")
    seconds = time.monotonic() - started
    workdir = project / "work" / HOST
    print(f"\npower cut in {cut_seconds:.0f} s ({attempts} attempt(s)); conversion to the report: {seconds:.0f} s")
    (spec,) = load_specs(spec_dir)
    return {"result": result, "workdir": workdir, "sources": sources, "before": before, "root": root,
            "after": {image: sha256(image) for image in sources},
            "leftovers": leftovers(spec, [*sources, workdir / "disk.img"])}


def test_the_sources_are_power_cut(power_cut_conversion: dict[str, Any], tmp_path: Path) -> None:
    """The precondition, proved: without the journal neither file is there, and both filesystems say so."""
    point = tmp_path / "mnt"
    point.mkdir()
    for mount, (_tag, path) in WRITTEN.items():
        disk, partition = WHERE[mount]
        with source_node(power_cut_conversion["sources"][disk], partition) as node:
            assert needs_recovery(node), mount
            with read_only_view(node, point):
                assert not (point / path).exists(), mount


def test_conversion_succeeded(power_cut_conversion: dict[str, Any]) -> None:
    result = power_cut_conversion["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_the_last_writes_are_in_the_converted_image(power_cut_conversion: dict[str, Any], tmp_path: Path) -> None:
    workdir = power_cut_conversion["workdir"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, tmp_path / "image") as tree:
        for mount, (tag, path) in WRITTEN.items():
            assert (tree / mount.lstrip("/") / path).read_text() == words(tag), mount


def test_layout_receipt_and_report_say_journal_replayed(power_cut_conversion: dict[str, Any]) -> None:
    workdir = power_cut_conversion["workdir"]
    layout = json.loads((workdir / "layout.json").read_text())
    recovery = {fs.get("mountpoint"): fs["needs_recovery"] for fs in layout["filesystems"]}
    assert recovery == {"/boot": False, "/": True, "/srv": True}
    devices = {fs["mountpoint"]: fs["device"] for fs in layout["filesystems"]}
    copy = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]
    assert copy["verified"] is True
    assert [(fs["device"], fs["mountpoint"]) for fs in copy["journal_replayed"]] == [
        (devices["/"], "/"), (devices["/srv"], "/srv")]
    report = (workdir / "report.md").read_text()
    replayed = [line for line in report.splitlines() if "journal replayed" in line]
    for mount in ("/", "/srv"):
        assert any(line.startswith(f"- journal replayed: {devices[mount]} ({mount}, ") for line in replayed), replayed
    assert not any(devices["/boot"] in line for line in replayed)
    verified = json.loads((workdir / "verified.stamp").read_text())
    assert [c["name"] for c in verified["checks"] if not c["ok"]] == []


def test_sources_untouched_and_nothing_left(power_cut_conversion: dict[str, Any]) -> None:
    assert power_cut_conversion["before"] == power_cut_conversion["after"]
    assert power_cut_conversion["leftovers"] == []  # loops, mounts, qemu-storage-daemons, overlay files
