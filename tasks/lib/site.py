"""The site: the PXE network that serves the live system, checked once at the edge.

`live/site.yaml` (or the file `P2V_SITE` names) says where the infra host is
on the PXE network and where the NFS work area lives. Only `doit pxe` and the
live path read it; converting disk images needs none of it. Errors are one
line, `<file>: <field>: <what was expected>`, like the specs'.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.livehost import WORK_AREA_TRIES
from tasks.lib.spec import PROJECT_DIR, Spec, SpecError, read_yaml, shown_path, validate

SITE_SCHEMA = PROJECT_DIR / "tasks" / "schemas" / "site.schema.json"
DEFAULT_SITE = PROJECT_DIR / "live" / "site.yaml"


@dataclass(frozen=True)
class Site:
    file: str  # as shown in messages
    server: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    work_area: Path
    deploy_dir: Path
    http_port: int = 8080
    router: ipaddress.IPv4Address | None = None
    interface: str | None = None
    lease_time: str = "12h"
    work_area_tries: int = WORK_AREA_TRIES

    @property
    def http_base(self) -> str:
        return f"http://{self.server}:{self.http_port}"

    def host_work_dir(self, host: str) -> Path:
        """The host's directory in the work area: its NFS export, at the same path on both sides."""
        return self.work_area / host


def site_file() -> Path:
    return Path(os.environ.get("P2V_SITE", DEFAULT_SITE))


def load_site(path: Path | None = None, base: Path = PROJECT_DIR) -> Site:
    path = path or site_file()
    shown = shown_path(path, base)
    data = read_yaml(path, shown)
    validate(data if data is not None else {}, SITE_SCHEMA, shown)
    addresses: dict[str, ipaddress.IPv4Address | None] = {}
    for key in ("server", "router"):
        try:
            addresses[key] = ipaddress.IPv4Address(data[key]) if key in data else None
        except ValueError:
            raise SpecError(shown, key, f"{data[key]!r} is not an IPv4 address") from None
    try:
        network = ipaddress.IPv4Network(data["network"])
    except ValueError as error:
        raise SpecError(shown, "network", f"{data['network']!r} is not a network address with a prefix: {error}") \
            from None
    server = addresses["server"]
    assert server is not None  # required by the schema
    if server not in network:
        raise SpecError(shown, "server", f"{server} is not in the PXE network {network}")
    deploy = Path(data.get("deploy_dir", "work/pxe"))
    return Site(file=shown, server=server, network=network, work_area=Path(data["work_area"]),
                deploy_dir=deploy if deploy.is_absolute() else base / deploy, http_port=data.get("http_port", 8080),
                router=addresses["router"], interface=data.get("interface"), lease_time=data.get("lease_time", "12h"),
                work_area_tries=data.get("work_area_tries", WORK_AREA_TRIES))


def pxe_specs(site: Site, specs: list[Spec]) -> list[Spec]:
    """The specs of PXE-booted servers, checked against the site: each reserved
    address in the PXE network (and not the server's), each workdir the host's
    directory of the work area (the live system mounts it at that same path)."""
    chosen = [spec for spec in specs if spec.source.pxe]
    for spec in chosen:
        assert spec.live.address is not None and spec.live.mac is not None  # checked with the spec
        address = ipaddress.IPv4Address(spec.live.address)
        if address not in site.network or address in (site.network.network_address,
                                                       site.network.broadcast_address):
            raise SpecError(spec.file, "live.address", f"{address} is not a host address of the PXE network "
                            f"{site.network} ({site.file})")
        if address == site.server:
            raise SpecError(spec.file, "live.address", f"{address} is the infra server's own address ({site.file})")
        if spec.workdir != site.host_work_dir(spec.host):
            raise SpecError(spec.file, "workdir", f"a PXE-booted server works in {site.host_work_dir(spec.host)} "
                            f"(the work area of {site.file}), not {spec.workdir}",
                            ) from None
    return chosen
