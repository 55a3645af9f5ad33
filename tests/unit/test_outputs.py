"""Stage outputs (tasks/lib/outputs.py): every schema takes what its writer makes, and refuses the rest in one line."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tasks import fix, inspect, sync, upload, verify
from tasks.lib import outputs
from tasks.lib.copy import RECEIPT_FORMAT, RECEIPT_VERSION, CopyResult, FlagOutcome, PassResult
from tasks.lib.fixes.steps.context import StepReport
from tasks.lib.fixes.steps.flags import pending_flags
from tasks.lib.machine import boot_machine
from tasks.lib.pipeline import StageRun
from tasks.lib.plan import PLAN_FORMAT, PLAN_VERSION, DiskPlan, plan_disk
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy, GlancePolicy, Source, Spec, TargetPolicy
from tests.fixtures.synthetic import SYNTHETIC_TREES
from tests.unit.fix_layouts import completed_plan, synthetic_layout
from tests.unit.layouts import LAYOUTS, layout, with_swap_file

HOST = "web01"
NAMES = sorted(p.stem for p in LAYOUTS.glob("*.json"))


def make_spec(workdir: Path) -> Spec:
    return Spec(host=HOST, path=Path("/nonexistent/specs/web01.yaml"), file="specs/web01.yaml",
                source=Source(images=(Path("/nonexistent/disk1.img"),)), workdir=workdir, target=TargetPolicy(),
                fix=FixPolicy(), glance=GlancePolicy())


# ---------------------------------------------------------------- what the writers make


def copy_receipt(*, esp: bool = False) -> dict[str, Any]:
    """The sync stage's receipt, from the copy engine's own dataclasses (tasks/lib/copy/model.py)."""
    flags = FlagOutcome(entries=3, kept={"d": 2, "A": 1}, pending=(("/etc/resolv.conf", "i"), ("/var/log/x", "a")),
                        dropped=(("/srv/x", "C", "Operation not supported"),))
    passes = (PassResult(mountpoint="/", tool="tar", resumed=False, seconds=1.5, bytes_transferred=1 << 20,
                         files_transferred=10, excluded_contents=("/proc", "/sys"), swap_files=("/swapfile",)),
              PassResult(mountpoint="/srv", tool="tar+rsync", resumed=True, seconds=0.25, bytes_transferred=None,
                         files_transferred=None, excluded_contents=(), swap_files=(), sockets=2))
    result = CopyResult(method="tar", passes=passes, started="2026-01-02T03:04:05Z", copy_seconds=1.75,
                        verify_seconds=0.5, files=12, regular_files=10, bytes=1 << 20,
                        manifest_digest="sha256:" + "a" * 64,
                        tools={"tar": "tar (GNU tar) 1.34"}, excluded_contents=("/proc", "/sys"),
                        swap_files=("/swapfile",), verified_by="manifests", sealed="written", flags=flags)
    receipt: dict[str, Any] = {**result.receipt(), "journal_replayed": [
        {"device": "disk2p1", "mountpoint": "/srv", "fstype": "xfs", "reason": "xfs log tail: 2 head: 11"}]}
    if esp:
        receipt["esp"] = {"/boot/efi": {"files": 4, "bytes": 4096, "entries": 7, "digest": "b" * 64,
                                        "changed_entries": 7, "verified": True,
                                        "verified_by": "listing, sizes, sha256 and R/H/S attributes"}}
    return receipt


def written_sync_stamp(workdir: Path, receipt: dict[str, Any]) -> Path:
    """rootfs-synced.stamp as sync's own `write_stamp` writes it."""
    spec = make_spec(workdir)
    partial = workdir / "rootfs-synced.stamp.partial"
    sync.write_stamp(StageRun(spec=spec, stage="sync", partial=partial, log_path=workdir / "sync.log"), receipt,
                     time.monotonic())
    target = spec.artifact(outputs.SYNC_STAMP.file)
    partial.replace(target)
    return target


