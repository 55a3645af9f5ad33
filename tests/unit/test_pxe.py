"""`doit pxe`: the PXE network's files rendered from the site and the specs (golden files),
the specs' live fields refused with one line when wrong, and the deploy tree written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.livecloud import live_cloud_env
from tasks.lib.pxe import LIVE_FILES, render_deploy
from tasks.lib.runner import P2VError
from tasks.lib.site import load_site, pxe_specs
from tasks.lib.spec import PROJECT_DIR, SpecError, load_specs
from tasks.pxe import deploy

GOLDEN = Path(__file__).parent / "data" / "pxe"

SITE = """\
server: 192.0.2.1
network: 192.0.2.0/24
router: 192.0.2.254
interface: br-p2v
http_port: 8080
work_area: {work_area}
deploy_dir: /srv/p2v/pxe
"""

SPECS = {
    "web1": """\
description: an old web server
source:
  disks: auto
live:
  mac: "52:54:00:AA:00:01"
  address: 192.0.2.21
fix:
  cloud_init:
    source: distro
""",
    "db2": """\
source:
  disks:
    - /dev/disk/by-id/wwn-0x5000c500a1b2c3d4
    - serial:Z1D2E3F4
live:
  mac: "52:54:00:aa:00:02"
  address: 192.0.2.22
  debug: true
  last_stage: fix
