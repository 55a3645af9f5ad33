"""`upload:<host>` against a real Keystone + Glance (tests/services), for real.

Each test fabricates a workdir as the earlier stages leave it (layout.json from the recorded
plain-bookworm layout, a completed disk-plan.json, verified.stamp) with a 64 MiB sparse disk.img
holding some random data, and runs the stage with `run_stage`, as doit would. Every test uses its
own host name: they share one Glance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from doit.exceptions import TaskFailed

from tasks import upload
from tasks.lib import glance
from tasks.lib.livecloud import live_cloud_env, write_live_cloud
from tasks.lib.pipeline import run_stage
from tasks.lib.plan import plan_disk
from tasks.lib.progress import human
from tasks.lib.runner import run
from tasks.lib.spec import PROJECT_DIR, Source, Spec, parse_spec
from tasks.plan import write_json_atomically
from tests.killpoints import KillPoint, kill_at, stray_processes
from tests.services.openstack import OpenStackServices
from tests.unit.layouts import LAYOUTS

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
FERNET_TOKEN = re.compile(rb"gAAAAA[A-Za-z0-9_=-]{40,}")


def make_disk_image(path: Path, size: int = IMAGE_SIZE, seed: int = 0) -> None:
    """A sparse raw image: random data in three places, holes between."""
    rng = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(10**9))
    with path.open("wb") as handle:
        handle.truncate(size)
        for offset in (0, size // 3, size - 4 * MiB):
            handle.seek(offset)
            block = b"".join(next(rng) for _ in range(MiB // 32))  # 1 MiB
            for _ in range(4):
                handle.write(block)


def make_host(root: Path, host: str, cloud: str = "p2v-test", fmt: str = "raw", compress: bool = False,
              seed: int = 0, **glance_extra: Any) -> Spec:
    """A spec and its workdir as fix and verify leave it."""
    specs = root / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    source = root / "source.img"
    source.write_bytes(b"\0" * 4096)
    workdir = root / "work" / host
    glance_section: dict[str, Any] = {"cloud": cloud, "image_name": f"p2v-{host}", "tags": ["p2v", "test"],
                                      "properties": {"owner_team": "qa"}, **glance_extra}
    spec_data = {"source": {"images": [str(source)]}, "workdir": str(workdir),
                 "target": {"format": fmt, "compress": compress}, "glance": glance_section}
    spec_file = specs / f"{host}.yaml"
    spec_file.write_text(yaml.safe_dump(spec_data))
    spec = parse_spec(spec_file, base=root)
    workdir.mkdir(parents=True)
    layout = json.loads((LAYOUTS / "plain-bookworm.json").read_text())
    shutil.copy(LAYOUTS / "plain-bookworm.json", workdir / "layout.json")
    fresh = plan_disk(layout, spec)
    done = fresh.with_uuids({part.number: str(uuid.uuid4()) for part in fresh.partitions})
    write_json_atomically(workdir / "disk-plan.json", done.to_json())
    (workdir / "verified.stamp").write_text("{}\n")
    make_disk_image(workdir / "disk.img", seed=seed)
    return spec


def sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def images_of(services: OpenStackServices, host: str) -> list[dict[str, Any]]:
    return services.images(p2v_source_host=host)


def stamp(spec: Spec) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(spec.artifact("uploaded.stamp").read_text())
    return data


def failure(result: TaskFailed | None) -> str:
    assert isinstance(result, TaskFailed), "the stage should have failed"
    message = str(result.message if hasattr(result, "message") else result)
    assert "\n" not in message.split(" [log: ")[0], f"not one line: {message}"
    return message


def wait_for_status(services: OpenStackServices, host: str, status: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for image in images_of(services, host):
            if image["status"] == status:
                return image
        time.sleep(0.1)
    raise AssertionError(f"no image of {host} became {status} within {timeout} s")


@pytest.fixture(autouse=True)
def _environment(openstack: OpenStackServices, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Credentials from the services' clouds.yaml; never a real power-off; short retries."""
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(openstack.clouds_yaml))
    monkeypatch.delenv("OS_CLOUD", raising=False)
    monkeypatch.setenv("P2V_POWEROFF_COMMAND", f"touch {tmp_path / 'powered-off'}")
    monkeypatch.setattr(glance, "RETRY", glance.RetryPolicy(attempts=3, wait_min=0.5, wait_max=1.0))


# ---------------------------------------------------------------- upload and reuse


