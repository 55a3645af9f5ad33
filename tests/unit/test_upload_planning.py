"""The upload stage's pure parts: image properties, credentials lookup, error translation, retries."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc

from tasks import upload
from tasks.lib import glance
from tasks.lib.image_format import sha512_of
from tasks.lib.outputs import FixStamp
from tasks.lib.plan import DiskPlan, GiB, plan_disk
from tasks.lib.progress import PlainLines, Progress
from tasks.lib.runner import P2VError
from tasks.lib.spec import FixPolicy, GlancePolicy, Source, Spec, TargetPolicy
from tests.unit.layouts import LAYOUTS, layout
from tests.unit.test_outputs import fix_stamp

NAMES = sorted(p.stem for p in LAYOUTS.glob("*.json"))
PROVENANCE = upload.Provenance(host="web01", version="0.1.0", layout_sha256="a" * 64, plan_sha256="b" * 64,
                               converted_at="2026-01-02T03:04:05Z")


def make_spec(glance_policy: GlancePolicy | None = None, devices: tuple[str, ...] = (), shutdown: bool = True) -> Spec:
    source = Source(devices=devices) if devices else Source(images=(Path("/nonexistent/disk1.img"),))
    return Spec(host="web01", path=Path("/nonexistent/specs/web01.yaml"), file="specs/web01.yaml", source=source,
                workdir=Path("/nonexistent/work"), target=TargetPolicy(), fix=FixPolicy(),
                glance=glance_policy or GlancePolicy(), shutdown=shutdown)


def request(name: str = "plain-bookworm", policy: GlancePolicy | None = None, fix: FixStamp | None = None,
            lay: dict[str, Any] | None = None, plan: DiskPlan | None = None) -> upload.ImageRequest:
    lay = lay or layout(name)
    plan = plan or plan_disk(lay, make_spec())
    return upload.image_request(lay, plan, policy or GlancePolicy(), "web01", "raw", PROVENANCE, fix)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", NAMES)
def test_every_layout_gets_the_standard_properties(name: str) -> None:
    lay = layout(name)
    plan = plan_disk(lay, make_spec())
    req = request(name)
    props = dict(req.properties)
    assert props["hw_disk_bus"] == "virtio" and props["hw_vif_model"] == "virtio" and props["os_type"] == "linux"
    assert props["os_distro"] == "debian"
    assert props["os_version"] == lay["system"]["os"]["version"]
    assert "hw_qemu_guest_agent" not in props
    if lay["boot"]["firmware"] == "uefi":  # Nova: UEFI on q35 (tasks/lib/machine.py)
        assert (props["hw_firmware_type"], props["hw_machine_type"]) == ("uefi", "q35")
    else:  # Nova's default: i440fx with SeaBIOS
        assert "hw_firmware_type" not in props and "hw_machine_type" not in props
    assert req.min_disk == math.ceil(plan.size / GiB) and req.min_disk * GiB >= plan.size
    assert req.min_ram == upload.DEFAULT_MIN_RAM_MIB
    assert req.name == "p2v-web01" and req.disk_format == "raw" and req.container_format == "bare"
    assert req.visibility == "private" and req.tags == ()
    assert {k: v for k, v in props.items() if k.startswith("p2v_")} == PROVENANCE.properties()
    assert list(req.properties) == sorted(req.properties)
    assert request(name) == req  # pure


def test_fields_for_glance() -> None:
    fields = request(policy=GlancePolicy(image_name="web", visibility="shared", tags=("p2v", "web", "p2v"),
                                         properties=(("owner_team", "web"),))).fields()
    assert fields["name"] == "web" and fields["visibility"] == "shared" and fields["tags"] == ["p2v", "web"]
    assert fields["owner_team"] == "web" and fields["p2v_source_host"] == "web01"
    assert isinstance(fields["min_disk"], int) and isinstance(fields["min_ram"], int)
    assert all(isinstance(v, str) for k, v in fields.items() if k not in ("min_disk", "min_ram", "tags"))


def test_uefi_plan_sets_firmware_type() -> None:
    lay = layout("plain-bookworm")
    plan = dataclasses.replace(plan_disk(lay, make_spec()), firmware="uefi")
    props = dict(request(lay=lay, plan=plan).properties)
    assert props["hw_firmware_type"] == "uefi" and props["hw_machine_type"] == "q35"


@pytest.mark.parametrize(("packages", "expected"), [
    (None, False),  # no fixed.stamp: only the source's own agent counts
    ([], False),
    (["cloud-init", "qemu-guest-agent"], True),
    (["qemu-guest-agent=1:7.2+dfsg-7"], True),
    (["qemu-guest-agent:amd64"], True),
    (["qemu-ga"], True),
    (["qemu-guest-agent-doc"], False),
])
def test_guest_agent_from_the_fix_receipt(packages: list[str] | None, expected: bool) -> None:
    props = dict(request(fix=None if packages is None else fix_stamp(packages)).properties)
    assert (props.get("hw_qemu_guest_agent") == "yes") is expected


def test_guest_agent_from_the_source() -> None:
    lay = layout("plain-bookworm")
    lay["system"]["qemu_guest_agent"] = True
    assert dict(request(lay=lay).properties)["hw_qemu_guest_agent"] == "yes"


@pytest.mark.parametrize(("ident", "expected"), [
    ("debian", "debian"), ("ubuntu", "ubuntu"), ("centos", "centos"), ("rhel", "rhel"), ("rocky", "rocky"),
    ("almalinux", "almalinux"), ("ol", "ol"), ("opensuse-leap", "opensuse"), ("sles", "sles"),
    ("mageia", "mageia"), ("unknown", None), ("", None),
])
def test_os_distro(ident: str, expected: str | None) -> None:
    assert upload.os_distro({"id": ident}) == expected


def test_spec_properties_override_and_min_settings() -> None:
    policy = GlancePolicy(properties=(("hw_vif_model", "e1000"), ("min_disk", "1"), ("min_ram", "2048"),
                                      ("hw_scsi_model", "virtio-scsi")))
    req = request(policy=policy)
    props = dict(req.properties)
    assert props["hw_vif_model"] == "e1000" and props["hw_scsi_model"] == "virtio-scsi"
    assert "min_disk" not in props and "min_ram" not in props
    assert req.min_ram == 2048 and req.min_disk == request().min_disk  # never below the plan's size
    assert request(policy=GlancePolicy(properties=(("min_disk", "500"),))).min_disk == 500


@pytest.mark.parametrize(("key", "message"), [
    ("name", "Glance or p2v sets this one"), ("os_hash_value", "Glance or p2v sets this one"),
    ("p2v_source_host", "p2v's provenance"),
])
def test_reserved_properties_are_refused(key: str, message: str) -> None:
    with pytest.raises(P2VError, match=message):
        request(policy=GlancePolicy(properties=((key, "x"),)))


def test_min_ram_must_be_a_number() -> None:
    with pytest.raises(P2VError, match=r"glance.properties.min_ram: expected a whole number"):
        request(policy=GlancePolicy(properties=(("min_ram", "lots"),)))


# ---------------------------------------------------------------- progress, hashing, receipts


def test_progress_line() -> None:
    line = Progress("upload", bytes_done=256 << 20, bytes_total=1 << 30, elapsed=4.0).line()
    assert line == "upload: 256.0 MiB of 1.0 GiB (25%), 64.0 MiB/s, ETA 0:00:12"
    assert "ETA ?" in Progress("upload", 0, 10, 0.0).line()
    assert "ETA 0:00:00" in Progress("upload", 10, 10, 1.0, final=True).line()


def test_hashing_reader_hashes_and_reports() -> None:
    data = bytes(range(256)) * 10000
    seen: list[Progress] = []
    reader = upload.HashingReader(io.BytesIO(data), len(data), seen.append)
    chunks = []
    while chunk := reader.read(65536):
        chunks.append(chunk)
    assert b"".join(chunks) == data and reader.done == len(data)
    assert reader.digest.hexdigest() == hashlib.sha512(data).hexdigest()
    assert seen[-1].final and seen[-1].bytes_done == len(data) and not seen[0].final
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen) and seen[-1].bytes_total == len(data)
    assert [p for p in seen if p.final] == [seen[-1]]


def test_hashing_reader_shows_its_plain_lines() -> None:
    """The upload's figures through the shared reporter, as a CI log gets them: a line at each
    tenth, exact."""
    data = b"x" * (10 << 20)
    lines: list[str] = []
    reader = upload.HashingReader(io.BytesIO(data), len(data), PlainLines(lines.append, clock=lambda: 0.0))
    while reader.read(1 << 20):
        pass
    assert len(lines) == 10
    assert lines[0].startswith("upload: 1.0 MiB of 10.0 MiB (10%), ")
    assert lines[-1].startswith("upload: 10.0 MiB of 10.0 MiB (100%), ") and lines[-1].endswith(", ETA 0:00:00")


def test_a_file_that_ends_short_still_gets_its_last_line() -> None:
    lines: list[str] = []
    reader = upload.HashingReader(io.BytesIO(b"x" * 1000), 4000, PlainLines(lines.append, clock=lambda: 0.0))
    while reader.read(100):
        pass
    assert reader.read(100) == b""
    assert len(lines) == 3 and lines[-1].startswith("upload: 1000 B of 3.9 KiB (25%), ")  # 10% and 20%, then the end


def test_sha512_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 100_000)
    cache = tmp_path / "state" / "hash.json"
    expected = hashlib.sha512(image.read_bytes()).hexdigest()
    assert sha512_of(image, cache) == expected
    data = json.loads(cache.read_text())
    data["sha512"] = "cached"
    cache.write_text(json.dumps(data))
    assert sha512_of(image, cache) == "cached"  # same size and mtime: the cache answers
    image.write_bytes(b"y" * 100_001)
    assert sha512_of(image, cache) == hashlib.sha512(b"y" * 100_001).hexdigest()


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "fixed.stamp is not valid JSON"),
    ("[1, 2]", "fixed.stamp: expected object, got list"),
    # Shapes the upload stage used to guess at: the fix stage never wrote them.
    ('{"installed_packages": ["qemu-guest-agent"]}', "fixed.stamp: format: required field is missing"),
    (json.dumps({**fix_stamp(), "installed_packages": "qemu-guest-agent"}),
     "fixed.stamp: installed_packages: expected array, got str"),
    (json.dumps({**fix_stamp(), "installed_packages": [{"name": "qemu-guest-agent", "version": "7.2"}]}),
     "fixed.stamp: installed_packages[0]: expected string, got dict"),
    (json.dumps({**fix_stamp(), "packages": {"installed": ["qemu-guest-agent"]}}),
     "fixed.stamp: packages: unknown key"),
    (json.dumps({**fix_stamp(), "qemu_guest_agent": True}), "fixed.stamp: qemu_guest_agent: unknown key"),
])
def test_the_fix_receipt_is_read_through_its_schema(text: str, message: str, tmp_path: Path) -> None:
    spec = dataclasses.replace(make_spec(), workdir=tmp_path)
    assert upload.read_fix_receipt(spec) is None  # none: upload does not depend on it
    spec.artifact("fixed.stamp").write_text(json.dumps(fix_stamp(["qemu-guest-agent"])))
    assert upload.read_fix_receipt(spec) == fix_stamp(["qemu-guest-agent"])
    spec.artifact("fixed.stamp").write_text(text)
    with pytest.raises(P2VError, match=re.escape(message)) as caught:
        upload.read_fix_receipt(spec)
    assert "\n" not in str(caught.value)
    assert caught.value.hint == "remove fixed.stamp and run fix:web01 again: it writes the file anew"


# ---------------------------------------------------------------- shutdown


def test_the_receipt_says_who_powers_off_and_the_stage_never_does() -> None:
    assert upload.shutdown_decision(make_spec()) == "skipped (offline conversion)"
    assert upload.shutdown_decision(make_spec(devices=("/dev/sda",), shutdown=False)) == \
        "skipped (live.shutdown: false)"
    assert upload.shutdown_decision(make_spec(devices=("/dev/sda",))).startswith("not done: p2v was run by hand")
    pxe = dataclasses.replace(make_spec(devices=("/dev/sda",)),
                              source=Source(devices=("/dev/sda",), live_disks=("auto",)))
    assert upload.shutdown_decision(pxe).startswith("by the live runner, after doit has saved")
    # The stage itself runs no power-off command: doit has not saved its state yet.
    assert not hasattr(upload, "power_off")


# ---------------------------------------------------------------- credentials


def write_clouds(path: Path, **clouds: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"clouds": clouds}))
    return path


ENTRY = {"auth": {"auth_url": "https://keystone.example/v3", "username": "u", "password": "s3cret",
                  "project_name": "p", "user_domain_name": "Default", "project-domain-name": "Default"},
         "region_name": "RegionTwo", "interface": "internal"}


def test_named_cloud_from_the_first_clouds_yaml(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    write_clouds(home / ".config" / "openstack" / "clouds.yaml", prod=ENTRY)
    cloud = glance.load_cloud("prod", env={}, cwd=cwd, home=home)
    assert cloud.name == "prod" and cloud.source.endswith(".config/openstack/clouds.yaml")
    assert cloud.auth_url == "https://keystone.example/v3" and cloud.region_name == "RegionTwo"
    assert cloud.interface == "internal" and cloud.auth["project_domain_name"] == "Default"
    assert "s3cret" not in repr(cloud) and "s3cret" not in json.dumps(cloud.public())
    # ./clouds.yaml wins over the one in the home directory, OS_CLIENT_CONFIG_FILE over both
    write_clouds(cwd / "clouds.yaml", prod={**ENTRY, "region_name": "Here"})
    assert glance.load_cloud("prod", env={}, cwd=cwd, home=home).region_name == "Here"
    explicit = write_clouds(tmp_path / "x.yaml", prod={**ENTRY, "region_name": "Explicit"})
    env = {"OS_CLIENT_CONFIG_FILE": str(explicit)}
    assert glance.load_cloud("prod", env=env, cwd=cwd, home=home).region_name == "Explicit"
    # OS_CLOUD names the entry when the spec does not
    assert glance.load_cloud(None, env={"OS_CLOUD": "prod"}, cwd=cwd, home=home).name == "prod"


def test_secure_yaml_is_merged(tmp_path: Path) -> None:
    entry = json.loads(json.dumps(ENTRY))
    del entry["auth"]["password"]
    write_clouds(tmp_path / "clouds.yaml", prod=entry)
    write_clouds(tmp_path / "secure.yaml", prod={"auth": {"password": "from-secure"}})
    cloud = glance.load_cloud("prod", env={}, cwd=tmp_path, home=tmp_path / "nohome")
    assert cloud.auth["password"] == "from-secure" and cloud.auth["username"] == "u"


def test_missing_cloud_and_missing_file(tmp_path: Path) -> None:
    write_clouds(tmp_path / "clouds.yaml", prod=ENTRY, test=ENTRY)
    with pytest.raises(P2VError, match=r"cloud 'nope' is not in .*clouds.yaml \(clouds there: prod, test\)"):
        glance.load_cloud("nope", env={}, cwd=tmp_path, home=tmp_path)
    with pytest.raises(P2VError, match=r"cloud 'prod': no clouds.yaml found \(looked in "):
        glance.load_cloud("prod", env={}, cwd=tmp_path / "empty", home=tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "clouds.yaml").write_text("clouds: [unclosed")
    with pytest.raises(P2VError, match="is not valid YAML"):
        glance.load_cloud("prod", env={}, cwd=tmp_path / "bad", home=tmp_path)


def test_credentials_from_os_variables(tmp_path: Path) -> None:
    env = {"OS_AUTH_URL": "https://k/v3", "OS_USERNAME": "u", "OS_PASSWORD": "pw", "OS_PROJECT_NAME": "p",
           "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default", "OS_REGION_NAME": "R",
           "OS_INTERFACE": "public", "OS_IDENTITY_API_VERSION": "3"}
    cloud = glance.load_cloud(None, env=env, cwd=tmp_path, home=tmp_path)
    assert cloud.source == "environment" and cloud.auth_type == "password" and cloud.region_name == "R"
    assert cloud.auth == {"auth_url": "https://k/v3", "username": "u", "password": "pw", "project_name": "p",
                          "user_domain_name": "Default", "project_domain_name": "Default"}
    with pytest.raises(P2VError, match=r"no OpenStack credentials: the spec names no glance\.cloud"):
        glance.load_cloud(None, env={}, cwd=tmp_path, home=tmp_path)


def test_session_needs_complete_auth(tmp_path: Path) -> None:
    cloud = glance.Cloud(name="c", source="x", auth_type="password", auth={"username": "u"})
    with pytest.raises(P2VError, match="lacks auth settings: auth_url"):
        glance.make_session(cloud)
    with pytest.raises(P2VError, match="unknown auth_type 'magic'"):
        glance.make_session(dataclasses.replace(cloud, auth_type="magic"))


# ---------------------------------------------------------------- credentials through openstack.config


def load(tmp_path: Path, name: str | None = "prod", env: dict[str, str] | None = None) -> glance.Cloud:
    return glance.load_cloud(name, env=env or {}, cwd=tmp_path, home=tmp_path / "nohome")


def test_tls_settings_reach_the_session(tmp_path: Path) -> None:
    """insecure, cacert (with ~), cert/key and api_timeout, as openstack.config reads them, make the session."""
    write_clouds(tmp_path / "clouds.yaml",
                 prod={**ENTRY, "cacert": "~/ca.pem", "cert": "/etc/p2v/client.pem", "key": "/etc/p2v/client.key",
                       "api_timeout": 45},
                 insecure={**ENTRY, "insecure": True, "cacert": "/etc/p2v/ca.pem"},
                 certonly={**ENTRY, "cert": "/etc/p2v/both.pem"},
                 plain=ENTRY)
    cloud = load(tmp_path)
    assert cloud.verify == str(Path.home() / "ca.pem") and cloud.cert == ("/etc/p2v/client.pem", "/etc/p2v/client.key")
    session = glance.make_session(cloud)
    assert session.verify == str(Path.home() / "ca.pem")
    assert session.cert == ("/etc/p2v/client.pem", "/etc/p2v/client.key") and session.timeout == 45
    # insecure wins over cacert, as in every OpenStack client
    assert glance.make_session(load(tmp_path, "insecure")).verify is False
    assert load(tmp_path, "certonly").cert == "/etc/p2v/both.pem"
    plain = glance.make_session(load(tmp_path, "plain"))
    assert plain.verify is True and plain.cert is None and plain.timeout is None


def test_image_endpoint_override_goes_to_glance(tmp_path: Path) -> None:
    write_clouds(tmp_path / "clouds.yaml", prod={**ENTRY, "image_endpoint_override": "https://glance.example:9292"})
    cloud = load(tmp_path)
    service = glance.ImageService(cloud, session=glance.make_session(cloud))
    assert service.endpoint == "https://glance.example:9292"
    assert service.client.http_client.endpoint_override == "https://glance.example:9292"


def test_secure_yaml_from_os_client_secure_file(tmp_path: Path) -> None:
    entry = json.loads(json.dumps(ENTRY))
    del entry["auth"]["password"]
    write_clouds(tmp_path / "clouds.yaml", prod=entry)
    write_clouds(tmp_path / "secure.yaml", prod={"auth": {"password": "nearby"}})
    secure = write_clouds(tmp_path / "elsewhere" / "my-secure.yaml",
                          prod={"auth": {"password": "named"}, "insecure": True})
    cloud = load(tmp_path, env={"OS_CLIENT_SECURE_FILE": str(secure)})
    assert cloud.auth["password"] == "named" and cloud.verify is False and cloud.source == str(tmp_path / "clouds.yaml")


def test_profile_and_regions(tmp_path: Path) -> None:
    """A vendor profile (clouds-public.yaml) gives auth_url, regions and interface; the first region is
    taken unless OS_REGION_NAME picks another, and a region the entry does not have is one line."""
    (tmp_path / "clouds-public.yaml").write_text(yaml.safe_dump({"public-clouds": {"acme": {
        "auth": {"auth_url": "https://keystone.acme.example/v3"}, "regions": ["east", "west"],
        "interface": "internal"}}}))
    write_clouds(tmp_path / "clouds.yaml", prod={"profile": "acme", "auth": {"username": "u", "password": "pw",
                                                                             "project_name": "p"}},
                 listed={**{k: v for k, v in ENTRY.items() if k != "region_name"}, "regions": ["One", "Two"]})
    cloud = load(tmp_path)
    assert cloud.auth_url == "https://keystone.acme.example/v3" and cloud.region_name == "east"
    assert cloud.interface == "internal"
    assert load(tmp_path, env={"OS_REGION_NAME": "west"}).region_name == "west"
    assert load(tmp_path, "listed").region_name == "One"
    assert load(tmp_path, "listed", env={"OS_REGION_NAME": "Two"}).region_name == "Two"
    with pytest.raises(P2VError, match=r"^cloud 'listed' \(.*clouds.yaml\): Region Three is not a valid region "
                                       r"name for cloud listed. Valid choices are One,Two"):
        load(tmp_path, "listed", env={"OS_REGION_NAME": "Three"})


def test_tls_and_application_credentials_from_os_variables(tmp_path: Path) -> None:
    env = {"OS_AUTH_URL": "https://k/v3", "OS_APPLICATION_CREDENTIAL_ID": "0123",
           "OS_APPLICATION_CREDENTIAL_SECRET": "s3cret", "OS_CACERT": "/etc/ssl/cloud.pem",
           "OS_CERT": "/etc/p2v/c.pem", "OS_KEY": "/etc/p2v/k.pem", "OS_INTERFACE": "internal"}
    cloud = load(tmp_path, None, env)
    assert cloud.name == "OS_* variables" and cloud.source == "environment"
    assert cloud.auth_type == "v3applicationcredential" and cloud.interface == "internal"
    assert cloud.auth == {"auth_url": "https://k/v3", "application_credential_id": "0123",
                          "application_credential_secret": "s3cret"}
    assert cloud.verify == "/etc/ssl/cloud.pem" and cloud.cert == ("/etc/p2v/c.pem", "/etc/p2v/k.pem")
    assert load(tmp_path, None, {**env, "OS_INSECURE": "true"}).verify is False
    with pytest.raises(P2VError, match=r"^cloud 'OS_\* variables' \(environment\) lacks auth settings: auth_url"):
        load(tmp_path, None, {"OS_USERNAME": "u", "OS_PASSWORD": "pw"})


def test_the_process_environment_is_left_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OS_CLOUD", "from-the-process")
    write_clouds(tmp_path / "clouds.yaml", prod=ENTRY)
    before = dict(os.environ)
    assert load(tmp_path, env={"OS_CLOUD": "prod"}, name=None).name == "prod"
    with pytest.raises(P2VError):
        load(tmp_path, "nope")
    assert dict(os.environ) == before


@pytest.mark.parametrize(("entry", "message"), [
    ({**ENTRY, "auth_type": "magic"}, r"^cloud 'prod' \(.*/clouds.yaml\): unknown auth_type 'magic'"),
    ({"auth": {"username": "u", "password": "pw"}}, r"^cloud 'prod' \(.*/clouds.yaml\) lacks auth settings: auth_url"),
    ({**ENTRY, "auth": "not a mapping"}, r"^cloud 'prod' in .*/clouds.yaml: its 'auth' is not a mapping"),
    ("a string", r"^cloud 'prod' in .*/clouds.yaml: the entry is not a mapping"),
    ({**ENTRY, "regions": [{"name": "x", "bogus": 1}]}, r"^cloud 'prod' \(.*/clouds.yaml\): Invalid region entry"),
])
def test_a_bad_entry_is_one_line_naming_the_cloud_and_the_file(tmp_path: Path, entry: Any, message: str) -> None:
    write_clouds(tmp_path / "clouds.yaml", prod=entry)
    with pytest.raises(P2VError, match=message) as raised:
        load(tmp_path)
    assert "\n" not in str(raised.value) and "s3cret" not in str(raised.value)


def test_a_file_openstack_config_would_skip_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    """openstack.config skips a clouds.yaml or secure.yaml it cannot parse and takes the next one
    (or none): p2v stops instead, naming the file and the line."""
    home = tmp_path / "home"
    write_clouds(home / ".config" / "openstack" / "clouds.yaml", prod=ENTRY)
    (tmp_path / "clouds.yaml").write_text("clouds:\n  prod: [unclosed\n")
    with pytest.raises(P2VError, match=rf"^{tmp_path}/clouds.yaml is not valid YAML \(line 3\)"):
        glance.load_cloud("prod", env={}, cwd=tmp_path, home=home)
    (tmp_path / "clouds.yaml").unlink()
    (tmp_path / "secure.yaml").write_text("clouds: {prod: {auth: {password: [x}}}\n")
    with pytest.raises(P2VError, match=rf"^{tmp_path}/secure.yaml is not valid YAML"):
        glance.load_cloud("prod", env={}, cwd=tmp_path, home=home)
    (tmp_path / "secure.yaml").unlink()
    assert glance.load_cloud("prod", env={}, cwd=tmp_path, home=home).source.startswith(str(home))
    (tmp_path / "clouds.yaml").write_text("- a list\n")
    with pytest.raises(P2VError, match=r"^OpenStack configuration: Configuration file .*clouds.yaml is empty or "
                                       "not a valid mapping"):
        glance.load_cloud("prod", env={}, cwd=tmp_path, home=home)


# ---------------------------------------------------------------- errors and retries


CLOUD = glance.Cloud(name="prod", source="clouds.yaml", auth_type="password",
                     auth={"auth_url": "https://k/v3", "username": "u", "password": "pw", "project_name": "p"})


@pytest.mark.parametrize(("error", "kind", "text"), [
    (ks_exc.Unauthorized(), glance.AuthError, "Keystone refused user 'u' for project 'p'"),
    (glance_exc.HTTPUnauthorized(), glance.AuthError, "401 Unauthorized"),
    (glance_exc.HTTPForbidden(), P2VError, "403 Forbidden"),
    (glance_exc.HTTPOverLimit(), P2VError, "the image store is full"),
    (glance_exc.HTTPConflict(), P2VError, "Glance answered 409"),
    (glance_exc.HTTPServiceUnavailable(), glance.TransientError, "Glance answered 503"),
    (glance_exc.HTTPInternalServerError(), glance.TransientError, "Glance answered 500"),
    (ks_exc.ConnectFailure("Unable to establish connection to http://g:9292/v2: Connection refused"),
     glance.TransientError, r"cannot reach http://g:9292 \(connection refused\)"),
    (glance_exc.CommunicationError("Error finding address for http://g:9292/v2/images: reset"),
     glance.TransientError, "cannot reach http://g:9292"),
    (ConnectionResetError(104, "Connection reset by peer"), glance.TransientError, r"\(connection reset\)"),
    (ks_exc.EndpointNotFound(), P2VError, "no image service"),
    (ks_exc.DiscoveryFailure("nothing there"), P2VError, "no Keystone identity API at https://k/v3"),
])
def test_translate(error: Exception, kind: type[P2VError], text: str) -> None:
    translated = glance.translate(error, "doing it", CLOUD)
    assert type(translated) is kind
    assert str(translated).startswith("doing it: ")
    assert re.search(text, str(translated)), str(translated)
    assert "pw" not in str(translated).replace("password", "")


def test_retrying_retries_transient_errors_only() -> None:
    policy = glance.RetryPolicy(attempts=3, wait_min=0.01, wait_max=0.02)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise glance_exc.HTTPServiceUnavailable()
        return "ok"

    assert glance.retrying("x", flaky, CLOUD, policy) == "ok" and len(calls) == 3

    calls.clear()

    def down() -> None:
        calls.append(1)
        raise ks_exc.ConnectFailure("Connection refused")

    with pytest.raises(P2VError, match=r"gave up after 3 attempts") as raised:
        glance.retrying("x", down, CLOUD, policy)
    assert len(calls) == 3 and not isinstance(raised.value, glance.TransientError)

    calls.clear()

    def refused() -> None:
        calls.append(1)
        raise glance_exc.HTTPForbidden()

    with pytest.raises(P2VError, match="403"):
        glance.retrying("x", refused, CLOUD, policy)
    assert len(calls) == 1


def test_stage_declaration() -> None:
    assert upload.STAGE.name == "upload" and upload.STAGE.target == "uploaded.stamp"
    assert upload.STAGE.inputs == ("verified.stamp", "disk-plan.json", "layout.json")
    config = upload.STAGE.config(make_spec(GlancePolicy(cloud="prod", tags=("a",))))
    assert config["cloud"] == "prod" and config["tags"] == ["a"] and config["format"] == "raw"