def fix_stamp(packages: list[str] | None = None) -> outputs.FixStamp:
    """fixed.stamp as fix_host builds it, from its StepReports."""
    reports = [StepReport(name) for name in fix.STEP_NAMES]
    reports[0].changed("edited /etc/fstab: new UUIDs")
    reports[1].warnings.append("a warning")
    reports[2].status = "skipped"
    reports[3].commands.append("update-grub")
    return {
        "format": fix.STAMP_FORMAT, "version": fix.STAMP_VERSION, "host": HOST, "seconds": 12.5,
        "kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro", "console=ttyS0,115200n8"],
        "installed_packages": ["cloud-init"] if packages is None else packages,
        "inode_flags": {"restored": [{"path": "/etc/resolv.conf", "flags": "i"}]},
        "steps": [r.to_json() for r in reports],
        "warnings": [f"{r.name}: {w}" for r in reports for w in r.warnings],
        "sync_receipt_sha256": hashlib.sha256(b"stamp").hexdigest(),
    }


def verify_stamp(firmware: str = "bios") -> outputs.VerifyStamp:
    """verified.stamp as verify_host builds it, from its CheckResults and the BootMachine."""
    machine = boot_machine(firmware)
    results = [verify.CheckResult("hostname", "hostname", "web01\n", 0, None),
               verify.CheckResult("swap", "swapon --show", "", 1, "not active")]
    return {"format": verify.STAMP_FORMAT, "version": verify.STAMP_VERSION, "host": HOST, "skipped": False,
            "seconds": 120.4, "seconds_to_login": 91.0,
            "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": verify.VERIFY_MAC, "accel": "tcg",
                        "accel_reason": "TCG unless probed", **machine.to_json()},
            "serial_log": "/work/web01/logs/verify-serial.log", "checks": [r.to_json() for r in results]}


def upload_stamp() -> outputs.UploadStamp:
    return {
        "format": upload.STAMP_FORMAT, "version": upload.STAMP_VERSION, "host": HOST,
        "image": {"id": "4f0c5a8e-1111-2222-3333-444455556666", "name": "p2v-web01", "status": "active",
                  "size": 1 << 30, "disk_format": "raw", "container_format": "bare", "visibility": "private",
                  "min_disk": 3, "min_ram": 512, "owner": "0123abcd", "created_at": "2026-01-02T03:04:05Z",
                  "os_hash_algo": "sha512", "os_hash_value": "c" * 128, "tags": ["p2v"]},
        "properties": {"hw_disk_bus": "virtio", "p2v_source_host": HOST},
        "file": {"path": "/work/web01/disk.img", "format": "raw", "size": 1 << 30, "sha512": "c" * 128},
        "reused": False, "seconds": 3.2, "endpoint": "http://glance:9292",
        "credentials": {"cloud": "p2v", "source": "clouds.yaml", "auth_url": "http://keystone:5000/v3",
                        "auth_type": "password", "user": "p2v", "project": "p2v", "region": None,
                        "interface": None},
        "shutdown": "skipped (offline conversion)",
    }


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_every_recorded_plan_round_trips(name: str, tmp_path: Path) -> None:
    lay = layout(name)
    spec = make_spec(tmp_path)
    for plan in (plan_disk(lay, spec), completed_plan(lay), completed_plan(with_swap_file(name, size=256 << 20)),
                 completed_plan(lay, label="msdos"), completed_plan(lay, layout="keep")):
        outputs.write_disk_plan(spec.artifact("disk-plan.json"), plan)
        assert outputs.load_disk_plan(spec) == plan
        assert json.loads(spec.artifact("disk-plan.json").read_text()) == plan.to_json()