def test_upload_then_rerun_reuses(openstack: OpenStackServices, tmp_path: Path) -> None:
    spec = make_host(tmp_path, "up-basic")
    assert run_stage(upload.STAGE, spec) is None
    receipt = stamp(spec)
    image_id = receipt["image"]["id"]
    image = openstack.glance().images.get(image_id)
    ours = sha512(spec.artifact("disk.img"))
    assert image["status"] == "active"
    assert image["os_hash_algo"] == "sha512" and image["os_hash_value"] == ours
    assert image["disk_format"] == "raw" and image["container_format"] == "bare"
    assert image["size"] == IMAGE_SIZE
    assert image["name"] == "p2v-up-basic" and sorted(image["tags"]) == ["p2v", "test"]
    expected = {"hw_disk_bus": "virtio", "hw_vif_model": "virtio", "os_type": "linux", "os_distro": "debian",
                "os_version": "12.15", "owner_team": "qa", "p2v_source_host": "up-basic",
                "p2v_layout_sha256": hashlib.sha256(spec.artifact("layout.json").read_bytes()).hexdigest(),
                "p2v_plan_sha256": hashlib.sha256(spec.artifact("disk-plan.json").read_bytes()).hexdigest()}
    assert {key: image.get(key) for key in expected} == expected
    assert "hw_firmware_type" not in image and "hw_qemu_guest_agent" not in image
    assert image["min_disk"] >= 1 and image["min_ram"] == upload.DEFAULT_MIN_RAM_MIB
    assert image["p2v_version"] and image["p2v_converted_at"].endswith("Z")
    assert receipt["image"]["os_hash_value"] == ours and receipt["file"]["sha512"] == ours
    assert receipt["reused"] is False and receipt["endpoint"] == openstack.glance_url
    assert receipt["properties"]["p2v_source_host"] == "up-basic"
    assert receipt["shutdown"] == "skipped (offline conversion)"
    # the shared progress reporter, without a terminal: plain lines, the last one the whole file
    shown = (spec.log_dir / "upload.log").read_text()
    lines = re.findall(r" p2v\.progress: (upload: .*)$", shown, re.M)
    whole = human(IMAGE_SIZE)
    assert lines and lines[-1].startswith(f"upload: {whole} of {whole} (100%), ") and lines[-1].endswith("ETA 0:00:00")
    percents = [int(line.split(" (")[1].split("%")[0]) for line in lines]
    assert percents == sorted(percents) and "\r" not in shown and "\x1b" not in shown

    # rerun: the same image, nothing uploaded, no duplicate
    spec.artifact("uploaded.stamp").unlink()
    assert run_stage(upload.STAGE, spec) is None
    again = stamp(spec)
    assert again["reused"] is True and again["image"]["id"] == image_id
    assert [i["id"] for i in images_of(openstack, "up-basic")] == [image_id]
    assert "reusing image " + image_id in (spec.log_dir / "upload.log").read_text()
    assert not (tmp_path / "powered-off").exists()


def test_the_stage_never_powers_off_and_its_receipt_says_who_does(openstack: OpenStackServices,
                                                                  tmp_path: Path) -> None:
    """doit saves a stage's state when it exits: a power-off from inside the stage could come
    first, and the next boot would upload a duplicate. The live runner powers off afterwards."""
    spec = make_host(tmp_path, "up-live")
    by_hand = dataclasses.replace(spec, source=Source(devices=("/dev/p2v-test-live-disk",)))
    pxe = dataclasses.replace(spec, source=Source(devices=("/dev/p2v-test-live-disk",), live_disks=("auto",)))
    marker = tmp_path / "powered-off"  # P2V_POWEROFF_COMMAND (the _environment fixture) would touch it
    assert run_stage(upload.STAGE, dataclasses.replace(pxe, shutdown=False)) is None
    assert stamp(spec)["shutdown"] == "skipped (live.shutdown: false)"
    assert run_stage(upload.STAGE, pxe) is None
    assert stamp(spec)["shutdown"].startswith("by the live runner, after doit has saved")
    assert run_stage(upload.STAGE, by_hand) is None
    assert stamp(spec)["shutdown"].startswith("not done: p2v was run by hand")
    assert not marker.exists()
    assert len(images_of(openstack, "up-live")) == 1


# ---------------------------------------------------------------- interruptions


CHILD = """
import sys
from pathlib import Path
from tasks import upload
from tasks.lib.pipeline import run_stage
from tasks.lib.spec import parse_spec
result = run_stage(upload.STAGE, parse_spec(Path(sys.argv[1]), base=Path(sys.argv[2])))
sys.exit(0 if result is None else 1)
"""


