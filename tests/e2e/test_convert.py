"""The whole chain from scratch: inspect -> disk -> sync -> fix -> verify (-> upload), for real.

Each fixture server is converted with the flatten plan (plain-bookworm also
with keep): the fix stage runs real grub-install, update-initramfs or dracut
and apt (cloud-init from a local directory of packages) in a chroot of the
copy, and the verify stage boots the result in qemu on virtio disk and NIC and
checks it from the inside. plain-bookworm (raw) and lvm-bookworm (qcow2) go on
to `convert:`, into the local Keystone-backed Glance, and the image downloaded
from there holds byte for byte the disk.img that verify booted (under its overlay
with a one-time password). The sources' sha256 must not change, and nothing may
stay mounted or attached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.lib.debconf import CONFIG_DAT, question_value
from tasks.lib.fixes import GRUB_PC_INSTALL_DEVICES, VIRTIO_BOOT_DISK
from tasks.lib.machine import boot_machine
from tasks.lib.manifest import build_manifest
from tasks.lib.plan import DiskPlan
from tasks.lib.runner import run
from tasks.lib.spec import PROJECT_DIR
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import SERVERS_DIR, sha256
from tests.fixtures.packages import ensure_package_dir
from tests.integration.test_inspect import host_leftovers, make_spec, own_images
from tests.integration.test_sync import image_tree

# Converted all the way into Glance (with this disk format); the others stop at the report.
UPLOADED = {("plain-bookworm", "flatten"): "raw", ("lvm-bookworm", "flatten"): "qcow2"}
CASES = [
    ("plain-bookworm", "flatten"),
    ("plain-bookworm", "keep"),
    ("lvm-bookworm", "flatten"),
    ("plain-bullseye", "flatten"),
    ("plain-trixie", "flatten"),
    ("dracut-bookworm", "flatten"),
    ("plain-bullseye", "files"),
]
# A case's second word: the target layout, or "files": flatten with target.copy: files. The same fixture
# goes by blocks (target.copy: blocks) in the fleet: both must boot, and their trees are the same.
VARIANTS = {"flatten": ("flatten", "auto"), "keep": ("keep", "auto"), "files": ("flatten", "files")}
FORCED_COPY = {("plain-bullseye", "flatten"): "blocks", ("plain-bullseye", "files"): "files"}


def doit(spec_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2V_SPECS": str(spec_dir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, check=False, timeout=3000)


def suite_of(name: str) -> str:
    return str(yaml.safe_load((SERVERS_DIR / f"{name}.yaml").read_text())["suite"])


def host_of(name: str, layout: str) -> str:
    return name if layout == "flatten" else f"{name}-{layout}"


def own_server(server: FixtureServer, directory: Path) -> FixtureServer:
    """The fixture server with its disks as hard links in `directory` (own_images)."""
    return dataclasses.replace(server, disks=tuple(own_images(server.disks, directory)))


def conversion_spec(project: Path, server: FixtureServer, layout: str, extra_fix: str = "",
                    image_format: str | None = None, copy: str = "auto") -> Path:
    """A spec for `server` in `project`; `layout` a target layout or a VARIANTS key."""
    packages = ensure_package_dir(suite_of(server.name))
    host = host_of(server.name, layout)
    layout, variant_copy = VARIANTS.get(layout, (layout, "auto"))
    copy = copy if copy != "auto" else variant_copy
    glance = (f"glance:\n  cloud: p2v-test\n  image_name: p2v-e2e-{host}\n  tags: [p2v, e2e]\n"
              f"  properties:\n    owner_team: e2e\n" if image_format else "")
    return make_spec(project, host, list(server.disks), extra=(
        f"target:\n  layout: {layout}\n" + (f"  format: {image_format}\n" if image_format else "") +
        (f"  copy: {copy}\n" if copy != "auto" else "") + glance +
        "fix:\n"
        "  network: keep\n"
        f"  cloud_init:\n    install: true\n    source: {packages}\n    packages: [qemu-guest-agent]\n"
        f"{extra_fix}"
    ))


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, openstack: Any) -> Iterator[dict[str, Any]]:
    """The flatten cases in one project, converted the way an operator runs a batch:
    `doit -n 2 --continue`, two hosts at a time, a failure stopping only its host. The
    keep case reads the same disks as plain-bookworm, which one project refuses (two
    specs sharing a disk), so it is a second project, converted alongside."""
    root = tmp_path_factory.mktemp("convert-batch")
    # Hard links to the cached images: the loop devices p2v attaches name them, so the leftover check
    # below sees this batch's only, whatever another test (or worker) attaches meanwhile.
    names = dict.fromkeys(name for name, _ in CASES)  # plain-bookworm twice (flatten, keep), plain-bullseye too
    servers = {name: own_server(build_server(name), root / "sources" / name) for name in names}
    projects = {case: root / ("fleet" if case[1] == "flatten" else f"{case[0]}-{case[1]}") for case in CASES}
    for (name, layout), project in projects.items():
        conversion_spec(project, servers[name], layout, image_format=UPLOADED.get((name, layout)),
                        copy=FORCED_COPY.get((name, layout), "auto"))
    disks = sorted({disk for server in servers.values() for disk in server.disks})
    before = {disk: sha256(disk) for disk in disks}
    env = {"OS_CLIENT_CONFIG_FILE": str(openstack.clouds_yaml)}
    runs: dict[Path, list[str]] = {}
    for (name, layout), project in projects.items():
        verb = "convert" if (name, layout) in UPLOADED else "report"
        runs.setdefault(project / "specs", []).append(f"{verb}:{host_of(name, layout)}")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(runs)) as pool:
        jobs = {spec_dir: pool.submit(doit, spec_dir, "-n", "2", "--continue", *targets, env=env)
                for spec_dir, targets in runs.items()}
        results = {spec_dir: job.result() for spec_dir, job in jobs.items()}
    print(f"\n{len(CASES)} conversions in {len(runs)} projects: {time.monotonic() - started:.0f} s")
    left = [line for project in sorted(set(projects.values())) for line in host_leftovers(project / "specs")]
    yield {"projects": projects, "servers": servers, "env": env, "services": openstack, "results": results,
           "before": before, "after": {disk: sha256(disk) for disk in disks}, "leftovers": left}
    # The uploads are full-size copies in Glance's store; later modules do not need them.
    openstack.delete_all_images()


@pytest.fixture(params=CASES, ids=[host_of(name, layout) for name, layout in CASES])
def converted(request: pytest.FixtureRequest, batch: dict[str, Any]) -> dict[str, Any]:
    name, layout = request.param
    host = host_of(name, layout)
    image_format = UPLOADED.get((name, layout))
    project = batch["projects"][(name, layout)]
    return {**batch, "server": batch["servers"][name], "host": host, "layout": layout, "project": project,
            "spec_dir": project / "specs", "result": batch["results"][project / "specs"],
            "image_format": image_format, "workdir": project / "work" / host,
            "services": batch["services"] if image_format else None}


def _failure_lines(result: subprocess.CompletedProcess[str], host: str) -> str:
    text = result.stdout + result.stderr
    return "\n".join(line for line in text.splitlines() if f":{host}" in line or "--- " in line)[-4000:]


def test_batch_succeeded(batch: dict[str, Any]) -> None:
    for result in batch["results"].values():
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def read_stamp(workdir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((workdir / name).read_text())
    return data


def test_conversion_verifies_from_scratch(converted: dict[str, Any]) -> None:
    result = converted["result"]
    if not (converted["workdir"] / "verified.stamp").exists():
        pytest.fail(f"{converted['host']}: no verified.stamp\n" + _failure_lines(result, converted["host"]))
    verified = read_stamp(converted["workdir"], "verified.stamp")
    assert not verified["skipped"]
    assert [c["name"] for c in verified["checks"] if not c["ok"]] == []
    names = {c["name"] for c in verified["checks"]}
    assert {"system-state", "root-virtio", "mounts", "swap", "hostname", "network", "cloud-init",
            "mac-bindings"} <= names


def test_guest_has_its_static_address_on_eth0_over_virtio(converted: dict[str, Any]) -> None:
    verified = read_stamp(converted["workdir"], "verified.stamp")
    checks = {c["name"]: c for c in verified["checks"]}
    source_iface = converted["server"].facts["network"]["interfaces"][0]
    assert source_iface["name"] == "eth0"
    network = checks["network"]["output"]
    assert any(line.split()[1:4] == ["eth0", "inet", source_iface["address"]] for line in network.splitlines()), network
    assert checks["root-virtio"]["output"].splitlines()[1].endswith("/virtio_blk")
    plan = DiskPlan.from_json(json.loads((converted["workdir"] / "disk-plan.json").read_text()))
    # Booted as Nova boots the image: i440fx (pc) for BIOS, q35 with OVMF for UEFI.
    nova = boot_machine(plan.firmware)
    reason = verified["machine"].pop("accel_reason")
    assert verified["machine"] == {"disk_bus": "virtio", "nic_model": "virtio", "mac": "52:54:00:7e:57:01",
                                   "accel": "tcg", "machine_type": nova.machine, "firmware": plan.firmware,
                                   "hw_machine_type": nova.to_json()["hw_machine_type"]}
    # This machine's /dev/kvm hangs guests: the probe says so (or there is no kernel to probe with).
    assert reason.startswith(("a KVM guest did not get", "KVM does not run", "no kernel in /boot", "no usable")), reason
    assert f"booted on machine type {nova.machine}" in (converted["workdir"] / "report.md").read_text()


def test_fix_receipt_and_report(converted: dict[str, Any]) -> None:
    workdir = converted["workdir"]
    fixed = read_stamp(workdir, "fixed.stamp")
    steps = {s["name"]: s for s in fixed["steps"]}
    assert steps["fstab"]["status"] == "changed"
    assert steps["initrd"]["status"] == "changed"
    assert steps["bootloader-install"]["status"] == "changed"
    assert set(fixed["installed_packages"]) == {"cloud-init", "qemu-guest-agent"}
    cmdline = fixed["kernel_cmdline"]
    assert "console=ttyS0,115200n8" in cmdline and "console=tty0" in cmdline
    assert not [arg for arg in cmdline if arg.startswith(("rd.lvm", "rd.md", "rd.luks"))]
    report = (workdir / "report.md").read_text()
    assert "## Fix" in report and "## Verify" in report and "FAILED" not in report


def test_grub_config_names_no_loop_device_and_the_new_root(converted: dict[str, Any]) -> None:
    workdir = converted["workdir"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, converted["project"] / "mnt-grub") as tree:
        grub_cfg = (tree / "boot/grub/grub.cfg").read_text()
        fstab = (tree / "etc/fstab").read_text()
        debconf = (tree / CONFIG_DAT.lstrip("/")).read_text()
    assert "/dev/loop" not in grub_cfg
    # grub-mkconfig ran without os-prober (nothing of the conversion host), and
    # grub-pc's upgrades will install to the virtio disk.
    prober = grub_cfg.partition("### BEGIN /etc/grub.d/30_os-prober ###")[2].partition("### END")[0]
    assert prober.strip() == "", prober
    if plan.firmware != "uefi":
        assert question_value(debconf, GRUB_PC_INSTALL_DEVICES) == VIRTIO_BOOT_DISK
    assert f"root=UUID={plan.filesystem('/').uuid}" in grub_cfg
    for fs in plan.filesystems:
        assert (fs.uuid and fs.uuid in fstab) or f"LABEL={fs.label}" in fstab


def test_copy_methods_are_what_the_plan_said_and_the_report_says(converted: dict[str, Any]) -> None:
    """Each source filesystem went the way the plan chose (the receipt's methods), and the report says how."""
    workdir = converted["workdir"]
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    copy = read_stamp(workdir, "rootfs-synced.stamp")["copy"]
    done = {row["mountpoint"]: row for row in copy["methods"]}
    report = (workdir / "report.md").read_text()
    for planned in plan.copies:
        row = done[planned.source_mountpoint]
        assert row["method"] == planned.method, (planned, row)  # no fallback for any fixture
        said = report.partition("## Copy")[2]
        if row["method"] == "blocks":
            assert f"- {planned.source_mountpoint}: copied by blocks: {row['tool']} wrote " in said
        else:
            assert f"- {planned.source_mountpoint}: copied by files ({planned.why})" in said
    passes = {p["mountpoint"]: p["tool"] for p in copy["filesystems"]}
    assert {mp for mp, tool in passes.items() if tool in ("e2image", "xfs_copy")} == \
        {c.source_mountpoint for c in plan.block_copies}


def test_blocks_and_files_give_the_same_tree_and_both_boot(batch: dict[str, Any]) -> None:
    """plain-bullseye forced by blocks (in the fleet) and forced by files: the same manifest, both verified."""
    stamps = {}
    for variant, method in (("flatten", "blocks"), ("files", "files")):
        host = host_of("plain-bullseye", variant)
        workdir = batch["projects"][("plain-bullseye", variant)] / "work" / host
        assert (workdir / "verified.stamp").exists(), f"{host} did not boot"
        stamp = read_stamp(workdir, "rootfs-synced.stamp")
        stamps[method] = {**stamp["copy"], "stage_seconds": stamp["seconds"]}
        assert {row["mountpoint"]: row["method"] for row in stamps[method]["methods"]}["/"] == method
    assert stamps["blocks"]["verified_by"] == stamps["files"]["verified_by"] == "manifests"
    assert stamps["blocks"]["manifest_digest"] == stamps["files"]["manifest_digest"]
    print(f"\nplain-bullseye: sync with / by blocks {stamps['blocks']['stage_seconds']} s, by files "
          f"{stamps['files']['stage_seconds']} s (a batch: other conversions ran beside them); the same manifest "
          f"{stamps['files']['manifest_digest'][:23]}")


def test_sources_untouched_and_nothing_left(batch: dict[str, Any]) -> None:
    assert batch["before"] == batch["after"]
    assert batch["leftovers"] == []


# ---------------------------------------------------------------- upload (plain-bookworm raw, lvm-bookworm qcow2)


def _our_images(services: Any, host: str) -> list[dict[str, Any]]:
    client = services.glance("p2v-admin")
    return [dict(image) for image in client.images.list(filters={"p2v_source_host": host})]


def test_convert_ends_with_an_active_image_holding_the_verified_disk(converted: dict[str, Any], tmp_path: Path) -> None:
    if not converted["image_format"]:
        pytest.skip("this case stops at the report")
    services, workdir = converted["services"], converted["workdir"]
    assert (workdir / "uploaded.stamp").exists(), _failure_lines(converted["result"], converted["host"])
    stamp = read_stamp(workdir, "uploaded.stamp")
    image = dict(services.glance("p2v-admin").images.get(stamp["image"]["id"]))
    assert image["status"] == "active"
    assert image["disk_format"] == converted["image_format"]
    assert image["os_hash_algo"] == "sha512" and image["os_hash_value"] == stamp["file"]["sha512"]
    os_version = json.loads((workdir / "layout.json").read_text())["system"]["os"]["version"]
    for key, value in {"hw_disk_bus": "virtio", "hw_vif_model": "virtio", "os_type": "linux", "os_distro": "debian",
                       "os_version": os_version, "hw_qemu_guest_agent": "yes", "p2v_source_host": converted["host"],
                       "owner_team": "e2e"}.items():
        assert str(image.get(key)) == value, (key, image.get(key))
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    assert int(image["min_disk"]) * (1 << 30) >= plan.size
    assert {"p2v", "e2e"} <= set(image["tags"])
    assert "p2v_layout_sha256" in image and "p2v_converted_at" in image
    assert [i["id"] for i in _our_images(services, converted["host"])] == [image["id"]]
    # The image as OpenStack gets it is the image verify booted: downloaded (checked against os_hash_value),
    # it holds byte for byte disk.img's disk, and Nova would start it on the machine verify booted it on.
    # (A second boot of the same bytes cost two TCG boots of the suite's time and proved nothing more.)
    downloaded = services.download_image(image["id"], tmp_path / f"downloaded.{converted['image_format']}")
    same = run(["qemu-img", "compare", "-f", converted["image_format"], "-F", "raw", str(downloaded),
                str(workdir / "disk.img")], check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    verified = read_stamp(workdir, "verified.stamp")
    assert not verified["skipped"] and all(check["ok"] for check in verified["checks"])
    nova = boot_machine(str(image.get("hw_firmware_type", "bios")),
                        [(key, str(image[key])) for key in ("hw_machine_type", "hw_firmware_type") if key in image])
    assert (nova.machine, nova.firmware) == (verified["machine"]["machine_type"], verified["machine"]["firmware"])
    assert (verified["machine"]["disk_bus"], verified["machine"]["nic_model"]) == (image["hw_disk_bus"],
                                                                                  image["hw_vif_model"])
    # Converting again uploads nothing: the stage finds the same image and says so.
    (workdir / "uploaded.stamp").unlink()
    again = doit(converted["spec_dir"], f"upload:{converted['host']}", env=converted["env"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing image" in again.stdout + again.stderr
    assert [i["id"] for i in _our_images(services, converted["host"])] == [image["id"]]
    logs = "".join(p.read_text(errors="replace") for p in (workdir / "logs").glob("*.log"))
    for secret in services.secrets():
        assert secret not in logs


# ---------------------------------------------------------------- reruns, idempotency (plain-bookworm, flatten)


def _tree_without_times(workdir: Path, project: Path, scratch: str) -> dict[str, Any]:
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    with image_tree(workdir / "disk.img", plan, project / scratch) as tree:
        manifest = build_manifest(tree, [], mounts=plan.mount_order[1:])
    return {path: {k: v for k, v in entry.to_json().items() if k != "mtime_ns"}
            for path, entry in manifest.entries.items()}


def test_rerun_does_nothing_and_deleting_fixed_stamp_reruns_fix_and_verify_only(converted: dict[str, Any]) -> None:
    if converted["host"] != "plain-bookworm":
        pytest.skip("run once, on plain-bookworm flatten")
    assert (converted["workdir"] / "uploaded.stamp").exists()
    workdir, spec_dir, name = converted["workdir"], converted["spec_dir"], converted["host"]
    again = doit(spec_dir, f"convert:{name}", env=converted["env"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ran = [line for line in again.stdout.splitlines() if line.startswith(".  ")]
    assert [line for line in ran if not line.startswith(".  convert:")] == [], again.stdout

    tree_before = _tree_without_times(workdir, converted["project"], "mnt-idem-1")
    (workdir / "fixed.stamp").unlink()
    rerun = doit(spec_dir, f"convert:{name}", env=converted["env"])
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    ran = sorted(line.split()[1].split(":")[0] for line in rerun.stdout.splitlines() if line.startswith(".  "))
    # A new fix is a new image (its bytes changed): upload runs again too.
    assert ran == ["convert", "fix", "report", "upload", "verify"], rerun.stdout
    tree_after = _tree_without_times(workdir, converted["project"], "mnt-idem-2")
    changed = sorted(p for p in tree_before.keys() | tree_after.keys() if tree_before.get(p) != tree_after.get(p))
    assert changed == [], f"a second fix changed: {changed[:20]}"
    assert host_leftovers(spec_dir) == []
