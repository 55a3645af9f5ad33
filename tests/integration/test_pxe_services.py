"""The rendered PXE network, served for real in network namespaces: dnsmasq hands the
reserved address and boot file to a known MAC and nothing to an unknown one, TFTP and
HTTP serve the boot files, and nfs-ganesha admits each host to its own directory of
the work area alone (read and written with libnfs's userspace client: this kernel has
no NFS client)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tasks.lib.pxe import LIVE_FILES
from tasks.lib.site import load_site, pxe_specs
from tasks.lib.spec import load_specs
from tasks.pxe import deploy
from tests.services.pxenet import PxeNetwork, pxe_network, start_services
from tests.unit.test_pxe import CLOUD_ENV, SPECS, project, write_clouds

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc calls this with the lease in its environment: keep what the test checks.
[ "$1" = bound ] && env | grep -E '^(ip|siaddr|boot_file|subnet|router)=' > "$(dirname "$0")/lease.$interface"
exit 0
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pxenet")
    work_area = tmp / "area"
    spec_dir, site_file = project(tmp, {"web1": SPECS["web1"], "db2": SPECS["db2"]}, work_area=str(work_area))
    site_file.write_text(site_file.read_text().replace("/srv/p2v/pxe", str(tmp / "deploy")))
    live = tmp / "live"
    live.mkdir()
    for name in LIVE_FILES:
        (live / name).write_bytes(name.encode() * 1000)
    # web1 uploads from its live system: `doit pxe` gives it an application credential.
    environment = {"P2V_SITE": str(site_file), "OS_CLIENT_CONFIG_FILE": str(write_clouds(tmp)), **CLOUD_ENV}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        site = load_site(site_file, base=tmp)
        specs = pxe_specs(site, load_specs(spec_dir))
        deploy(site, specs, live)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with pxe_network(site, tmp / "logs") as net:
        start_services(net, site.deploy_dir)
        clients = {name: net.add_client(name, mac) for name, mac in
                   {"web1": "52:54:00:aa:00:01", "db2": "52:54:00:aa:00:02", "stranger": "52:54:00:aa:00:99"}.items()}
        script = tmp / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        yield {"net": net, "site": site, "clients": clients, "tmp": tmp, "script": script, "work_area": work_area}


def lease(served: dict[str, Any], name: str) -> dict[str, str] | None:
    net: PxeNetwork = served["net"]
    result = net.exec(["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-s",
                       str(served["script"])], namespace=served["clients"][name], timeout=60)
    path = served["script"].parent / "lease.eth0"
    if result.returncode != 0 or not path.exists():
        return None
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    path.unlink()
    return values


def configure(served: dict[str, Any], name: str, address: str) -> None:
    net: PxeNetwork = served["net"]
    namespace = served["clients"][name]
    if address not in net.exec(["ip", "-4", "addr", "show", "eth0"], namespace=namespace).stdout:
        assert net.exec(["ip", "addr", "add", f"{address}/24", "dev", "eth0"], namespace=namespace).returncode == 0


def test_dhcp_answers_reserved_hosts_only(served: dict[str, Any]) -> None:
    got = lease(served, "web1")
    assert got is not None
    assert got["ip"] == "192.0.2.21" and got["siaddr"] == "192.0.2.1" and got["boot_file"] == "pxelinux.0"
    assert got.get("router") == "192.0.2.254"
    assert (lease(served, "db2") or {}).get("ip") == "192.0.2.22"
    assert lease(served, "stranger") is None  # never answered: it can never boot the live system


def test_tftp_and_http_serve_the_boot_files(served: dict[str, Any]) -> None:
    net: PxeNetwork = served["net"]
    configure(served, "web1", "192.0.2.21")
    namespace = served["clients"]["web1"]
    out = served["tmp"] / "fetched"
    out.mkdir(exist_ok=True)
    deploy_dir = served["site"].deploy_dir
    for remote in ("pxelinux.0", "pxelinux.cfg/01-52-54-00-aa-00-01", "live/vmlinuz"):
        local = out / remote.replace("/", "_")
        result = net.exec(["tftp", "-m", "binary", "192.0.2.1", "-c", "get", remote, str(local)], namespace=namespace)
        assert result.returncode == 0 and local.read_bytes() == (deploy_dir / "tftp" / remote).read_bytes(), remote
    for remote in ("ipxe/boot.ipxe", "ipxe/52-54-00-aa-00-01.ipxe", "live/squashfs.img"):
        result = net.exec(["curl", "-sf", f"http://192.0.2.1:8080/{remote}"], namespace=namespace)
        assert result.returncode == 0 and result.stdout == (deploy_dir / "http" / remote).read_text(), remote


def nfs(served: dict[str, Any], client: str, *args: str) -> Any:
    return served["net"].exec(list(args), namespace=served["clients"][client], timeout=60)


def test_each_host_reaches_its_own_work_directory_alone(served: dict[str, Any]) -> None:
    configure(served, "web1", "192.0.2.21")
    configure(served, "db2", "192.0.2.22")
    configure(served, "stranger", "192.0.2.99")
    area = served["work_area"]
    web1 = f"nfs://192.0.2.1{area}/web1"
    listing = nfs(served, "web1", "nfs-ls", f"{web1}/spec?version=4")
    assert listing.returncode == 0 and "web1.yaml" in listing.stdout, listing.stderr
    note = served["tmp"] / "note.txt"
    note.write_text("written by web1 over NFS\n")
    copied = nfs(served, "web1", "nfs-cp", str(note), f"{web1}/note.txt?version=4")
    assert copied.returncode == 0, copied.stderr
    assert (area / "web1" / "note.txt").read_text() == "written by web1 over NFS\n"
    assert (area / "web1" / "note.txt").stat().st_uid == 0  # no root squash: the live system works as root
    # Another host, and a machine with no reservation, see nothing of web1's directory.
    for other in ("db2", "stranger"):
        refused = nfs(served, other, "nfs-ls", f"{web1}/spec?version=4")
        assert refused.returncode != 0, (other, refused.stdout)
        assert "web1.yaml" not in refused.stdout
    assert nfs(served, "db2", "nfs-ls", f"nfs://192.0.2.1{area}/db2/spec?version=4").returncode == 0
