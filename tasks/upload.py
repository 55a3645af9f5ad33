"""Upload stage: the verified image into Glance, once, proven by its sha512.

    upload:<host>  verified.stamp + disk-plan.json + layout.json  ->  uploaded.stamp

1. The image's request is planned from the layout and the plan (`image_request`, pure): the
   properties OpenStack uses (virtio disk and NIC, OS, guest agent, UEFI, min_disk, min_ram),
   the spec's properties, visibility and tags, and provenance (source host, p2v version, the
   digests of layout.json and disk-plan.json, the conversion date).
2. The file to upload is disk.img (raw) or a qcow2 made from it (tasks/lib/image_format.py). Its
   sha512 is computed first (cached), because it decides whether to upload at all.
3. Credentials come from clouds.yaml or OS_* (tasks/lib/glance.py), never from the spec. A token
   is fetched first, so refused credentials fail before anything else, with the reason.
4. Glance is asked for our images (property `p2v_source_host`, owned by our project):
   unfinished ones (queued, saving, killed: an interrupted upload) are deleted; an active one
   with the same sha512 is reused and nothing is uploaded.
5. Otherwise: create, stream the file with progress (bytes, rate, ETA) while hashing it again,
   and compare Glance's `os_hash_value` with that hash. A mismatch deletes the image and fails.
   Unreachable service, reset connections and 5xx are retried with backoff, each retry on a new
   image after deleting the unfinished one; 401, 403, 413 and other 4xx fail at once.
6. The receipt (image id, name, size, hash, properties, endpoint; no secrets) is the stamp.
7. The stage never powers the server off itself: doit saves a stage's state only when it
   exits, and a server switched off before that would upload a duplicate when it boots again.
   The live runner (live/runner.py) powers off after doit has exited and the work area is
   synced and unmounted; the receipt says who does it (`shutdown_decision`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import IO, Any

from tasks.lib import glance
from tasks.lib.image_format import UploadFile, digest_of, upload_file
from tasks.lib.machine import machine_properties
from tasks.lib.outputs import FixStamp, UploadStamp, load_fix_stamp, write_upload_stamp
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan, GiB
from tasks.lib.progress import Progress, Reporter, console_reporter, human
from tasks.lib.runner import P2VError
from tasks.lib.spec import PROJECT_DIR, GlancePolicy, Spec
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

log = logging.getLogger("p2v.upload")

STAMP_FORMAT = "p2v-upload-stamp"
STAMP_VERSION = 1
FIX_RECEIPT = "fixed.stamp"
VERIFIED = "verified.stamp"
HASH_CACHE = "upload-sha512.json"  # in the host's state directory

# RAM an image needs to boot: a small server's floor, not the source's RAM (a 256 GiB server
# must not demand a 256 GiB flavor). glance.properties.min_ram overrides it.
DEFAULT_MIN_RAM_MIB = 512
GUEST_AGENT_PACKAGES = ("qemu-guest-agent", "qemu-ga")

# os-release ID -> Glance's os_distro (the libosinfo vocabulary Glance's metadefs name).
OS_DISTRO = {
    "debian": "debian", "ubuntu": "ubuntu", "centos": "centos", "rhel": "rhel", "redhat": "rhel",
    "fedora": "fedora", "rocky": "rocky", "almalinux": "almalinux", "ol": "ol", "oracle": "ol",
    "scientific": "scientificlinux", "sles": "sles", "sled": "sled", "opensuse": "opensuse",
    "opensuse-leap": "opensuse", "arch": "arch", "gentoo": "gentoo", "amzn": "amazonlinux",
}

# Set by Glance or by p2v from its own fields; not settable through glance.properties.
RESERVED = frozenset({
    "id", "name", "status", "visibility", "owner", "checksum", "os_hash_algo", "os_hash_value", "size",
    "virtual_size", "locations", "direct_url", "file", "schema", "self", "tags", "disk_format",
    "container_format", "created_at", "updated_at", "stores",
})
PROVENANCE_PREFIX = "p2v_"


# ---------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class Provenance:
    host: str
    version: str
    layout_sha256: str
    plan_sha256: str
    converted_at: str  # ISO 8601, UTC

    def properties(self) -> dict[str, str]:
        return {"p2v_source_host": self.host, "p2v_version": self.version,
                "p2v_layout_sha256": self.layout_sha256, "p2v_plan_sha256": self.plan_sha256,
                "p2v_converted_at": self.converted_at}


@dataclass(frozen=True)
class ImageRequest:
    """Everything Glance is told when the image is created."""

    name: str
    disk_format: str
    container_format: str
    visibility: str
    min_disk: int  # GiB
    min_ram: int  # MiB
    tags: tuple[str, ...]
    properties: tuple[tuple[str, str], ...]  # sorted

    def fields(self) -> dict[str, Any]:
        return {"name": self.name, "disk_format": self.disk_format, "container_format": self.container_format,
                "visibility": self.visibility, "min_disk": self.min_disk, "min_ram": self.min_ram,
                "tags": list(self.tags), **dict(self.properties)}


def os_distro(os_info: Mapping[str, Any]) -> str | None:
    ident = str(os_info.get("id") or "").lower()
    if not ident or ident == "unknown":
        return None
    return OS_DISTRO.get(ident, ident)


def guest_agent_installed(layout: Mapping[str, Any], fix_receipt: FixStamp | None) -> bool:
    """The source had the QEMU guest agent, or the fix stage installed it (its receipt says so)."""
    if layout.get("system", {}).get("qemu_guest_agent") is True:
        return True
    if fix_receipt is None:
        return False
    # A package as the package manager was given it: a name, name=version, or name:arch.
    return any(name.split("=")[0].split(":")[0] in GUEST_AGENT_PACKAGES for name in fix_receipt["installed_packages"])


def _int_setting(policy: GlancePolicy, key: str) -> int | None:
    for name, value in policy.properties:
        if name == key:
            try:
                return int(value)
            except ValueError:
                raise P2VError(f"glance.properties.{key}: expected a whole number, got {value!r}") from None
    return None


def image_request(layout: Mapping[str, Any], plan: DiskPlan, policy: GlancePolicy, host: str, disk_format: str,
                  provenance: Provenance, fix_receipt: FixStamp | None = None) -> ImageRequest:
    """What Glance is told about the image, from the layout, the plan and the spec (pure)."""
    system = layout.get("system", {})
    os_info = system.get("os", {})
    props: dict[str, str] = {"hw_disk_bus": "virtio", "hw_vif_model": "virtio", "os_type": "linux"}
    distro = os_distro(os_info)
    if distro:
        props["os_distro"] = distro
    if os_info.get("version"):
        props["os_version"] = str(os_info["version"])
    if guest_agent_installed(layout, fix_receipt):
        props["hw_qemu_guest_agent"] = "yes"
    # The machine the verify stage booted the image on (tasks/lib/machine.py).
    props.update(machine_properties(plan.firmware, policy.properties))
    for key, value in policy.properties:
        if key in RESERVED:
            raise P2VError(f"glance.properties.{key}: Glance or p2v sets this one",
                           hint="name, visibility and tags have their own glance.* fields")
        if key.startswith(PROVENANCE_PREFIX):
            raise P2VError(f"glance.properties.{key}: properties named p2v_* are p2v's provenance")
        if key not in ("min_disk", "min_ram"):
            props[key] = value
    props.update(provenance.properties())
    min_disk = max(math.ceil(plan.size / GiB), _int_setting(policy, "min_disk") or 0)
    min_ram = _int_setting(policy, "min_ram")
    return ImageRequest(
        name=policy.image_name or f"p2v-{host}",
        disk_format=disk_format,
        container_format="bare",
        visibility=policy.visibility,
        min_disk=min_disk,
        min_ram=DEFAULT_MIN_RAM_MIB if min_ram is None else min_ram,
        tags=tuple(dict.fromkeys(policy.tags)),
        properties=tuple(sorted(props.items())),
    )


# ---------------------------------------------------------------- progress


class HashingReader:
    """The file as glanceclient reads it (read(n) chunks), hashed and counted on the way."""

    def __init__(self, handle: IO[bytes], total: int, progress: Reporter, max_rate: float | None = None):
        self.handle = handle
        self.total = total
        self.progress = progress
        self.max_rate = max_rate
        self.digest = hashlib.sha512()
        self.done = 0
        self.started = time.monotonic()
        self.reported_final = False

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size if size and size > 0 else 1 << 20)
        if data:
            self.digest.update(data)
            self.done += len(data)
            elapsed = time.monotonic() - self.started
            if self.max_rate and self.done / self.max_rate > elapsed:
                time.sleep(self.done / self.max_rate - elapsed)
                elapsed = time.monotonic() - self.started
            self.progress(Progress("upload", self.done, self.total, elapsed, final=self.done >= self.total))
            self.reported_final = self.done >= self.total
        elif not self.reported_final:
            # The file ended short of its size (it changed): the last line says how far it got.
            self.reported_final = True
            self.progress(Progress("upload", self.done, self.total, time.monotonic() - self.started, final=True))
        return data


# ---------------------------------------------------------------- Glance


@dataclass(frozen=True)
class Published:
    image: dict[str, Any]
    reused: bool
    seconds: float = 0.0


def _ours(service: glance.ImageService, host: str) -> list[dict[str, Any]]:
    project = service.project_id
    return [image for image in service.find(p2v_source_host=host)
            if image.get("owner") == project and image.get("p2v_source_host") == host]


def clear_unfinished(service: glance.ImageService, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Delete what an interrupted upload left (queued, saving, killed); return the rest."""
    kept = []
    for image in images:
        if image.get("status") in glance.UNFINISHED:
            log.warning("deleting image %s (%s) left by an interrupted upload", image["id"], image.get("status"))
            service.delete(image["id"])
        else:
            kept.append(image)
    return kept


