"""`doit sync:<host>`: inspect -> disk -> sync against fixture servers, for real.

The copy engine has its own tests (test_copy.py); these prove the stage:
flatten for every fixture (LVM through the read-only fallback), keep for
plain-bookworm, every hard-to-copy file checked one by one in the image, the
source untouched, nothing left attached, a SIGKILLed copy resumed, and a full
work area refused with the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.plan import DiskPlan
from tasks.lib.resources import RUN_DIR, loop_device, mounted
from tasks.lib.runner import run
from tasks.lib.spec import PROJECT_DIR
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import sha256
from tests.fixtures.oddities import read_manifest
from tests.integration.test_inspect import host_leftovers, make_spec, own_images

SERVERS = ["plain-bookworm", "lvm-bookworm", "plain-bullseye", "plain-trixie"]


def doit(spec_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2V_SPECS": str(spec_dir)}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, check=False, timeout=1200)


@contextlib.contextmanager
def image_tree(image: Path, plan: DiskPlan, scratch: Path) -> Iterator[Path]:
    """The synced image, read-only, mounted as its plan says."""
    scratch.mkdir(exist_ok=True)  # child mount points exist in the image itself
    with contextlib.ExitStack() as stack:
        loop = stack.enter_context(loop_device(image, read_only=True, partitions=True))
        for mountpoint in plan.mount_order:
            part = plan.partition_of(mountpoint)
            assert part.filesystem is not None
            point = scratch / mountpoint.lstrip("/")
            options = ["ro", "norecovery", "nouuid"] if part.filesystem.fstype == "xfs" else ["ro", "noload"]
            stack.enter_context(mounted(loop.partition(part.number), point, fstype=part.filesystem.fstype,
                                        options=options))
        yield scratch


def oddity_failures(server: FixtureServer, tree: Path) -> tuple[int, list[str]]:
    """Each hard-to-copy file the fixture builder recorded, compared in the copy."""
    failures: list[str] = []
    checked = 0
    for point, expected in server.manifest_entries().items():
        got = {entry["path_hex"]: entry for entry in read_manifest(tree / point.lstrip("/"), point)}
        for want in expected:
            checked += 1
            entry = got.get(want["path_hex"])
            what = f"{want['path']} ({want['purpose'] or want['type']})"
            if entry is None:
                failures.append(f"{what}: missing")
                continue
            for key in ("type", "mode", "uid", "gid", "nlink", "mtime_ns", "link_group", "acl_access",
                        "acl_default", "target_hex", "rdev"):
                if want[key] != entry[key]:
                    failures.append(f"{what}: {key} {want[key]!r} != {entry[key]!r}")
            if want["type"] != "dir" and want["size"] != entry["size"]:
                failures.append(f"{what}: size {want['size']} != {entry['size']}")
            user_xattrs = {k: v for k, v in want["xattrs"].items() if k.startswith("user.")}
            if {k: v for k, v in entry["xattrs"].items() if k.startswith("user.")} != user_xattrs:
                failures.append(f"{what}: xattrs {want['xattrs']} != {entry['xattrs']}")
            if want["type"] == "file" and want["blocks"] * 512 < want["size"] <= entry["blocks"] * 512:
                failures.append(f"{what}: no longer sparse ({entry['blocks']} blocks)")
    return checked, failures


@pytest.fixture(scope="module", params=SERVERS)
def synced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server = build_server(request.param)
    project = tmp_path_factory.mktemp(f"sync-{server.name}")
    before = {image: sha256(image) for image in server.disks}
    spec_dir = make_spec(project, server.name, own_images(server.disks, project))
    result = doit(spec_dir, f"sync:{server.name}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workdir = project / "work" / server.name
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, project / "mnt") as tree:
        checked, failures = oddity_failures(server, tree)
    return {
        "server": server, "workdir": workdir, "spec_dir": spec_dir, "plan": plan,
        "stamp": json.loads((workdir / "rootfs-synced.stamp").read_text()),
        "checked": checked, "failures": failures, "before": before,
        "after": {image: sha256(image) for image in server.disks},
        "leftovers": host_leftovers(spec_dir),
        "output": result.stdout + result.stderr,
    }


def test_flatten_plan_gives_one_root_filesystem_holding_everything(synced: dict[str, Any]) -> None:
    plan: DiskPlan = synced["plan"]
    assert plan.policy.layout == "flatten"
    sources = {source.mountpoint for fs in plan.filesystems for source in fs.sources}
    assert sources == {f["mountpoint"] for f in synced["server"].facts["filesystems"] if f.get("mountpoint")}
    assert plan.mount_order[0] == "/"


def test_every_hard_to_copy_file_survives_in_the_image(synced: dict[str, Any]) -> None:
    assert synced["checked"] > 80
    assert synced["failures"] == [], "\n".join(synced["failures"])


def test_stamp_is_a_receipt_of_a_verified_copy(synced: dict[str, Any]) -> None:
    stamp = synced["stamp"]
    assert stamp["format"] == "p2v-sync-stamp" and stamp["host"] == synced["server"].name
    receipt = stamp["copy"]
    assert receipt["manifest_digest"].startswith("sha256:")
    assert receipt["files"] > 10000
    assert "rsync" in json.dumps(receipt["tools"])
    # target.copy: auto. Every fixture's / keeps its type and features: it went by blocks (shrunk in place,
    # or grown), everything merged into it by files; the manifest above covers both.
    methods = {row["mountpoint"]: row for row in receipt["methods"]}
    plan: DiskPlan = synced["plan"]
    for copy in plan.copies:
        assert methods[copy.source_mountpoint]["method"] == copy.method, methods
    assert methods["/"]["method"] == "blocks" or plan.filesystem("/").fstype == "xfs", methods
    blocks = [p for p in receipt["filesystems"] if p["tool"] in ("e2image", "xfs_copy")]
    assert [p["mountpoint"] for p in blocks] == [c.source_mountpoint for c in plan.block_copies]
    for row in (r for r in receipt["methods"] if r["method"] == "blocks"):  # this work area punches holes
        assert row["released"] >= 0 and "trim_failed" not in row, row


def test_source_untouched_and_nothing_left(synced: dict[str, Any]) -> None:
    assert synced["before"] == synced["after"]
    assert synced["leftovers"] == []


def test_progress_shown(synced: dict[str, Any]) -> None:
    assert "ETA" in synced["output"]


def test_rerun_does_nothing(synced: dict[str, Any]) -> None:
    again = doit(synced["spec_dir"], f"sync:{synced['server'].name}")
    assert again.returncode == 0
    for stage in ("inspect", "disk", "sync"):
        assert f"-- {stage}:{synced['server'].name}" in again.stdout


def test_keep_policy_one_partition_per_source_mount(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    spec_dir = make_spec(tmp_path, "keepme", own_images(server.disks, tmp_path), extra="target:\n  layout: keep\n")
    result = doit(spec_dir, "sync:keepme")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workdir = tmp_path / "work" / "keepme"
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    assert sorted(fs.mountpoint for fs in plan.filesystems) == ["/", "/boot", "/srv"]
    assert {fs.mountpoint: fs.fstype for fs in plan.filesystems} == {"/": "ext4", "/boot": "ext4", "/srv": "xfs"}
    assert any(part.swap is not None for part in plan.partitions)
    with image_tree(workdir / "disk.img", plan, tmp_path / "mnt") as tree:
        checked, failures = oddity_failures(server, tree)
    assert checked > 80 and failures == [], "\n".join(failures)
    assert host_leftovers(spec_dir) == []


def sync_in_background(tmp_path: Path, host: str, output: int
                       ) -> tuple[FixtureServer, Path, Path, subprocess.Popen[str]]:
    """plain-bookworm's disk stage done (copy by files), then `doit sync:<host>` started in a session of its own."""
    server = build_server("plain-bookworm")
    # copy: files: these tests stop tar and rsync; a block copy's kill is in tests/integration/test_blocks.py.
    spec_dir = make_spec(tmp_path, host, own_images(server.disks, tmp_path), extra="target:\n  copy: files\n")
    assert doit(spec_dir, f"disk:{host}").returncode == 0
    env = {**os.environ, "P2V_SPECS": str(spec_dir)}
    victim = subprocess.Popen([sys.executable, "-m", "doit", f"sync:{host}"], cwd=PROJECT_DIR, env=env,
                              stdout=output, stderr=output, text=True, start_new_session=True)
    return server, spec_dir, tmp_path / "work" / host, victim