""",
    "images1": "source:\n  images: [disk.img]\n",  # not a PXE host: no files for it
}


def project(tmp_path: Path, specs: dict[str, str] = SPECS, site: str = SITE,
            work_area: str = "/srv/p2v/work") -> tuple[Path, Path]:
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir(parents=True)
    (tmp_path / "disk.img").write_bytes(b"\0" * 512)
    for host, text in specs.items():
        (spec_dir / f"{host}.yaml").write_text(text)
    site_file = tmp_path / "site.yaml"
    site_file.write_text(site.format(work_area=work_area))
    return spec_dir, site_file


@pytest.fixture
def site_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    site_file = tmp_path / "site.yaml"
    monkeypatch.setenv("P2V_SITE", str(site_file))
    return site_file


def test_rendered_files_match_the_golden_files(tmp_path: Path, site_env: Path) -> None:
    spec_dir, _ = project(tmp_path)
    site = load_site(site_env, base=tmp_path)
    files = render_deploy(site, pxe_specs(site, load_specs(spec_dir)))
    if os.environ.get("P2V_REGENERATE_PXE"):
        for relative, text in files.items():
            path = GOLDEN / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    golden = {str(p.relative_to(GOLDEN)): p.read_text() for p in sorted(GOLDEN.rglob("*")) if p.is_file()}
    assert sorted(files) == sorted(golden)
    for relative, text in files.items():
        assert text == golden[relative], relative


def test_rendered_values_say_what_the_specs_say(tmp_path: Path, site_env: Path) -> None:
    spec_dir, _ = project(tmp_path)
    site = load_site(site_env, base=tmp_path)
    files = render_deploy(site, pxe_specs(site, load_specs(spec_dir)))
    assert "dhcp-host=52:54:00:aa:00:01,192.0.2.21,web1" in files["dnsmasq.conf"]
    assert "dhcp-range=192.0.2.0,static,255.255.255.0,12h" in files["dnsmasq.conf"]
    web1 = files["http/ipxe/52-54-00-aa-00-01.ipxe"]
    assert "root=live:http://192.0.2.1:8080/live/squashfs.img" in web1
    assert "p2v.host=web1 p2v.work=192.0.2.1:/srv/p2v/work/web1" in web1
    assert "p2v.debug=1" not in web1 and "p2v.debug=1" in files["http/ipxe/52-54-00-aa-00-02.ipxe"]
    assert files["tftp/pxelinux.cfg/01-52-54-00-aa-00-01"].count("APPEND ") == 1
    ganesha = files["ganesha.conf"]
    assert ganesha.count("EXPORT {") == 2 and "Clients = 192.0.2.21;" in ganesha
    assert "/srv/p2v/work/db2 192.0.2.22(rw,sync,no_root_squash,no_subtree_check)" in files["exports"]
    assert "images1" not in "".join(files.values())


def test_the_live_system_can_stop_after_sync(tmp_path: Path, site_env: Path) -> None:
    """Only inspect and sync read the source: the infra side can run everything from disk on."""
    spec_dir, _ = project(tmp_path, {"web1": SPECS["web1"].replace("  address: 192.0.2.21\n",
                                                                   "  address: 192.0.2.21\n  last_stage: sync\n")})
    (spec,) = load_specs(spec_dir)
    assert spec.live.last_stage == "sync"


def test_a_pxe_host_works_in_its_directory_of_the_work_area(tmp_path: Path, site_env: Path) -> None:
    spec_dir, _ = project(tmp_path)
    specs = {s.host: s for s in load_specs(spec_dir)}
    assert specs["web1"].workdir == Path("/srv/p2v/work/web1")
    assert specs["web1"].source.pxe and not specs["images1"].source.pxe
    assert specs["db2"].source.identity == ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "serial:Z1D2E3F4")
    assert specs["web1"].live.mac == "52:54:00:aa:00:01"
    with pytest.raises(P2VError, match="reachable only from the live system"):
        _ = specs["web1"].source.disks


@pytest.mark.parametrize(("specs", "message"), [
    ({"web1": SPECS["web1"], "web2": SPECS["web1"]},
     r"^specs/web2.yaml: live.mac: mac 52:54:00:aa:00:01 is also used by host 'web1' \(specs/web1.yaml\)$"),
    ({"web1": SPECS["web1"], "web2": SPECS["web1"].replace("AA:00:01", "AA:00:09")},
     r"^specs/web2.yaml: live.address: address 192.0.2.21 is also used by host 'web1' \(specs/web1.yaml\)$"),
    ({"web1": SPECS["web1"].replace("52:54:00:AA:00:01", "52:54:00:AA:00")},
     r"^specs/web1.yaml: live.mac: '52:54:00:AA:00' does not match the expected form"),
    ({"web1": SPECS["web1"].replace("52:54:00:AA:00:01", "52-54-00-aa-00-01")},
     r"^specs/web1.yaml: live.mac: '52-54-00-aa-00-01' does not match the expected form"),
    ({"web1": "source:\n  disks: auto\nlive:\n  address: 192.0.2.21\n"},
     r"^specs/web1.yaml: live.mac: required for a PXE-booted server \(source.disks\)$"),
    ({"web1": SPECS["web1"].replace("192.0.2.21", "192.0.2.300")},
     r"^specs/web1.yaml: live.address: '192.0.2.300' is not an IPv4 address$"),
    ({"web1": "source:\n  disks: [/dev/sda]\nlive: {mac: '52:54:00:aa:00:01', address: 192.0.2.21}\n"},
     r"^specs/web1.yaml: source.disks\[0\]: '/dev/sda' does not match the expected form"),
    ({"web1": "source:\n  disks: all\nlive: {mac: '52:54:00:aa:00:01', address: 192.0.2.21}\n"},
     r"^specs/web1.yaml: source.disks: 'all' does not match the expected form"),
    # disk needs no source, but sync does: a live system that stopped after disk would have read nothing.
    ({"web1": SPECS["web1"].replace("  address: 192.0.2.21\n", "  address: 192.0.2.21\n  last_stage: disk\n")},
     r"^specs/web1.yaml: live.last_stage: expected one of 'sync', 'fix', 'verify', 'report', 'upload', got 'disk'$"),
])
def test_bad_live_fields_are_one_line_naming_file_and_field(tmp_path: Path, site_env: Path,
                                                          specs: dict[str, str], message: str) -> None:
    spec_dir, _ = project(tmp_path, specs)
    with pytest.raises(SpecError, match=message) as error:
        load_specs(spec_dir)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("change", "message"), [
    (("192.0.2.21", "198.51.100.21"), r"live.address: 198.51.100.21 is not a host address of the PXE network"),
    (("192.0.2.21", "192.0.2.1"), r"live.address: 192.0.2.1 is the infra server's own address"),
])
def test_addresses_must_fit_the_site(tmp_path: Path, site_env: Path, change: tuple[str, str], message: str) -> None:
    spec_dir, _ = project(tmp_path, {"web1": SPECS["web1"].replace(*change)})
    site = load_site(site_env, base=tmp_path)
    with pytest.raises(SpecError, match=rf"^specs/web1.yaml: {message}"):
        pxe_specs(site, load_specs(spec_dir))


@pytest.mark.parametrize(("site", "message"), [
    (SITE.replace("server: 192.0.2.1", "server: 198.51.100.1"), "server: 198.51.100.1 is not in the PXE network"),
    (SITE.replace("network: 192.0.2.0/24", "network: 192.0.2.0"), "network: '192.0.2.0' does not match"),
    (SITE.replace("http_port: 8080", "http_port: 0"), "http_port: 0 is out of range"),
    (SITE + "tftp: yes\n", "tftp: unknown key"),
])
def test_a_bad_site_is_one_line(tmp_path: Path, site_env: Path, site: str, message: str) -> None:
    project(tmp_path, {}, site=site)
    with pytest.raises(SpecError, match=rf"^site.yaml: {message}"):
        load_site(site_env, base=tmp_path)


APP_CREDENTIAL_CLOUDS = """\
clouds:
  p2v-live-upload:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://keystone.example:5000/v3
      application_credential_id: 0123abcd
      application_credential_secret: s3cret
    region_name: RegionTwo
    cacert: {cacert}
  p2v-admin:
    auth:
      auth_url: https://keystone.example:5000/v3
      username: admin
      password: hunter2
      project_name: admin