@dataclass
class FileDigests:
    """The upload file's digests: sha512 first (it names the file in the receipt), and whatever
    algorithm a Glance reports (its `hashing_algorithm` setting) on demand, cached like sha512."""

    path: Path
    cache: Path | None
    known: dict[str, str] = field(default_factory=dict)

    @property
    def sha512(self) -> str:
        return self.of("sha512") or ""

    def of(self, algorithm: object) -> str | None:
        """The file's digest by Glance's algorithm name; None when hashlib has no such algorithm."""
        name = str(algorithm or "").lower()
        if name not in self.known:
            if name not in hashlib.algorithms_available:
                return None
            self.known[name] = digest_of(self.path, name, self.cache)
        return self.known[name]

    def matches(self, image: Mapping[str, Any]) -> bool:
        expected = self.of(image.get("os_hash_algo"))
        return expected is not None and image.get("os_hash_value") == expected


def publish(service: glance.ImageService, request: ImageRequest, upload: UploadFile, digests: FileDigests,
            host: str, progress: Reporter, max_rate: float | None = None) -> Published:
    """Reuse an active image of this host with this content, or upload one; never a duplicate."""
    sha512 = digests.sha512
    images = clear_unfinished(service, _ours(service, host))
    same = [image for image in images if image.get("status") == "active" and digests.matches(image)]
    if same:
        image = max(same, key=lambda i: str(i.get("created_at", "")))
        log.info("reusing image %s (%s): this host's image with the same content (%s) is already in Glance",
                 image["id"], image.get("name"), image.get("os_hash_algo"))
        return Published(image, reused=True)
    started = time.monotonic()

    def attempt() -> dict[str, Any]:
        image = service.create(request.fields())
        log.info("created image %s (%s, %s); uploading %s", image["id"], request.name, request.disk_format,
                 human(upload.size))
        try:
            with upload.path.open("rb", buffering=0) as handle:
                reader = HashingReader(handle, upload.size, progress, max_rate)
                service.upload(image["id"], reader, upload.size)
            if reader.done != upload.size or reader.digest.hexdigest() != sha512:
                raise P2VError(f"{upload.path} changed during the upload ({reader.done} bytes read, "
                               f"{upload.size} expected)", hint="is another run writing it? rerun")
            return _check_stored(service, service.get(image["id"]), digests)
        except BaseException:
            service.delete_quietly(image["id"])
            raise

    image = glance.retrying("uploading", attempt, service.cloud)
    return Published(image, reused=False, seconds=time.monotonic() - started)