def test_killed_copy_resumes_and_copies_less(tmp_path: Path) -> None:
    server, spec_dir, workdir, victim = sync_in_background(tmp_path, "killme", output=subprocess.DEVNULL)
    image = workdir / "disk.img"
    deadline = time.monotonic() + 300
    # Kill it once a good part (but not all) of the data is in the target
    # filesystem: statvfs of the mounted target sees writes still in the page
    # cache, which the image file only sees after writeback.
    written = 0
    while written < 100 << 20:
        assert victim.poll() is None, "the copy finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
        roots = [root for root in RUN_DIR.glob("killme-*/target-*") if os.path.ismount(root)]
        if roots:
            with contextlib.suppress(OSError):
                usage = os.statvfs(roots[0])
                written = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    written_before_kill = written
    assert not (workdir / "rootfs-synced.stamp").exists()

    resumed = doit(spec_dir, "sync:killme")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "released what an interrupted run left" in resumed.stdout + resumed.stderr
    receipt = json.loads((workdir / "rootfs-synced.stamp").read_text())["copy"]
    transferred = sum(fs["bytes_transferred"] for fs in receipt["filesystems"])
    # A full first copy moves every byte of the tree (receipt["bytes"], apparent sizes, as rsync and tar count).
    print(f"\nkilled after ~{written_before_kill >> 20} MiB were in the image; the rerun moved "
          f"{transferred >> 20} MiB of the tree's {receipt['bytes'] >> 20} MiB")
    print(json.dumps(receipt["filesystems"], indent=1))
    assert any(fs["resumed"] for fs in receipt["filesystems"])
    assert 0 < transferred < receipt["bytes"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(image, plan, tmp_path / "mnt") as tree:
        checked, failures = oddity_failures(server, tree)
    assert checked > 80
    assert failures == [], "\n".join(failures)
    assert host_leftovers(spec_dir) == []


def test_sigterm_during_the_copy_releases_everything_before_exiting(tmp_path: Path) -> None:
    """A CI timeout or a closed terminal sends SIGTERM: the stage unwinds like ^C, so nothing stays
    mounted or attached even before the next run, and the run ends with one line."""
    _server, spec_dir, workdir, victim = sync_in_background(tmp_path, "termme", output=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not [root for root in RUN_DIR.glob("termme-*/target-*") if os.path.ismount(root)]:
        assert victim.poll() is None, "the sync ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)  # into the copy
    victim.send_signal(signal.SIGTERM)  # doit alone, not its group: the stage must stop its tools itself
    stdout, stderr = victim.communicate(timeout=120)
    assert victim.returncode != 0
    stopped = [line for line in (stdout + stderr).splitlines() if "stopped by SIGTERM" in line]
    assert stopped and "Traceback" not in stderr, stdout[-2000:] + stderr[-2000:]
    assert not (workdir / "rootfs-synced.stamp").exists()
    # Released by the stopped run itself, not left for the next one.
    assert host_leftovers(spec_dir) == []
    assert "stopped by SIGTERM" in (workdir / "logs" / "sync.log").read_text()
    resumed = doit(spec_dir, "sync:termme")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "released what an interrupted run left" not in resumed.stdout + resumed.stderr


def test_full_work_area_is_refused_with_the_numbers(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    work = tmp_path / "small-work"
    work.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(work)])
    try:
        spec_dir = make_spec(tmp_path, "tiny", own_images(server.disks, tmp_path), extra=f"workdir: {work}/tiny\n")
        result = doit(spec_dir, "sync:tiny")
        assert result.returncode != 0
        assert "sync:tiny: the work area" in result.stdout
        assert "MiB free, and the copy needs about" in result.stdout
        assert not (work / "tiny" / "rootfs-synced.stamp").exists()
        assert host_leftovers(spec_dir) == []
    finally:
        run(["umount", str(work)])