@pytest.mark.parametrize("name", NAMES)
def test_every_recorded_layout_round_trips(name: str, tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    outputs.write_layout(spec.artifact("layout.json"), layout(name))
    assert outputs.load_layout(spec) == layout(name)
    # The bytes the inspect stage always wrote: sorted keys, two spaces, UTF-8 as is.
    assert spec.artifact("layout.json").read_text() == json.dumps(layout(name), indent=2, sort_keys=True,
                                                                 ensure_ascii=False) + "\n"


@pytest.mark.parametrize("name", SYNTHETIC_TREES)
def test_the_plan_of_every_synthetic_tree_round_trips(name: str, tmp_path: Path) -> None:
    """The fix tests' trees (tests/unit/data/fixes). Their layouts are the test helper's, with a made-up disk
    side that inspect never writes, so only the plan is checked."""
    spec = make_spec(tmp_path)
    plan = completed_plan(synthetic_layout(name, tmp_path / "root"))
    outputs.write_disk_plan(spec.artifact("disk-plan.json"), plan)
    assert outputs.load_disk_plan(spec) == plan


@pytest.mark.parametrize("esp", [False, True])
def test_the_sync_stamp_round_trips(esp: bool, tmp_path: Path) -> None:
    receipt = copy_receipt(esp=esp)
    path = written_sync_stamp(tmp_path, receipt)
    stamp = outputs.load_sync_stamp(make_spec(tmp_path))
    assert stamp["copy"] == receipt and stamp["host"] == HOST
    assert pending_flags(stamp) == [("/etc/resolv.conf", "i"), ("/var/log/x", "a")]
    assert path.read_text() == json.dumps(stamp, indent=2, sort_keys=True) + "\n"


def test_a_sync_stamp_from_the_stage_seal_round_trips(tmp_path: Path) -> None:
    """The fast path: a held stage seal's receipt, with the fields sync_host overrides."""
    receipt = {**copy_receipt(), "verified_by": "stage seal", "fast_path": True, "journal_replayed": [],
               "seal": "stage seal held (written 2026-01-02T03:04:05+00:00)", "bytes_transferred": 0,
               "duration_seconds": 0.2, "copy_seconds": 0.0, "verify_seconds": 0.2}
    written_sync_stamp(tmp_path, receipt)
    assert outputs.load_sync_stamp(make_spec(tmp_path))["copy"]["verified_by"] == "stage seal"


Stamp = Callable[[], Any]
STAMPS: list[tuple[outputs.Output, Stamp, Callable[[Path, Any], None], Callable[[Spec], Any]]] = [
    (outputs.FIX_STAMP, fix_stamp, outputs.write_fix_stamp, outputs.load_fix_stamp),
    (outputs.VERIFY_STAMP, verify_stamp, outputs.write_verify_stamp, outputs.load_verify_stamp),
    (outputs.VERIFY_STAMP, lambda: verify_stamp("uefi"), outputs.write_verify_stamp, outputs.load_verify_stamp),
    (outputs.VERIFY_STAMP, lambda: {"format": verify.STAMP_FORMAT, "version": verify.STAMP_VERSION, "host": HOST,
                                    "skipped": True, "checks": []},
     outputs.write_verify_stamp, outputs.load_verify_stamp),
    (outputs.UPLOAD_STAMP, upload_stamp, outputs.write_upload_stamp, outputs.load_upload_stamp),
]


@pytest.mark.parametrize(("output", "make", "write", "load"), STAMPS, ids=lambda x: getattr(x, "file", None))
def test_every_stamp_round_trips(output: outputs.Output, make: Stamp, write: Callable[[Path, Any], None],
                                 load: Callable[[Spec], Any], tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    stamp = make()
    write(spec.artifact(output.file), stamp)
    assert load(spec) == stamp
    # The bytes each stage always wrote: sorted keys, two spaces.
    assert spec.artifact(output.file).read_text() == json.dumps(stamp, indent=2, sort_keys=True) + "\n"


def test_a_verify_stamp_from_before_the_accelerator_was_recorded_is_read(tmp_path: Path) -> None:
    stamp = verify_stamp()
    del stamp["machine"]["accel"], stamp["machine"]["accel_reason"]
    path = tmp_path / "verified.stamp"
    path.write_text(json.dumps(stamp))
    assert outputs.load_verify_stamp(make_spec(tmp_path)) == stamp


def test_the_schemas_name_the_versions_the_stages_write() -> None:
    assert {o.file for o in outputs.OUTPUTS} == {"layout.json", "disk-plan.json", "rootfs-synced.stamp",
                                                   "fixed.stamp", "verified.stamp", "uploaded.stamp"}
    assert (outputs.LAYOUT.format, outputs.LAYOUT.version) == (inspect.LAYOUT_FORMAT, inspect.LAYOUT_VERSION)
    assert (outputs.DISK_PLAN.format, outputs.DISK_PLAN.version) == (PLAN_FORMAT, PLAN_VERSION)
    for output, module in ((outputs.SYNC_STAMP, sync), (outputs.FIX_STAMP, fix), (outputs.VERIFY_STAMP, verify),
                           (outputs.UPLOAD_STAMP, upload)):
        assert (output.format, output.version) == (module.STAMP_FORMAT, module.STAMP_VERSION), output.file
        assert module.STAGE.target == output.file and module.STAGE.name == output.stage
    copy_schema = json.loads(outputs.SYNC_STAMP.schema_path.read_text())["properties"]["copy"]["properties"]
    assert (copy_schema["format"]["const"], copy_schema["version"]["const"]) == (RECEIPT_FORMAT, RECEIPT_VERSION)
    fix_steps = json.loads(outputs.FIX_STAMP.schema_path.read_text())
    assert fix_steps["properties"]["steps"]["items"]["required"] == list(StepReport("x").to_json())
    for output in outputs.OUTPUTS:
        jsonschema.Draft202012Validator.check_schema(json.loads(output.schema_path.read_text()))


# ---------------------------------------------------------------- refused, in one line


def _tamper(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with the field at dotted `path` set to `value` (or removed, for ...)."""
    changed = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = changed
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return changed


TAMPERED = [
    # (output, a valid document, field, value (... removes it), what the message says)
    (outputs.FIX_STAMP, fix_stamp, "installed_packages", "qemu-guest-agent",
     "installed_packages: expected array, got str 'qemu-guest-agent'"),
    (outputs.FIX_STAMP, fix_stamp, "installed_packages", [{"name": "qemu-guest-agent"}],
     "installed_packages[0]: expected string, got dict"),
    (outputs.FIX_STAMP, fix_stamp, "kernel", ..., "kernel: required field is missing"),
    (outputs.FIX_STAMP, fix_stamp, "steps.0.status", "done", "steps[0].status: expected one of"),
    (outputs.FIX_STAMP, fix_stamp, "packages", {"installed": []}, "packages: unknown key"),
    (outputs.VERIFY_STAMP, verify_stamp, "checks.1.ok", "no", "checks[1].ok: expected boolean, got str 'no'"),
    (outputs.VERIFY_STAMP, verify_stamp, "machine", ..., "machine: required field is missing"),
    (outputs.UPLOAD_STAMP, upload_stamp, "image.id", None, "image.id: expected string, got NoneType None"),
    (outputs.UPLOAD_STAMP, upload_stamp, "credentials.password", "x", "credentials"),
    (outputs.SYNC_STAMP, lambda: {"format": sync.STAMP_FORMAT, "version": sync.STAMP_VERSION, "host": HOST,
                                  "seconds": 1.0, "copy": copy_receipt()},
     "copy.inode_flags.pending", ..., "copy.inode_flags.pending: required field is missing"),
    (outputs.SYNC_STAMP, lambda: {"format": sync.STAMP_FORMAT, "version": sync.STAMP_VERSION, "host": HOST,
                                  "seconds": 1.0, "copy": copy_receipt()},
     "copy.files", "12", "copy.files: expected integer or null, got str '12'"),
    (outputs.DISK_PLAN, lambda: completed_plan(layout("plain-bookworm")).to_json(),
     "partitions.1.filesystem.uuid", 42, "partitions[1].filesystem.uuid: expected string or null, got int 42"),
    (outputs.DISK_PLAN, lambda: completed_plan(layout("plain-bookworm")).to_json(),
     "label", "dos", "label: expected one of 'msdos', 'gpt', got 'dos'"),
    (outputs.DISK_PLAN, lambda: completed_plan(with_swap_file("plain-bookworm", size=256 << 20)).to_json(),
     "swap_file.size", "256M", "swap_file.size: expected integer, got str '256M'"),
    (outputs.LAYOUT, lambda: layout("plain-bookworm"), "mounts", ..., "mounts: required field is missing"),
]

LOADERS: dict[str, Callable[[Spec], Any]] = {
    "layout.json": outputs.load_layout, "disk-plan.json": outputs.load_disk_plan,
    "rootfs-synced.stamp": outputs.load_sync_stamp, "fixed.stamp": outputs.load_fix_stamp,
    "verified.stamp": outputs.load_verify_stamp, "uploaded.stamp": outputs.load_upload_stamp,
}


@pytest.mark.parametrize(("output", "make", "field", "value", "message"), TAMPERED,
                         ids=[f"{o.file}:{f}" for o, _m, f, _v, _s in TAMPERED])
def test_a_tampered_output_is_refused_in_one_line(output: outputs.Output, make: Stamp, field: str, value: Any,
                                                  message: str, tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    path = spec.artifact(output.file)
    good = make()
    path.write_text(json.dumps(good))
    LOADERS[output.file](spec)  # the untampered document is read
    path.write_text(json.dumps(_tamper(good, field, value)))
    with pytest.raises(outputs.OutputError) as caught:
        LOADERS[output.file](spec)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ") and message in text, text
    assert caught.value.hint == f"remove {output.file} and run {output.stage}:{HOST} again: it writes the file anew"


def test_a_writer_that_strays_from_its_schema_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fixed.stamp.partial"
    bad = fix_stamp()
    bad["installed_packages"] = [3]  # type: ignore[list-item]
    with pytest.raises(P2VError, match=r"^fix made a fixed.stamp that its schema refuses: .*installed_packages\[0\]"):
        outputs.write_fix_stamp(path, bad)
    assert not path.exists()
    plan = dataclasses.replace(completed_plan(layout("plain-bookworm")), label="dos")  # type: ignore[arg-type]
    with pytest.raises(P2VError, match=r"disk made a disk-plan.json that its schema refuses: .*label"):
        outputs.write_disk_plan(tmp_path / "disk-plan.json", plan)
    assert not list(tmp_path.iterdir())


def test_an_output_of_another_version_says_so_and_what_to_rerun(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    old = {**fix_stamp(), "version": 1}
    del old["inode_flags"]  # as a version 1 stamp had it: the version is named, not the field
    spec.artifact("fixed.stamp").write_text(json.dumps(old))
    with pytest.raises(outputs.OutputError) as caught:
        outputs.load_fix_stamp(spec)
    assert str(caught.value) == (f"{spec.artifact('fixed.stamp')} was written by another p2v (p2v-fix-stamp "
                                 "version 1; this p2v reads version 2) (hint: remove fixed.stamp and run fix:web01 "
                                 "again: it writes the file anew)")


@pytest.mark.parametrize(("text", "message"), [
    (None, "does not exist"), ("not json", "is not valid JSON"), ("[1, 2]", "expected object, got list"),
    ('{"format": "p2v-verify-stamp"}', "version: required field is missing"),
])
def test_a_missing_or_unreadable_output(text: str | None, message: str, tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    if text is not None:
        spec.artifact("verified.stamp").write_text(text)
    with pytest.raises(outputs.OutputError, match=message) as caught:
        outputs.load_verify_stamp(spec)
    assert "verify:web01" in str(caught.value.hint)


def test_the_path_forms_name_the_host_the_file_records(tmp_path: Path) -> None:
    from tasks.plan import read_disk_plan

    plan = completed_plan(layout("plain-bookworm"))
    path = tmp_path / "disk-plan.json"
    path.write_text(json.dumps({**plan.to_json(), "size": -1}))
    with pytest.raises(outputs.OutputError, match=r"disk-plan.json: size: -1 is out of range") as caught:
        read_disk_plan(path)
    assert caught.value.hint == "remove disk-plan.json and run disk:demo again: it writes the file anew"
    assert isinstance(DiskPlan.from_json(plan.to_json()), DiskPlan)