def upload_in_a_child(spec: Spec, root: Path, **env: str) -> subprocess.Popen[bytes]:
    """The upload stage in a process of its own, to be killed or watched from outside."""
    return subprocess.Popen([sys.executable, "-c", CHILD, str(spec.path), str(root)], cwd=PROJECT_DIR,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_upload_leaves_one_image_after_rerun(openstack: OpenStackServices, tmp_path: Path) -> None:
    spec = make_host(tmp_path, "up-kill")
    child = upload_in_a_child(spec, tmp_path, P2V_UPLOAD_MAX_RATE=str(16 * MiB))
    try:
        saving = wait_for_status(openstack, "up-kill", "saving")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not spec.artifact("uploaded.stamp").exists()
    # Glance notices the dropped connection and puts the image back to queued: a leftover either way
    leftovers = images_of(openstack, "up-kill")
    assert [i["id"] for i in leftovers] == [saving["id"]] and leftovers[0]["status"] in ("saving", "queued")

    assert run_stage(upload.STAGE, spec) is None
    images = images_of(openstack, "up-kill")
    assert [i["status"] for i in images] == ["active"]
    assert images[0]["id"] != saving["id"] and images[0]["id"] == stamp(spec)["image"]["id"]
    assert f"deleting image {saving['id']} ({leftovers[0]['status']})" in (spec.log_dir / "upload.log").read_text()


def test_killed_right_after_the_upload_reuses_the_image(openstack: OpenStackServices, tmp_path: Path) -> None:
    """Power lost as soon as Glance has the image, before the stamp or doit's state are saved:
    the rerun finds the image by its content and uploads nothing."""
    spec = make_host(tmp_path, "up-after")
    child = upload_in_a_child(spec, tmp_path)
    try:
        active = wait_for_status(openstack, "up-after", "active")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    spec.artifact("uploaded.stamp").unlink(missing_ok=True)  # whether or not it was written: not durable
    assert run_stage(upload.STAGE, spec) is None
    receipt = stamp(spec)
    assert receipt["reused"] is True and receipt["image"]["id"] == active["id"]
    assert [i["id"] for i in images_of(openstack, "up-after")] == [active["id"]]


def test_killed_during_the_qcow2_conversion(openstack: OpenStackServices, tmp_path: Path) -> None:
    """The kill matrix's qcow2 point: the stage's process group SIGKILLed while qemu-img converts.
    No image in Glance, no disk.qcow2 that looks made; the rerun converts again and uploads one image."""
    spec = make_host(tmp_path, "up-qcow2-kill", fmt="qcow2", compress=True)
    with spec.artifact("disk.img").open("r+b") as handle:  # data that takes qemu-img seconds to compress
        handle.truncate(512 * MiB)
        handle.seek(128 * MiB)
        for _ in range(256):
            handle.write(os.urandom(MiB))
    point = KillPoint("qcow2-conversion", "upload", log_line=r"\+ qemu-img convert ", settle=0.5,
                      step=r"^qemu-img convert ")
    argv = [sys.executable, "-c", CHILD, str(spec.path), str(tmp_path)]
    try:
        kill = kill_at(point, argv, {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}, workdir=spec.workdir,
                       run_dir=spec.run_dir, scratch=tmp_path)
        assert kill.running, "qemu-img was not converting at the kill"
        assert not spec.artifact("uploaded.stamp").exists() and not spec.artifact("disk.qcow2").exists()
        assert images_of(openstack, "up-qcow2-kill") == []
        assert run_stage(upload.STAGE, spec) is None
        qcow2 = spec.artifact("disk.qcow2")
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(spec.artifact("disk.img")), str(qcow2)])
        images = images_of(openstack, "up-qcow2-kill")
        assert [i["status"] for i in images] == ["active"] and images[0]["os_hash_value"] == sha512(qcow2)
        assert not list(spec.workdir.glob("*.partial"))
        assert stray_processes(spec.run_dir, spec.workdir) == []
    finally:
        for image in spec.workdir.glob("disk.*"):  # 256 MiB of random data, twice
            image.unlink()