def _check_stored(service: glance.ImageService, image: dict[str, Any], digests: FileDigests) -> dict[str, Any]:
    """Glance's own digest of what it stored (by the algorithm it is configured with) must be the
    file's; otherwise the image goes."""
    deadline = time.monotonic() + 60
    while image.get("status") in ("saving", "uploading", "importing") and time.monotonic() < deadline:
        time.sleep(1)
        image = service.get(image["id"])
    if image.get("status") != "active":
        raise P2VError(f"image {image['id']} is {image.get('status')} after its upload, not active")
    algo, value = image.get("os_hash_algo"), image.get("os_hash_value")
    expected = digests.of(algo)
    if expected is None:
        raise P2VError(f"Glance checksums image {image['id']} with {algo!r}, which p2v cannot compute, so the "
                       "upload is unproven: the image was deleted",
                       hint="set Glance's hashing_algorithm to one of hashlib's (sha512 is Glance's default)")
    if value != expected:
        raise P2VError(f"Glance's checksum of image {image['id']} ({algo} {str(value)[:16]}...) is not the "
                       f"{algo} of the uploaded file ({expected[:16]}...): the image was deleted",
                       hint="the data was damaged on the way or in the store; rerun")
    log.info("Glance's %s of image %s matches the file's", algo, image["id"])
    return image


# ---------------------------------------------------------------- shutdown


def shutdown_decision(spec: Spec) -> str:
    """What happens to the server after this stage, as the receipt says it."""
    if not spec.source.live:
        return "skipped (offline conversion)"
    if not spec.shutdown:
        return "skipped (live.shutdown: false)"
    if spec.source.pxe:
        return "by the live runner, after doit has saved the stages' state and the work area is unmounted"
    return "not done: p2v was run by hand on this server; power it off when you are done"


