"""The infra side of the live path, rendered: DHCP, TFTP, HTTP and NFS files from the site and the specs.

    render_deploy(site, specs) -> {relative path: text}

Pure: no file is read but the templates (live/templates, jinja2 with
StrictUndefined, so a missing value is an error, not an empty string). The
`pxe` task (tasks/pxe.py) writes the result into the deploy tree and the
work area. What each file exposes is said in the README ("Deploying the live
path").
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from live.cmdline import INITRD_NAME, KERNEL_NAME, SQUASHFS_NAME, live_cmdline
from tasks.lib import templating
from tasks.lib.paths import write_file_atomically
from tasks.lib.runner import P2VError
from tasks.lib.site import Site
from tasks.lib.spec import PROJECT_DIR, Spec

TEMPLATES = PROJECT_DIR / "live" / "templates"
LIVE_FILES = (KERNEL_NAME, INITRD_NAME, SQUASHFS_NAME)  # what bin/live-build makes, served as live/<name>
DEBUG_ARGS = ("p2v.debug=1", "rd.live.debug=1", "rd.shell", "rd.debug")


@dataclass(frozen=True)
class PxeHost:
    """One server on the PXE network, as the templates see it."""

    name: str
    spec_file: str
    mac: str  # aa:bb:cc:dd:ee:ff
    address: str
    work_dir: str
    export_id: int
    cmdline: str

    @property
    def mac_hyphens(self) -> str:
        """How iPXE's ${mac:hexhyp} and pxelinux name a MAC."""
        return self.mac.replace(":", "-")


def kernel_cmdline(site: Site, spec: Spec) -> str:
    """The live system's kernel command line: where its root is (dracut livenet),
    which NIC boots (BOOTIF), and the p2v.* arguments its runner reads."""
    assert spec.live.mac is not None
    extra = [
        f"BOOTIF=01-{spec.live.mac.replace(':', '-')}",
        f"p2v.host={spec.host}",
        f"p2v.work={site.server}:{site.host_work_dir(spec.host)}",
        f"p2v.work_tries={site.work_area_tries}",
    ]
    if spec.live.debug:
        extra += DEBUG_ARGS
    return live_cmdline(f"{site.http_base}/live/{SQUASHFS_NAME}", extra)


def export_id(host: str) -> int:
    """Stable across renders (a live client keeps its file handles when hosts are added)."""
    return 100 + zlib.crc32(host.encode()) % 60000


def pxe_hosts(site: Site, specs: Sequence[Spec]) -> list[PxeHost]:
    hosts: list[PxeHost] = []
    ids: dict[int, str] = {}
    for spec in sorted(specs, key=lambda s: s.host):
        assert spec.live.mac is not None and spec.live.address is not None  # checked with the spec
        ident = export_id(spec.host)
        if ident in ids:
            raise P2VError(f"hosts {ids[ident]} and {spec.host} get the same NFS Export_Id {ident}",
                           hint="rename one of the two spec files")
        ids[ident] = spec.host
        hosts.append(PxeHost(name=spec.host, spec_file=spec.file, mac=spec.live.mac, address=spec.live.address,
                             work_dir=str(site.host_work_dir(spec.host)), export_id=ident,
                             cmdline=kernel_cmdline(site, spec)))
    return hosts


def _environment() -> jinja2.Environment:
    return templating.environment(TEMPLATES)


def render_deploy(site: Site, specs: Sequence[Spec], deploy_dir: Path | None = None) -> dict[str, str]:
    """Every file of the deploy tree, by its path relative to the deploy dir."""
    hosts = pxe_hosts(site, specs)
    env = _environment()
    values = {"site": site, "hosts": hosts, "deploy_dir": str(deploy_dir or site.deploy_dir)}
    files = {
        "dnsmasq.conf": env.get_template("dnsmasq.conf.j2").render(values),
        "dhcpd-hosts.conf": env.get_template("dhcpd-hosts.conf.j2").render(values),
        "ganesha.conf": env.get_template("ganesha.conf.j2").render(values),
        "exports": env.get_template("exports.j2").render(values),
        "tftp/pxelinux.cfg/default": env.get_template("pxelinux-default.j2").render(values),
        "http/ipxe/boot.ipxe": env.get_template("boot.ipxe.j2").render(values),
    }
    for host in hosts:
        files[f"tftp/pxelinux.cfg/01-{host.mac_hyphens}"] = env.get_template("pxelinux-host.j2").render(
            {**values, "host": host})
        files[f"http/ipxe/{host.mac_hyphens}.ipxe"] = env.get_template("host.ipxe.j2").render(
            {**values, "host": host})
    return files


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write a deploy-tree or work-area file atomically, only when its text changes; True if it did.

    The file is created with its mode (a spec, a credential: 0600), never readable by others
    even for a moment, and an unchanged file gets its mode back."""
    if path.is_file() and path.read_text() == text:
        path.chmod(mode)
        return False
    write_file_atomically(path, text, mode)
    return True