def test_a_glance_hashing_with_sha256_is_checked_with_sha256(openstack: OpenStackServices, tmp_path: Path) -> None:
    """Glance's `hashing_algorithm` is a setting: p2v checks with whatever os_hash_algo says,
    instead of deleting every image of a cloud not on sha512, and reuses by it too."""
    spec = make_host(tmp_path, "up-sha256")
    with openstack.glance_option("DEFAULT", "hashing_algorithm", "sha256"):
        assert run_stage(upload.STAGE, spec) is None
        receipt = stamp(spec)
        image = openstack.glance().images.get(receipt["image"]["id"])
        disk = spec.artifact("disk.img").read_bytes()
        assert image["status"] == "active" and image["os_hash_algo"] == "sha256"
        assert image["os_hash_value"] == hashlib.sha256(disk).hexdigest()
        assert receipt["file"]["sha512"] == hashlib.sha512(disk).hexdigest()
        assert "Glance's sha256 of image" in (spec.log_dir / "upload.log").read_text()
        spec.artifact("uploaded.stamp").unlink()
        assert run_stage(upload.STAGE, spec) is None
        assert stamp(spec)["reused"] is True
        assert [i["id"] for i in images_of(openstack, "up-sha256")] == [image["id"]]


def test_glance_stopped_during_upload(openstack: OpenStackServices, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_host(tmp_path, "up-outage")
    monkeypatch.setenv("P2V_UPLOAD_MAX_RATE", str(16 * MiB))
    results: list[TaskFailed | None] = []
    worker = threading.Thread(target=lambda: results.append(run_stage(upload.STAGE, spec)))
    worker.start()
    try:
        wait_for_status(openstack, "up-outage", "saving")
        openstack.stop_glance(kill=True)
        worker.join(timeout=120)
    finally:
        openstack.start_glance()
    assert not worker.is_alive()
    message = failure(results[0])
    assert message.startswith("upload:up-outage: ") and "cannot reach http://127.0.0.1:" in message, message
    assert "gave up after 3 attempts" in message, message
    assert not spec.artifact("uploaded.stamp").exists()
    assert "attempt 1 of 3; retrying" in (spec.log_dir / "upload.log").read_text()

    monkeypatch.delenv("P2V_UPLOAD_MAX_RATE")
    assert run_stage(upload.STAGE, spec) is None
    images = images_of(openstack, "up-outage")
    assert [i["status"] for i in images] == ["active"], images
    assert images[0]["os_hash_value"] == sha512(spec.artifact("disk.img"))


# ---------------------------------------------------------------- refused credentials


def bad_password_clouds(services: OpenStackServices, path: Path) -> Path:
    data = yaml.safe_load(services.clouds_yaml.read_text())
    entry = json.loads(json.dumps(data["clouds"]["p2v-test"]))
    entry["auth"]["password"] = "not-the-password"
    data["clouds"]["p2v-badpass"] = entry
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("cloud", "expected"), [
    ("p2v-badpass", "Keystone refused user 'p2v' for project 'p2v' of cloud 'p2v-badpass' "
                    r"\(http://127\.0\.0\.1:\d+/v3\) \(401 Unauthorized\): wrong user name or password"),
    ("p2v-norole", "Keystone refused user 'p2v-norole' for project 'p2v' .* the password is right, but the user "
                   "has no role on project 'p2v'"),
    ("p2v-reader", r"creating the image: Glance refused \(403 Forbidden\): user 'p2v-reader' may not do this in "
                   "project 'p2v'"),
    ("p2v-nowhere", r"cloud 'p2v-nowhere' is not in .*clouds.yaml \(clouds there: p2v-"),
])
def test_refused_credentials_fail_in_one_line(openstack: OpenStackServices, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, cloud: str, expected: str) -> None:
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(bad_password_clouds(openstack, tmp_path / "clouds.yaml")))
    host = f"up-auth-{cloud.removeprefix('p2v-')}"
    spec = make_host(tmp_path, host, cloud=cloud)
    message = failure(run_stage(upload.STAGE, spec))
    assert re.search(expected, message), message
    assert message.startswith(f"upload:{host}: ")
    assert not spec.artifact("uploaded.stamp").exists()
    assert images_of(openstack, host) == []
    assert_no_secrets(openstack, spec.workdir)


# ---------------------------------------------------------------- qcow2


def test_qcow2_compressed(openstack: OpenStackServices, tmp_path: Path) -> None:
    spec = make_host(tmp_path, "up-qcow2", fmt="qcow2", compress=True)
    assert run_stage(upload.STAGE, spec) is None
    qcow2 = spec.artifact("disk.qcow2")
    run(["qemu-img", "check", "-f", "qcow2", str(qcow2)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(spec.artifact("disk.img")), str(qcow2)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(qcow2)]).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == IMAGE_SIZE
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert qcow2.stat().st_size < 16 * MiB  # 12 MiB of random data; zeros are not stored
    receipt = stamp(spec)
    image = openstack.glance().images.get(receipt["image"]["id"])
    assert image["disk_format"] == "qcow2" and image["status"] == "active"
    assert image["os_hash_value"] == sha512(qcow2) == receipt["file"]["sha512"]
    assert not list(spec.workdir.glob("*.partial"))

    # the downloaded image is the same disk
    downloaded = openstack.download_image(image["id"], tmp_path / "downloaded.qcow2")
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(spec.artifact("disk.img")), str(downloaded)])


