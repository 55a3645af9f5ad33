"""The disk stage for real: sparse image, pyparted table, mkfs, read back.

The stage only reads layout.json, so each test copies a recorded layout into
a fresh workdir. Every image is checked from the outside: sfdisk for the
table, a read-only loop device with blkid, tune2fs/xfs_db and a read-only
mount for the filesystems; and nothing may stay attached, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import disk
from tasks import plan as plan_io
from tasks.lib import storage
from tasks.lib.pipeline import run_stage
from tasks.lib.plan import DiskPlan, MiB, PartitionPlan, made_differences, xfs_log_size
from tasks.lib.resources import loop_device, mounted, read_only_mount_options
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import PROJECT_DIR, Spec, load_specs
from tests.unit.layouts import LAYOUTS, with_extra_mounts, without_xfs

MakeSpec = Callable[..., Spec]


def leftovers(root: Path) -> list[str]:
    """Loop devices over files under `root`, and mounts under it, right now."""
    loops = run(["losetup", "-a"]).stdout
    mounts = run(["findmnt", "-rn", "-o", "TARGET"]).stdout
    found = [line for line in loops.splitlines() if str(root) in line]
    found += [line for line in mounts.splitlines() if line.startswith(str(root))]
    return found


@pytest.fixture
def make_spec(tmp_path: Path) -> MakeSpec:
    """make_spec(layout name or dict, **target) -> a loaded Spec whose workdir holds that layout.json."""
    def make(layout: str | dict[str, Any], /, host: str = "demo", **target: Any) -> Spec:
        source = tmp_path / f"{host}-source.img"
        source.write_bytes(b"")  # the disk stage never reads the source
        spec_dir = tmp_path / "specs"
        spec_dir.mkdir(exist_ok=True)
        workdir = tmp_path / "work" / host
        workdir.mkdir(parents=True, exist_ok=True)
        data = {"source": {"images": [str(source)]}, "workdir": str(workdir), "target": target}
        (spec_dir / f"{host}.yaml").write_text(yaml.safe_dump(data))
        text = (LAYOUTS / f"{layout}.json").read_text() if isinstance(layout, str) else json.dumps(layout)
        (workdir / "layout.json").write_text(text)
        spec = next(s for s in load_specs(spec_dir) if s.host == host)
        return spec

    return make


def run_disk(spec: Spec) -> DiskPlan:
    failed = run_stage(disk.STAGE, spec)
    assert failed is None, failed
    assert not spec.artifact("disk.img.partial").exists()
    return plan_io.read_disk_plan(spec.artifact("disk-plan.json"))


def artifacts(spec: Spec) -> list[str]:
    names = ("disk.img", "disk.img.partial", "disk-plan.json", "disk-plan.json.partial")
    return [name for name in names if spec.artifact(name).exists()]


@contextlib.contextmanager
def read_only_loop(image: Path) -> Iterator[Any]:
    with loop_device(image, read_only=True, partitions=True) as loop:
        yield loop


def check_table(image: Path, plan: DiskPlan) -> None:
    table = json.loads(run(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    assert table["label"] == {"msdos": "dos", "gpt": "gpt"}[plan.label]
    assert table["sectorsize"] == 512
    got = {p["node"]: p for p in table["partitions"]}
    assert len(got) == len(plan.partitions)
    for part in plan.partitions:
        entry = got[f"{image}{part.number}"]
        assert (entry["start"] * 512, entry["size"] * 512) == (part.start, part.size), (entry, part)
        if plan.label == "msdos":
            assert int(entry["type"], 16) == int(part.type_id, 16), (entry, part)
            assert entry.get("bootable", False) == ("boot" in part.flags), (entry, part)
        else:
            assert entry["type"].upper() == part.type_id, (entry, part)
    assert os.path.getsize(image) == plan.size


def check_filesystems(image: Path, plan: DiskPlan, mount_dir: Path) -> None:
    """Type, label, UUID and features as planned; free space at least data + headroom."""
    assert plan.complete
    with read_only_loop(image) as loop:
        for part in plan.partitions:
            if part.role in ("bios_boot", "extended"):
                continue
            node = loop.partition(part.number)
            probe = storage.probe(node)
            fstype = part.filesystem.fstype if part.filesystem else "swap"
            assert made_differences(part, probe, storage.fs_features(fstype, node)) == [], part
            uuid = part.filesystem.uuid if part.filesystem else part.swap.uuid if part.swap else None
            assert uuid and probe["UUID"].lower() == uuid.lower()
            if part.filesystem is not None and fstype in ("ext4", "ext3", "xfs"):
                # This machine's kernel has no CONFIG_XFS_SUPPORT_V4: xfs_db checked a v4 target above.
                if "crc=0" not in part.filesystem.features:
                    check_free_space(node, part, mount_dir)


def check_free_space(node: str, part: PartitionPlan, mount_dir: Path) -> None:
    fs = part.filesystem
    assert fs is not None
    point = mount_dir / f"p{part.number}"
    point.mkdir(parents=True, exist_ok=True)
    with mounted(node, point, fstype=fs.fstype, options=read_only_mount_options(fs.fstype)):
        usage = os.statvfs(point)
    available = usage.f_bavail * usage.f_frsize
    # The overhead estimate must hold: what users can write >= the data plus its headroom.
    assert available >= fs.used_bytes + fs.headroom, (fs.mountpoint, available, fs.used_bytes + fs.headroom)


def check_sparse(image: Path, plan: DiskPlan) -> None:
    """Only metadata is written: a few MiB per filesystem, plus each xfs log (mkfs.xfs zeroes it)."""
    stat = image.stat()
    allocated = stat.st_blocks * 512
    logs = sum(xfs_log_size(fs_part.size) for fs_part in plan.partitions
               if fs_part.filesystem is not None and fs_part.filesystem.fstype == "xfs")
    assert allocated <= logs + 8 * MiB * len(plan.partitions), (allocated, logs)
    assert allocated < stat.st_size // 10, (allocated, stat.st_size)


def check_all(spec: Spec, plan: DiskPlan, tmp_path: Path) -> None:
    image = spec.artifact("disk.img")
    check_table(image, plan)
    check_sparse(image, plan)
    check_filesystems(image, plan, tmp_path / "mnt")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- success


def test_flatten_plain_bookworm(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("plain-bookworm")
    plan = run_disk(spec)
    assert [p.role for p in plan.partitions] == ["swap", "filesystem"]
    root = plan.filesystem("/")
    assert "orphan_file" not in root.features and "metadata_csum_seed" not in root.features
    check_all(spec, plan, tmp_path)
    with read_only_loop(spec.artifact("disk.img")) as loop:
        features = storage.ext_features(loop.partition(2))["features"]
    assert "orphan_file" not in features and "metadata_csum_seed" not in features and "metadata_csum" in features
    fstab = {c.file: c for c in plan.fstab}
    assert fstab["/"].new_spec == f"UUID={root.uuid}"
    assert fstab["/boot"].action == "remove"
    assert (spec.log_dir / "disk.log").read_text().count("mkfs.ext4 -F") == 1


def test_keep_gpt_with_kept_uuids_and_labels(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("dracut-bookworm", layout="keep", label="gpt", keep_uuids=True)
    plan = run_disk(spec)
    assert [p.role for p in plan.partitions] == ["bios_boot", "filesystem", "swap", "filesystem", "filesystem"]
    check_all(spec, plan, tmp_path)
    layout = json.loads((LAYOUTS / "dracut-bookworm.json").read_text())
    source = {fs["mountpoint"]: fs for fs in layout["filesystems"] if fs.get("mountpoint")}
    with read_only_loop(spec.artifact("disk.img")) as loop:
        for fs in plan.filesystems:
            probe = storage.probe(loop.partition(plan.partition_of(fs.mountpoint).number))
            assert probe["UUID"] == source[fs.mountpoint]["uuid"]
            assert probe.get("LABEL", "") == source[fs.mountpoint]["label"]
        swap = next(p for p in plan.partitions if p.role == "swap")
        assert storage.probe(loop.partition(swap.number))["UUID"] == layout["swaps"][0]["uuid"]


def test_keep_msdos_with_logical_partitions_and_trixie_features(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec(with_extra_mounts("plain-trixie", ["/var", "/home"]), layout="keep")
    plan = run_disk(spec)
    assert [p.kind for p in plan.partitions][3:] == ["extended", "logical", "logical", "logical"]
    check_all(spec, plan, tmp_path)
    with read_only_loop(spec.artifact("disk.img")) as loop:
        root = storage.ext_features(loop.partition(plan.partition_of("/").number))
        srv = storage.xfs_features(loop.partition(plan.partition_of("/srv").number))
    assert {"metadata_csum_seed", "orphan_file"} <= set(root["features"])
    assert srv["features"]["nrext64"] == 1 and srv["features"]["rmapbt"] == 1


def test_root_fs_xfs_takes_the_sources_xfs_features(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("plain-bullseye", root_fs="xfs", swap="file")
    plan = run_disk(spec)
    assert [p.role for p in plan.partitions] == ["filesystem", "filesystem"]  # /boot kept, swap is a file
    assert plan.swap_file is not None
    check_all(spec, plan, tmp_path)
    with read_only_loop(spec.artifact("disk.img")) as loop:
        flags = storage.xfs_features(loop.partition(plan.partition_of("/").number))["features"]
    assert (flags["bigtime"], flags["inobtcount"], flags["reflink"]) == (0, 0, 1)


def test_old_kernel_baselines(make_spec: MakeSpec, tmp_path: Path) -> None:
    """CentOS 6 era: xfs v4 for a new xfs root; ext4 without 64bit/metadata_csum."""
    old = without_xfs("plain-bookworm", "2.6.32-754.el6.x86_64", bootloader="grub-legacy")
    spec = make_spec(old, root_fs="xfs")
    plan = run_disk(spec)
    assert "crc=0" in plan.filesystem("/").features
    assert [p.filesystem.mountpoint for p in plan.partitions if p.filesystem] == ["/boot", "/"]
    check_all(spec, plan, tmp_path)

    lay = json.loads((LAYOUTS / "lvm-bookworm.json").read_text())
    lay["filesystems"] = [f for f in lay["filesystems"] if f["type"] != "ext4"]
    lay["mounts"] = [m for m in lay["mounts"] if m["fstype"] != "ext4"]
    lay["fstab"] = [e for e in lay["fstab"] if e["vfstype"] != "ext4"]
    lay["system"]["kernels"][0]["version"] = "2.6.32-754.el6.x86_64"
    spec = make_spec(lay, host="old-ext4", root_fs="ext4")
    plan = run_disk(spec)
    check_all(spec, plan, tmp_path)
    with read_only_loop(spec.artifact("disk.img")) as loop:
        features = set(storage.ext_features(loop.partition(plan.partition_of("/").number))["features"])
    assert "uninit_bg" in features and not features & {"64bit", "metadata_csum", "orphan_file"}


# ---------------------------------------------------------------- failures


def test_failure_mid_stage_leaves_nothing(make_spec: MakeSpec, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec("lvm-bookworm")
    run_disk(spec)  # a previous good run: its disk.img and disk-plan.json must go too
    real = disk.make_filesystem
    calls: list[str] = []

    def second_fails(node: str, part: PartitionPlan) -> None:
        calls.append(node)
        if len(calls) == 2:
            raise P2VError("injected: mkfs failed")
        real(node, part)

    monkeypatch.setattr(disk, "make_filesystem", second_fails)
    failed = run_stage(disk.STAGE, spec)
    assert failed is not None and "injected: mkfs failed" in str(failed)
    assert len(calls) == 2
    assert artifacts(spec) == []
    assert leftovers(tmp_path) == []


def test_unexpected_exception_still_cleans_up(make_spec: MakeSpec, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec("plain-bookworm")

    def boom(*args: Any) -> dict[int, str]:
        raise RuntimeError("bug in read_back")

    monkeypatch.setattr(disk, "read_back", boom)
    with pytest.raises(RuntimeError, match="bug in read_back"):
        run_stage(disk.STAGE, spec)
    assert artifacts(spec) == []
    assert leftovers(tmp_path) == []


def test_unwritable_workdir_is_a_clear_error(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("plain-bookworm")
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    spec.state_dir.mkdir(parents=True, exist_ok=True)  # as after an earlier stage
    run(["chattr", "+i", str(spec.workdir)])  # even root cannot create files here
    try:
        failed = run_stage(disk.STAGE, spec)
    finally:
        run(["chattr", "-i", str(spec.workdir)])
    assert failed is not None
    assert f"cannot create the disk image {spec.artifact('disk.img.partial')}: Operation not permitted" in str(failed)
    # A workdir that has never been used: the first thing a stage writes is its host lock.
    shutil.rmtree(spec.state_dir)
    run(["chattr", "+i", str(spec.workdir)])
    try:
        failed = run_stage(disk.STAGE, spec)
    finally:
        run(["chattr", "-i", str(spec.workdir)])
    assert failed is not None
    assert f"cannot create {spec.state_dir / 'lock'}: Operation not permitted" in str(failed)
    assert "hint: the workdir must be writable" in str(failed)
    assert artifacts(spec) == []
    assert leftovers(tmp_path) == []


def test_target_too_small_is_a_clear_error(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("plain-bookworm", size="1G")
    failed = run_stage(disk.STAGE, spec)
    assert failed is not None
    assert "target size 1024 MiB is too small: the data needs" in str(failed)
    assert artifacts(spec) == []


# ---------------------------------------------------------------- through doit

DODO = '''
import os
from pathlib import Path

from tasks import disk
from tasks.lib.pipeline import stage_tasks
from tasks.lib.spec import load_specs
from tasks.plan import plan_tasks

DOIT_CONFIG = {"backend": "p2v-hosts", "dep_file": os.environ["P2V_TEST_GLOBAL_DEP"], "default_tasks": []}
SPECS = load_specs(Path(os.environ["P2V_SPECS"]))


def task_plan():
    yield from plan_tasks(SPECS)


def task_disk():
    yield from stage_tasks(disk.STAGE, SPECS)
'''


def test_plan_and_disk_through_doit(make_spec: MakeSpec, tmp_path: Path) -> None:
    spec = make_spec("lvm-bookworm", layout="keep")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "dodo.py").write_text(DODO)
    (run_dir / "doit.cfg").write_text((PROJECT_DIR / "doit.cfg").read_text())
    env = {**os.environ, "P2V_SPECS": str(tmp_path / "specs"), "PYTHONPATH": str(PROJECT_DIR),
           "P2V_TEST_GLOBAL_DEP": str(run_dir / "global-dep.json")}

    def doit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "doit", *args], cwd=run_dir, env=env, capture_output=True,
                              text=True, check=False, timeout=300)

    shown = doit("plan:demo")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "demo: keep, msdos" in shown.stdout and "/var/log" in shown.stdout
    assert artifacts(spec) == []
    made = doit("disk:demo")
    assert made.returncode == 0, made.stdout + made.stderr
    assert artifacts(spec) == ["disk.img", "disk-plan.json"]
    again = doit("disk:demo")
    assert "-- disk:demo" in again.stdout  # up to date: layout.json and the policy did not change
    assert leftovers(tmp_path) == []
