"""`doit inspect:<host>` against fixture servers built for real.

Each layout.json is compared with the fixture builder's ground truth
(facts.json); the source images must hash the same before and after, and
nothing p2v attached or mounted may outlive the run, also when it fails.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tasks import inspect
from tasks.lib.pipeline import run_stage
from tasks.lib.resources import host_run_dir, loop_device, mounted
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import PROJECT_DIR, load_specs
from tasks.lib.storage import kernel_has_device_mapper
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import sha256

SERVERS = ["plain-bookworm", "lvm-bookworm", "plain-bullseye", "plain-trixie", "uefi-bookworm"]


def _base_device(device: str) -> str:
    """/dev/loop3p2 -> /dev/loop3: a partition counts as its loop device."""
    return re.sub(r"(/dev/loop\d+)p\d+$", r"\1", device)


def leftovers(images: Sequence[Path], run_dirs: Sequence[Path]) -> list[str]:
    """Loop devices over `images` (and the loops on those: an LV's offset loops) or
    over files in `run_dirs` (FUSE exports), and mounts in `run_dirs` or of those
    loops, right now. Only the caller's: another test (or worker) may hold others.
    """
    table = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).stdout
    attached = {name: backing.strip().removesuffix(" (deleted)")
                for name, _, backing in (line.strip().partition(" ") for line in table.splitlines()) if backing}
    names = {str(image) for image in images}
    exports = tuple(f"{directory}/" for directory in run_dirs)
    ours = {name for name, backing in attached.items() if backing in names or backing.startswith(exports)}
    while grown := {name for name, backing in attached.items() if _base_device(backing) in ours} - ours:
        ours |= grown
    found = sorted(f"loop {name} on {attached[name]}" for name in ours)
    directories = [str(directory) for directory in run_dirs]
    prefixes = tuple(f"{directory}/" for directory in directories)
    for line in run(["findmnt", "-rn", "-o", "SOURCE,TARGET"]).stdout.splitlines():
        source, _, target = line.partition(" ")
        if target in directories or target.startswith(prefixes) or _base_device(source) in ours:
            found.append(f"mount {source} on {target}")
    return found


def host_leftovers(spec_dir: Path) -> list[str]:
    """leftovers() of the hosts in `spec_dir` only: their source images and disk.img,
    their run directories. What a demo or another test does meanwhile does not count."""
    specs = load_specs(spec_dir)
    images = [path for spec in specs
              for path in (*spec.source.images, spec.artifact("disk.img"), spec.artifact("disk.img.partial"))]
    return leftovers(images, [spec.run_dir for spec in specs])


def own_images(images: Sequence[Path], directory: Path) -> list[Path]:
    """Hard links to cached fixture images in a test's own directory: the loop devices
    p2v attaches name the links, which no other run uses (a demo reads the same cache)."""
    links = []
    for index, image in enumerate(images):
        link = directory / "images" / str(index) / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(image, link)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            return list(images)  # the cache is on another filesystem: the shared names
        links.append(link)
    return links


def drop_own_images(directory: Path) -> None:
    """The links only: the cached images stay."""
    for link in (directory / "images").glob("*/*"):
        link.unlink()


def make_spec(project: Path, host: str, images: list[Path], extra: str = "") -> Path:
    spec_dir = project / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"    - {image}\n" for image in images)
    (spec_dir / f"{host}.yaml").write_text(f"source:\n  images:\n{lines}{extra}")
    return spec_dir


def doit(spec_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2V_SPECS": str(spec_dir)}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> FixtureServer:
    return build_server(request.param)


@pytest.fixture(scope="module")
def inspected(server: FixtureServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    project = tmp_path_factory.mktemp(server.name)
    images = own_images(server.disks, project)
    before = {image: sha256(image) for image in images}
    spec_dir = make_spec(project, server.name, images)
    result = doit(spec_dir, f"inspect:{server.name}")
    assert result.returncode == 0, result.stdout + result.stderr
    layout_path = project / "work" / server.name / "layout.json"
    yield {
        "layout": json.loads(layout_path.read_text()),
        "bytes": layout_path.read_bytes(),
        "path": layout_path,
        "spec_dir": spec_dir,
        "before": before,
        "after": {image: sha256(image) for image in images},
        "leftovers": host_leftovers(spec_dir),
        "stdout": result.stdout + result.stderr,
    }
    drop_own_images(project)


def fs_by_mount(layout: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_device = {fs["device"]: fs for fs in layout["filesystems"]}
    return {m["mountpoint"]: by_device[m["device"]] for m in layout["mounts"]}


def test_source_untouched_and_nothing_left(inspected: dict[str, Any]) -> None:
    assert inspected["before"] == inspected["after"]
    assert inspected["leftovers"] == []


def test_partition_tables_match(server: FixtureServer, inspected: dict[str, Any]) -> None:
    layout = inspected["layout"]
    for fact_disk, disk in zip(server.facts["disks"], layout["disks"], strict=True):
        assert disk["size"] == fact_disk["size"]
        assert disk["table"]["type"] == ("gpt" if server.firmware == "uefi" else "msdos")
        assert disk["table"]["id"] == fact_disk["disk_id"].lower()
        got = [(p["number"], p["start"], p["size"], p["type"], p["bootable"]) for p in disk["table"]["partitions"]]
        want = [(p["number"], p["start"], p["size"], p["type_id"].lower(), p["bootable"])
                for p in fact_disk["partitions"]]
        assert got == want
    # BIOS: grub-pc's boot code in the MBR; UEFI: none (the firmware reads the ESP).
    assert layout["disks"][0]["boot_code"] == ("grub" if server.firmware == "bios" else None)


def test_mounts_types_uuids_labels_sizes_and_usage(server: FixtureServer, inspected: dict[str, Any]) -> None:
    mounts = fs_by_mount(inspected["layout"])
    facts = {fs["mountpoint"]: fs for fs in server.facts["filesystems"] if fs.get("mountpoint")}
    assert set(mounts) == set(facts)
    for point, fact in facts.items():
        got = mounts[point]
        assert got["type"] == fact["fstype"], point
        assert got["uuid"] == fact["uuid"].lower(), point  # FAT serials are upper case; layout.json lowers all
        assert got["label"] == (fact["label"] or ""), point
        # ext/xfs fill their partition; FAT's size is its data clusters (read by mtools, the fact by fsck.fat).
        assert (got["fs_size"] if got["type"] == "vfat" else got["size"]) == fact["size"], point
        assert abs(got["used_bytes"] - fact["used_bytes"]) <= 0.01 * fact["used_bytes"], point
    # mount order: parents first
    points = [m["mountpoint"] for m in inspected["layout"]["mounts"]]
    assert points[0] == "/" and points == sorted(points, key=lambda p: (p.count("/") if p != "/" else 0, p))


def test_swap_found(server: FixtureServer, inspected: dict[str, Any]) -> None:
    swaps = {s["uuid"]: s for s in inspected["layout"]["swaps"]}
    for fact in server.facts["swap"]:
        assert fact["uuid"] in swaps
        assert swaps[fact["uuid"]]["size"] == fact["size"]
        assert swaps[fact["uuid"]]["in_fstab"]


def test_lvm_segments_match(server: FixtureServer, inspected: dict[str, Any]) -> None:
    layout = inspected["layout"]
    groups = server.facts.get("lvm", {}).get("volume_groups", [])
    assert {v["name"] for v in layout["lvm"]["vgs"]} == {g["name"] for g in groups}
    for group in groups:
        lvs = {lv["name"]: lv for lv in layout["lvm"]["lvs"] if lv["vg"] == group["name"]}
        assert set(lvs) == {lv["name"] for lv in group["lvs"]}
        for fact_lv in group["lvs"]:
            lv = lvs[fact_lv["name"]]
            assert lv["size"] == fact_lv["size"]
            assert lv["uuid"] == fact_lv["uuid"]
            assert [(s["start_extent"], s["extents"], s["pv_ranges"][0]["first_extent"]) for s in lv["segments"]] == [
                (s["lv_start_extent"], s["extents"], s["pv_start_extent"]) for s in fact_lv["segments"]]


def test_os_kernels_virtio_and_bootloader(server: FixtureServer, inspected: dict[str, Any]) -> None:
    layout = inspected["layout"]
    system = layout["system"]
    assert system["os"]["id"] == server.facts["os"]["id"]
    assert system["os"]["version"].split(".")[0] == server.facts["os"]["version_id"]
    assert system["os"]["family"] == "debian"
    kernels = {k["version"]: k for k in system["kernels"]}
    assert set(kernels) == {k["version"] for k in server.facts["kernels"]}
    for fact in server.facts["kernels"]:
        virtio = kernels[fact["version"]]["virtio"]
        assert (virtio["virtio_blk"] in ("module", "builtin")) == fact["virtio_blk"]
        assert (virtio["virtio_net"] in ("module", "builtin")) == fact["virtio_net"]
    boot = layout["boot"]
    assert boot["bootloader"] == server.facts["bootloader"]["type"] == "grub2"
    assert boot["firmware"] == server.facts["bootloader"]["firmware"]
    assert boot["config_path"] == server.facts["bootloader"]["config"]
    assert system["initrd"]["tool"] == server.facts["initramfs"]["tool"]
    assert system["hostname"] == server.facts["hostname"]


def test_network_and_every_mac_binding(server: FixtureServer, inspected: dict[str, Any]) -> None:
    network = inspected["layout"]["system"]["network"]
    facts = server.facts["network"]
    assert facts["style"] in network["styles"]
    interfaces = {i["name"]: i for i in network["interfaces"]}
    for fact in facts["interfaces"]:
        assert fact["address"] in interfaces[fact["name"]]["addresses"]
        assert interfaces[fact["name"]]["gateway"] == fact["gateway"]
    got = sorted((b["file"], b["mac"], b["interface"]) for b in network["mac_bindings"])
    want = sorted((b["file"], b["mac"].lower(), b["interface"]) for b in facts["mac_bindings"])
    assert got == want


def test_deterministic_and_a_rerun_does_nothing(server: FixtureServer, inspected: dict[str, Any]) -> None:
    again = doit(inspected["spec_dir"], f"inspect:{server.name}")
    assert again.returncode == 0
    assert f"-- inspect:{server.name}" in again.stdout  # up to date: nothing ran
    inspected["path"].unlink()
    fresh = doit(inspected["spec_dir"], f"inspect:{server.name}")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert inspected["path"].read_bytes() == inspected["bytes"]


def test_summary_is_printed(server: FixtureServer, inspected: dict[str, Any]) -> None:
    assert f"{server.name}: {len(server.disks)} disk(s), root " in inspected["stdout"]
    assert "boot: grub2" in inspected["stdout"]


# ---------------------------------------------------------------- failures


def test_leftovers_are_the_tests_own_hosts_only(tmp_path: Path) -> None:
    """A demo reading the same cached image, or another host's mount, is not this test's leak; its own are."""
    cached = tmp_path / "cache" / "disk1.img"
    cached.parent.mkdir()
    with open(cached, "wb") as handle:
        handle.truncate(1 << 20)
    spec_dir = make_spec(tmp_path / "project", "mine", own_images([cached], tmp_path / "project"))
    (spec,) = load_specs(spec_dir)
    other_run_dir = host_run_dir("demo", tmp_path / "elsewhere")
    other_run_dir.mkdir(parents=True)
    spec.run_dir.mkdir(parents=True)
    try:
        with loop_device(cached, read_only=True), mounted("tmpfs", other_run_dir, fstype="tmpfs"):
            assert host_leftovers(spec_dir) == []
            with loop_device(spec.source.images[0], read_only=True) as loop, \
                    mounted("tmpfs", spec.run_dir, fstype="tmpfs"):
                assert host_leftovers(spec_dir) == [f"loop {loop.path} on {spec.source.images[0]}",
                                                    f"mount tmpfs on {spec.run_dir}"]
        assert host_leftovers(spec_dir) == []
    finally:
        other_run_dir.rmdir()
        spec.run_dir.rmdir()


@pytest.mark.parametrize("name", ["plain-bookworm", "lvm-bookworm"])
def test_failure_halfway_leaves_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail after every volume is attached and the tree is mounted."""
    server = build_server(name)
    images = own_images(server.disks, tmp_path)
    before = {image: sha256(image) for image in images}
    spec_dir = make_spec(tmp_path, "victim", images)
    (spec,) = load_specs(spec_dir)
    seen: list[str] = []

    def explode(root: Path) -> None:
        seen.extend(host_leftovers(spec_dir))  # things are attached at this point
        raise P2VError("injected failure while the tree is mounted")

    monkeypatch.setattr(inspect, "describe_system", explode)
    failure = run_stage(inspect.STAGE, spec)
    assert failure is not None and "injected failure" in str(failure)
    assert seen, "the failure was injected before anything was attached"
    assert host_leftovers(spec_dir) == []
    assert not spec.artifact("layout.json").exists()
    assert {image: sha256(image) for image in images} == before
    drop_own_images(tmp_path)


def test_two_roots_is_an_error_that_says_how_to_pick(tmp_path: Path) -> None:
    first, second = build_server("plain-bookworm"), build_server("plain-bullseye")
    spec_dir = make_spec(tmp_path, "twins", own_images([first.disks[0], second.disks[0]], tmp_path))
    result = doit(spec_dir, "inspect:twins")
    assert result.returncode != 0
    assert "several root filesystems found: disk1p2 (UUID=" in result.stdout
    assert "pick one in specs/twins.yaml with source.root: UUID=" in result.stdout
    assert host_leftovers(spec_dir) == []
    drop_own_images(tmp_path)


def test_no_root_is_an_error(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    result = doit(make_spec(tmp_path, "dataonly", [server.disks[1]]), "inspect:dataonly")
    assert result.returncode != 0
    assert "inspect:dataonly: no root filesystem found" in result.stdout


def test_missing_fstab_device_is_an_error(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    spec_dir = make_spec(tmp_path, "halfserver", own_images([server.disks[0]], tmp_path))
    result = doit(spec_dir, "inspect:halfserver")
    assert result.returncode != 0
    assert "(/srv) matches no device on the source disks" in result.stdout
    assert host_leftovers(spec_dir) == []
    drop_own_images(tmp_path)


def test_unsupported_lvm_segment_type_names_what_is_missing(tmp_path: Path) -> None:
    """A striped LV over two PVs: no read-only fallback without device-mapper."""
    if kernel_has_device_mapper():
        pytest.skip("this kernel has device-mapper; the fallback is not used")
    image = tmp_path / "striped.img"
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    run(["sfdisk", "--quiet", str(image)], input="label: dos\n,30M,8e\n,30M,8e\n")
    vg = f"vg_p2vstripe{os.getpid()}"
    from tasks.lib.storage import lvm_config, lvm_env

    with loop_device(image, read_only=False, partitions=True) as loop, lvm_config() as config:
        pvs = [loop.partition(1), loop.partition(2)]
        env = lvm_env(config)
        devices = ["--devices", ",".join(pvs)]
        run(["pvcreate", *devices, *pvs], env=env)
        run(["vgcreate", *devices, vg, *pvs], env=env)
        run(["lvcreate", *devices, "--driverloaded", "n", "-an", "-Zn", "-i", "2", "-I", "64k", "-L", "16M",
             "-n", "data", vg], env=env)
    spec_dir = make_spec(tmp_path, "striped", [image])
    result = doit(spec_dir, "inspect:striped")
    assert result.returncode != 0
    assert f"LV {vg}/data has segment type striped; reading it needs device-mapper" in result.stdout
    assert host_leftovers(spec_dir) == []


def test_layout_matches_its_documented_schema(inspected: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads((PROJECT_DIR / "tasks" / "schemas" / "layout.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(inspected["layout"])