"""


def write_clouds(directory: Path) -> Path:
    """The infra side's clouds.yaml: an application credential for live uploads, and an admin."""
    cacert = directory / "ca.pem"
    cacert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    path = directory / "clouds.yaml"
    path.write_text(APP_CREDENTIAL_CLOUDS.format(cacert=cacert))
    return path


# OS_CLOUD names the application credential, for specs that name no glance.cloud.
CLOUD_ENV = {"OS_CLOUD": "p2v-live-upload"}


@pytest.fixture
def clouds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    path = write_clouds(tmp_path)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    for name, value in CLOUD_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_deploy_writes_the_tree_and_each_hosts_spec(tmp_path: Path, site_env: Path, clouds: Path) -> None:
    work_area = tmp_path / "area"
    spec_dir, _ = project(tmp_path, work_area=str(work_area))
    site_env.write_text(site_env.read_text().replace("/srv/p2v/pxe", str(tmp_path / "deploy")))
    live = tmp_path / "live"
    live.mkdir()
    for name in LIVE_FILES:
        (live / name).write_bytes(name.encode())
    site = load_site(site_env, base=tmp_path)
    specs = pxe_specs(site, load_specs(spec_dir))
    counts = deploy(site, specs, live)
    deployed = tmp_path / "deploy"
    assert counts["hosts"] == 2 and counts["changed"] == counts["files"] + 2
    assert (deployed / "tftp/pxelinux.0").is_file() and (deployed / "tftp/ldlinux.c32").is_file()
    assert (deployed / "http/live/squashfs.img").read_bytes() == b"squashfs.img"
    assert (deployed / "tftp/live/vmlinuz").read_bytes() == b"vmlinuz"
    assert not (deployed / "tftp/live/squashfs.img").exists()
    assert (work_area / "web1/spec/web1.yaml").read_text() == SPECS["web1"]
    assert (work_area / "web1/spec/web1.yaml").stat().st_mode & 0o777 == 0o600
    # web1 uploads from its live system: its directory holds the application credential alone;
    # db2 stops after fix, so the credential stays on the infra side.
    assert counts["credentials"] == 1 and not (work_area / "db2/cloud").exists()
    written = work_area / "web1/cloud/clouds.yaml"
    assert written.stat().st_mode & 0o777 == 0o600 and (work_area / "web1/cloud").stat().st_mode & 0o777 == 0o700
    entry = yaml.safe_load(written.read_text())["clouds"]
    assert list(entry) == ["p2v-live-upload"]
    assert entry["p2v-live-upload"]["auth"] == {"auth_url": "https://keystone.example:5000/v3",
                                                "application_credential_id": "0123abcd",
                                                "application_credential_secret": "s3cret"}
    assert entry["p2v-live-upload"]["region_name"] == "RegionTwo"
    assert Path(entry["p2v-live-upload"]["cacert"]) == work_area / "web1/cloud/cacert.pem"
    assert "BEGIN CERTIFICATE" in (work_area / "web1/cloud/cacert.pem").read_text()
    assert "hunter2" not in written.read_text() and "admin" not in written.read_text()
    assert live_cloud_env(work_area / "web1") == {"OS_CLIENT_CONFIG_FILE": str(written), "OS_CLOUD": "p2v-live-upload"}
    assert live_cloud_env(work_area / "db2") == {}
    # Again: nothing changes. Then db2's spec goes: its boot files go with it.
    assert deploy(site, specs, live)["changed"] == 0
    (spec_dir / "db2.yaml").unlink()
    again = deploy(site, pxe_specs(site, load_specs(spec_dir)), live)
    assert again["removed"] == 2
    assert not (deployed / "http/ipxe/52-54-00-aa-00-02.ipxe").exists()
    assert "52:54:00:aa:00:02" not in (deployed / "dnsmasq.conf").read_text()