# ---------------------------------------------------------------- the stage


@cache
def p2v_version() -> str:
    try:
        return str(tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_fix_receipt(spec: Spec) -> FixStamp | None:
    """fixed.stamp, checked against its schema (a file that does not match is refused, in one line).

    None when there is none: upload does not depend on the fix stage's file
    (verified.stamp orders it), and without a receipt only the source's own
    guest agent sets hw_qemu_guest_agent.
    """
    if not spec.artifact(FIX_RECEIPT).exists():
        return None
    return load_fix_stamp(spec)


def max_rate_from_env(env: Mapping[str, str] | None = None) -> float | None:
    """P2V_UPLOAD_MAX_RATE (bytes/s): cap the upload's rate (a shared uplink, or a test)."""
    text = (os.environ if env is None else env).get("P2V_UPLOAD_MAX_RATE", "")
    try:
        return float(text) if text else None
    except ValueError:
        raise P2VError(f"P2V_UPLOAD_MAX_RATE={text!r} is not a number of bytes per second") from None


def upload_host(run_: StageRun) -> None:
    spec = run_.spec
    layout_path, plan_path = run_.input(LAYOUT_FILE), run_.input(PLAN_FILE)
    layout = read_layout(layout_path)
    plan = read_disk_plan(plan_path)
    cloud = glance.load_cloud(spec.glance.cloud)
    log.info("credentials: cloud %s from %s (user %s, project %s)", cloud.name, cloud.source, cloud.user,
             cloud.project)
    upload = upload_file(spec.artifact("disk.img"), spec.target.format, spec.target.compress)
    hash_started = time.monotonic()
    digests = FileDigests(upload.path, spec.state_dir / HASH_CACHE)
    sha512 = digests.sha512
    log.info("sha512 of %s: %s... (%.1f s)", upload.path.name, sha512[:16], time.monotonic() - hash_started)
    provenance = Provenance(host=spec.host, version=p2v_version(), layout_sha256=file_sha256(layout_path),
                            plan_sha256=file_sha256(plan_path),
                            converted_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    request = image_request(layout, plan, spec.glance, spec.host, upload.disk_format, provenance,
                            read_fix_receipt(spec))
    service = glance.ImageService(cloud)
    service.authenticate()
    endpoint = service.endpoint
    log.info("image service: %s", endpoint)
    published = publish(service, request, upload, digests, spec.host, console_reporter(), max_rate_from_env())
    image = published.image
    if not published.reused:
        log.info("uploaded image %s (%s) in %.1f s, %s/s", image["id"], image.get("name"), published.seconds,
                 human(upload.size / published.seconds if published.seconds else 0))
    receipt: UploadStamp = {
        "format": STAMP_FORMAT,
        "version": STAMP_VERSION,
        "host": spec.host,
        "image": {key: image.get(key) for key in ("id", "name", "status", "size", "disk_format", "container_format",
                                                  "visibility", "min_disk", "min_ram", "owner", "created_at",
                                                  "os_hash_algo", "os_hash_value", "tags")},
        "properties": {key: value for key, value in sorted(image.items())
                       if key not in RESERVED and key not in ("min_disk", "min_ram", "protected", "os_hidden")
                       and isinstance(value, str)},
        "file": {"path": str(upload.path), "format": upload.disk_format, "size": upload.size, "sha512": sha512},
        "reused": published.reused,
        "seconds": round(published.seconds, 1),
        "endpoint": endpoint,
        "credentials": cloud.public(),
        "shutdown": shutdown_decision(spec),
    }
    write_upload_stamp(run_.partial, receipt)
    log.info("%s: image %s (%s) %s: %s/v2/images/%s", spec.host, image["id"], image.get("name"),
             "reused" if published.reused else "uploaded", endpoint.rstrip("/"), image["id"])


def _config(spec: Spec) -> dict[str, object]:
    g = spec.glance
    return {"stamp_version": STAMP_VERSION, "format": spec.target.format, "compress": spec.target.compress,
            "cloud": g.cloud, "image_name": g.image_name, "visibility": g.visibility,
            "properties": [list(p) for p in g.properties], "tags": list(g.tags),
            # The receipt says what happens to the server afterwards (shutdown_decision).
            "shutdown": spec.shutdown}


STAGE = Stage(
    name="upload",
    doc="upload the verified image to Glance, checksum-proven, once -> uploaded.stamp",
    target="uploaded.stamp",
    inputs=(VERIFIED, PLAN_FILE, LAYOUT_FILE),
    run=upload_host,
    config=_config,
)