# ---------------------------------------------------------------- secrets


def assert_no_secrets(services: OpenStackServices, root: Path) -> None:
    """No password of any service user and no Keystone (fernet) token in any file under root."""
    secrets = [s.encode() for s in services.secrets()]
    assert secrets
    checked = 0
    for path in root.rglob("*"):
        if not path.is_file() or path.name.endswith((".img", ".qcow2")):
            continue
        data = path.read_bytes()
        checked += 1
        for secret in secrets:
            assert secret not in data, f"a password is in {path}"
        assert not FERNET_TOKEN.search(data), f"a token is in {path}"
    assert checked


def test_no_password_or_token_in_logs(openstack: OpenStackServices, tmp_path: Path) -> None:
    spec = make_host(tmp_path, "up-secrets")
    assert run_stage(upload.STAGE, spec) is None
    spec.artifact("uploaded.stamp").unlink()
    assert run_stage(upload.STAGE, spec) is None  # the reuse path too
    log_text = (spec.log_dir / "upload.log").read_text()
    assert "uploaded image" in log_text and "reusing image" in log_text
    assert_no_secrets(openstack, spec.workdir)


def test_no_secret_in_the_process_listing_while_uploading(openstack: OpenStackServices, tmp_path: Path) -> None:
    """What `ps` shows of every process while an upload runs (a qcow2 conversion included):
    no password, application secret or token on a command line."""
    spec = make_host(tmp_path, "up-ps", fmt="qcow2")
    child = upload_in_a_child(spec, tmp_path, P2V_UPLOAD_MAX_RATE=str(8 * MiB))
    listings = []
    try:
        while child.poll() is None:
            listings.append(subprocess.run(["ps", "-eo", "pid,args", "--width", "100000"], capture_output=True,
                                           text=True, check=True).stdout)
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0 and len(listings) >= 5
    assert any("-c" in listing and str(spec.path) in listing for listing in listings)  # the child was seen
    for listing in listings:
        for secret in openstack.secrets():
            assert secret not in listing
        assert not FERNET_TOKEN.search(listing.encode())


# ---------------------------------------------------------------- from the live system


def test_the_live_system_uploads_with_an_application_credential_only(openstack: OpenStackServices,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`doit pxe` gives the server's directory of the work area one application credential
    (tasks/lib/livecloud.py); the live runner points upload at it; Keystone accepts it and the
    image lands in the project. The operator's password never reaches the work area."""
    credential = openstack.application_credential("p2v-test", f"p2v-live-{uuid.uuid4().hex[:8]}")
    infra_clouds = tmp_path / "infra-clouds.yaml"
    infra_clouds.write_text(yaml.safe_dump({"clouds": {"p2v-live": {
        "auth_type": "v3applicationcredential",
        "auth": {"auth_url": credential["auth_url"], "application_credential_id": credential["id"],
                 "application_credential_secret": credential["secret"]},
        "region_name": "RegionOne", "interface": "public"}}}))
    spec = make_host(tmp_path, "up-appcred", cloud="p2v-live")
    assert spec.live.last_stage == "upload"  # the default: the live system would upload
    host_dir = tmp_path / "area" / "up-appcred"
    assert write_live_cloud(spec, host_dir, env={"OS_CLIENT_CONFIG_FILE": str(infra_clouds)}) == "p2v-live"
    written = (host_dir / "cloud" / "clouds.yaml").read_text()
    for secret in openstack.secrets():
        assert secret not in written
    # The live side: only what the runner sets (the services' clouds.yaml, with passwords, is out of reach).
    for name in ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in live_cloud_env(host_dir).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert run_stage(upload.STAGE, spec) is None
    receipt = stamp(spec)
    image = openstack.glance().images.get(receipt["image"]["id"])
    assert image["status"] == "active" and image["os_hash_value"] == sha512(spec.artifact("disk.img"))
    upload_log = (spec.log_dir / "upload.log").read_text()
    assert "p2v-live" in upload_log
    assert credential["secret"] not in upload_log and credential["secret"] not in json.dumps(receipt)
