"""`doit pxe`: the infra side of the live path, rendered from live/site.yaml and the specs.

    deploy tree (site.deploy_dir, default work/pxe):
      dnsmasq.conf             DHCP (reserved hosts only) + TFTP + the iPXE chain
      dhcpd-hosts.conf         the same hosts for sites that run ISC dhcpd
      ganesha.conf, exports    the NFS work area: one export per host, for its address alone
      tftp/pxelinux.0, ldlinux.c32, pxelinux.cfg/01-<mac>, pxelinux.cfg/default, live/
      http/ipxe/boot.ipxe, http/ipxe/<mac>.ipxe, http/live/{vmlinuz,initrd.img,squashfs.img}
    work area (site.work_area): <host>/spec/<host>.yaml, the host's spec as its live system reads it;
                                <host>/cloud/clouds.yaml, an application credential, when the live
                                system uploads (tasks/lib/livecloud.py)

Files are rewritten only when their text changes, and a host whose spec is
gone loses its boot files. The live system's files come from bin/live-build.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks.lib.livecloud import write_live_cloud
from tasks.lib.pipeline import ensure_console_logging
from tasks.lib.pxe import LIVE_FILES, render_deploy, write_if_changed
from tasks.lib.runner import P2VError
from tasks.lib.site import Site, load_site, pxe_specs
from tasks.lib.spec import Spec

log = logging.getLogger("p2v.pxe")

# Debian's pxelinux and syslinux-common (bin/install installs both).
PXELINUX_FILES = {"pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
                  "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")}
# Rendered per host: what a host without a spec any more must lose.
PER_HOST_DIRS = ("tftp/pxelinux.cfg", "http/ipxe")


def live_dir() -> Path:
    """The built live system (vmlinuz, initrd.img, squashfs.img): P2V_LIVE_DIR, or bin/live-build's cache."""
    named = os.environ.get("P2V_LIVE_DIR")
    if named:
        return Path(named)
    raise P2VError("no live system to serve: P2V_LIVE_DIR is not set",
                   hint="run bin/live-build and point P2V_LIVE_DIR at the directory it prints")



def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links where the deploy tree shares the cache's filesystem (no copy of a
    500 MB squashfs), a copy elsewhere; never a symlink (TFTP servers refuse them)."""
    if target.exists() and os.path.samefile(source, target):
        return
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def deploy(site: Site, specs: Sequence[Spec], live: Path) -> dict[str, int]:
    """Write the deploy tree and each host's spec into the work area; return counts for the summary."""
    missing = [str(live / name) for name in LIVE_FILES if not (live / name).is_file()]
    if missing:
        raise P2VError(f"the live system is incomplete: {', '.join(missing)} missing", hint="run bin/live-build")
    files = render_deploy(site, specs)
    deploy_dir = site.deploy_dir
    changed = sum(write_if_changed(deploy_dir / relative, text) for relative, text in files.items())
    stale = 0
    for directory in PER_HOST_DIRS:
        for path in (deploy_dir / directory).glob("*"):
            if str(path.relative_to(deploy_dir)) not in files and not path.name.endswith(".partial"):
                path.unlink()
                stale += 1
    (deploy_dir / "ganesha-recovery").mkdir(parents=True, exist_ok=True)
    for name, source in PXELINUX_FILES.items():
        if not source.is_file():
            raise P2VError(f"{source} is missing", hint="apt-get install pxelinux syslinux-common (bin/install)")
        _link_or_copy(source, deploy_dir / "tftp" / name)
    for name in LIVE_FILES:
        if name != "squashfs.img":  # pxelinux fetches kernel and initrd by TFTP; dracut the root by HTTP
            _link_or_copy(live / name, deploy_dir / "tftp" / "live" / name)
        _link_or_copy(live / name, deploy_dir / "http" / "live" / name)
    credentials = 0
    for spec in specs:
        host_dir = site.host_work_dir(spec.host)
        (host_dir / "spec").mkdir(parents=True, exist_ok=True)
        changed += write_if_changed(host_dir / "spec" / f"{spec.host}.yaml", spec.path.read_text(), 0o600)
        credentials += write_live_cloud(spec, host_dir) is not None
    return {"hosts": len(specs), "files": len(files), "changed": changed, "removed": stale,
            "credentials": credentials}


def run_pxe(specs: Sequence[Spec]) -> TaskFailed | None:
    ensure_console_logging()
    try:
        site = load_site()
        chosen = pxe_specs(site, list(specs))
        counts = deploy(site, chosen, live_dir())
    except (P2VError, OSError) as error:
        return TaskFailed(f"pxe: {error}")
    log.info("pxe: %d host(s) in %s: %d file(s), %d changed, %d removed; work area %s; %d application "
             "credential(s) for uploads from the live system", counts["hosts"], site.deploy_dir, counts["files"],
             counts["changed"], counts["removed"], site.work_area, counts["credentials"])
    return None


def pxe_tasks(specs: Sequence[Spec]) -> Iterator[dict[str, Any]]:
    yield {
        "basename": "pxe",
        "doc": "render the PXE network's DHCP/TFTP/HTTP/NFS files from live/site.yaml and the specs",
        "actions": [(run_pxe, [specs])],
        # Cheap and idempotent: it always runs, and writes only what changed.
        "uptodate": [False],
        "verbosity": 2,
    }
