"""`doit inspect:<host>` against fixture servers built for real.

Each layout.json is compared with the fixture builder's ground truth
(facts.json); the source images must hash the same before and after, and
nothing p2v attached or mounted may outlive the run, also when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks import inspect
from tasks.lib.pipeline import run_stage
from tasks.lib.resources import RUN_DIR
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import PROJECT_DIR, load_specs
from tasks.lib.storage import kernel_has_device_mapper
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import sha256

SERVERS = ["plain-bookworm", "lvm-bookworm", "plain-bullseye", "plain-trixie", "uefi-bookworm"]


def leftovers(images: list[Path]) -> list[str]:
    """Loop devices backed by our images, and mounts p2v made, right now."""
    loops = run(["losetup", "-a"]).stdout
    mounts = run(["findmnt", "-rn", "-o", "TARGET"]).stdout
    found = [line for line in loops.splitlines() if any(str(image) in line for image in images)]
    found += [line for line in mounts.splitlines() if line.startswith(str(RUN_DIR))]
    return found


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
    images = list(server.disks)
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
        "leftovers": leftovers(images),
        "stdout": result.stdout + result.stderr,
    }


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


@pytest.mark.parametrize("name", ["plain-bookworm", "lvm-bookworm"])
def test_failure_halfway_leaves_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail after every volume is attached and the tree is mounted."""
    server = build_server(name)
    images = list(server.disks)
    before = {image: sha256(image) for image in images}
    (spec,) = load_specs(make_spec(tmp_path, "victim", images))
    seen: list[str] = []

    def explode(root: Path) -> None:
        seen.extend(leftovers(images))  # things are attached at this point
        raise P2VError("injected failure while the tree is mounted")

    monkeypatch.setattr(inspect, "describe_system", explode)
    failure = run_stage(inspect.STAGE, spec)
    assert failure is not None and "injected failure" in str(failure)
    assert seen, "the failure was injected before anything was attached"
    assert leftovers(images) == []
    assert not spec.artifact("layout.json").exists()
    assert {image: sha256(image) for image in images} == before


def test_two_roots_is_an_error_that_says_how_to_pick(tmp_path: Path) -> None:
    first, second = build_server("plain-bookworm"), build_server("plain-bullseye")
    spec_dir = make_spec(tmp_path, "twins", [first.disks[0], second.disks[0]])
    result = doit(spec_dir, "inspect:twins")
    assert result.returncode != 0
    assert "several root filesystems found: disk1p2 (UUID=" in result.stdout
    assert "pick one in specs/twins.yaml with source.root: UUID=" in result.stdout
    assert leftovers([first.disks[0], second.disks[0]]) == []


def test_no_root_is_an_error(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    result = doit(make_spec(tmp_path, "dataonly", [server.disks[1]]), "inspect:dataonly")
    assert result.returncode != 0
    assert "inspect:dataonly: no root filesystem found" in result.stdout


def test_missing_fstab_device_is_an_error(tmp_path: Path) -> None:
    server = build_server("plain-bookworm")
    result = doit(make_spec(tmp_path, "halfserver", [server.disks[0]]), "inspect:halfserver")
    assert result.returncode != 0
    assert "(/srv) matches no device on the source disks" in result.stdout
    assert leftovers([server.disks[0]]) == []


def test_unsupported_lvm_segment_type_names_what_is_missing(tmp_path: Path) -> None:
    """A striped LV over two PVs: no read-only fallback without device-mapper."""
    if kernel_has_device_mapper():
        pytest.skip("this kernel has device-mapper; the fallback is not used")
    image = tmp_path / "striped.img"
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    run(["sfdisk", "--quiet", str(image)], input="label: dos\n,30M,8e\n,30M,8e\n")
    vg = f"vg_p2vstripe{os.getpid()}"
    from tasks.lib.resources import loop_device
    from tasks.lib.storage import _lvm_env, lvm_config

    with loop_device(image, read_only=False, partitions=True) as loop, lvm_config() as config:
        pvs = [loop.partition(1), loop.partition(2)]
        env = _lvm_env(config)
        devices = ["--devices", ",".join(pvs)]
        run(["pvcreate", *devices, *pvs], env=env)
        run(["vgcreate", *devices, vg, *pvs], env=env)
        run(["lvcreate", *devices, "--driverloaded", "n", "-an", "-Zn", "-i", "2", "-I", "64k", "-L", "16M",
             "-n", "data", vg], env=env)
    result = doit(make_spec(tmp_path, "striped", [image]), "inspect:striped")
    assert result.returncode != 0
    assert f"LV {vg}/data has segment type striped; reading it needs device-mapper" in result.stdout
    assert leftovers([image]) == []


def test_layout_matches_its_documented_schema(inspected: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads((PROJECT_DIR / "tasks" / "schemas" / "layout.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(inspected["layout"])