def test_doit_pxe_without_a_live_system_is_one_line(tmp_path: Path) -> None:
    spec_dir, site_file = project(tmp_path, {"web1": SPECS["web1"]})
    env = {**os.environ, "P2V_SPECS": str(spec_dir), "P2V_SITE": str(site_file)}
    env.pop("P2V_LIVE_DIR", None)
    result = subprocess.run([sys.executable, "-m", "doit", "pxe"], cwd=PROJECT_DIR, env=env, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode != 0
    assert "pxe: no live system to serve" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_dnsmasq_accepts_the_rendered_config() -> None:
    result = subprocess.run(["dnsmasq", "--test", f"--conf-file={GOLDEN / 'dnsmasq.conf'}"], capture_output=True,
                            text=True, check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stderr


def _deploy_one(tmp_path: Path, site_env: Path, spec: str) -> tuple[Path, dict[str, int]]:
    work_area = tmp_path / "area"
    spec_dir, _ = project(tmp_path, {"web1": spec}, work_area=str(work_area))
    site_env.write_text(site_env.read_text().replace("/srv/p2v/pxe", str(tmp_path / "deploy")))
    live = tmp_path / "live"
    live.mkdir(exist_ok=True)
    for name in LIVE_FILES:
        (live / name).write_bytes(name.encode())
    site = load_site(site_env, base=tmp_path)
    return work_area, deploy(site, pxe_specs(site, load_specs(spec_dir)), live)


def test_a_password_never_goes_to_the_live_system(tmp_path: Path, site_env: Path, clouds: Path) -> None:
    spec = SPECS["web1"] + "glance:\n  cloud: p2v-admin\n"
    with pytest.raises(P2VError) as raised:
        _deploy_one(tmp_path, site_env, spec)
    message = str(raised.value)
    assert message.startswith("specs/web1.yaml: live.last_stage is upload")
    assert "'p2v-admin'" in message and "never puts a password" in message and "live.last_stage: report" in message
    assert "hunter2" not in message and "\n" not in message
    assert not (tmp_path / "area/web1/cloud").exists()


def test_no_credentials_at_all_is_one_line_naming_the_spec(tmp_path: Path, site_env: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OS_CLOUD", "OS_AUTH_URL", "OS_CLIENT_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(P2VError, match=r"^specs/web1.yaml: live.last_stage is upload.*no OpenStack credentials"):
        _deploy_one(tmp_path, site_env, SPECS["web1"])


def test_an_earlier_last_stage_takes_the_credential_away(tmp_path: Path, site_env: Path, clouds: Path) -> None:
    work_area, counts = _deploy_one(tmp_path, site_env, SPECS["web1"])
    assert counts["credentials"] == 1 and (work_area / "web1/cloud/clouds.yaml").is_file()
    spec_text = SPECS["web1"].replace("  address: 192.0.2.21\n", "  address: 192.0.2.21\n  last_stage: report\n")
    (tmp_path / "specs/web1.yaml").write_text(spec_text)
    site = load_site(site_env, base=tmp_path)
    counts = deploy(site, pxe_specs(site, load_specs(tmp_path / "specs")), tmp_path / "live")
    assert counts["credentials"] == 0 and not (work_area / "web1/cloud").exists()


def test_the_live_credential_keeps_the_endpoint_and_timeout_and_refuses_a_client_certificate(
        tmp_path: Path, site_env: Path, clouds: Path) -> None:
    """openstack.config's keys that the live system needs to reach the same Glance go with the
    credential; a client certificate (cert/key) is refused in one line, like a password."""
    data = yaml.safe_load(clouds.read_text())
    data["clouds"]["p2v-live-upload"].update(image_endpoint_override="https://glance.example:9292", api_timeout=60)
    clouds.write_text(yaml.safe_dump(data))
    work_area, _ = _deploy_one(tmp_path, site_env, SPECS["web1"])
    entry = yaml.safe_load((work_area / "web1/cloud/clouds.yaml").read_text())["clouds"]["p2v-live-upload"]
    assert entry["image_endpoint_override"] == "https://glance.example:9292" and entry["api_timeout"] == 60
    data["clouds"]["p2v-live-upload"].update(cert="/etc/p2v/client.pem", key="/etc/p2v/client.key")
    clouds.write_text(yaml.safe_dump(data))
    with pytest.raises(P2VError, match=r"^specs/web1.yaml: cloud 'p2v-live-upload' \(.*clouds.yaml\) authenticates "
                                       r"with a client certificate \(cert/key\)") as raised:
        site = load_site(site_env, base=tmp_path)
        deploy(site, pxe_specs(site, load_specs(tmp_path / "specs")), tmp_path / "live")
    assert "\n" not in str(raised.value)
