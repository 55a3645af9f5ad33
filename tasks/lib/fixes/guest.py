"""cloud-init's configuration, and SELinux relabelling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.distro import family_of_system
from tasks.lib.fixes.model import Changes, FileEdit, TreeReader
from tasks.lib.planning.model import DiskPlan
from tasks.lib.source.model import SystemDescription
from tasks.lib.spec import FixPolicy

CLOUD_CFG_DIR = "/etc/cloud/cloud.cfg.d"
# cloud-init merges cloud.cfg.d/*.cfg in name order and the last one wins.
# "99_p2v.cfg" sorts after Debian's 90_dpkg.cfg (its long datasource_list)
# and subiquity's 99-installer.cfg (`datasource_list: [None]`), which a
# "90-p2v.cfg" would lose to ('-' sorts before '_' and 'i').
CLOUD_INIT_CONFIG = f"{CLOUD_CFG_DIR}/99_p2v.cfg"


def cloud_init_text(keep_network: bool) -> str:
    lines = [
        "# Written by p2v: find the instance's metadata on OpenStack.",
        "datasource_list: [ConfigDrive, OpenStack]",
    ]
    if keep_network:
        lines += ["# The network configuration is the server's own (p2v network policy keep).",
                  "network: {config: disabled}"]
    return "\n".join(lines) + "\n"


def fix_cloud_init(tree: TreeReader, system: SystemDescription, policy: FixPolicy) -> Changes:
    changes = Changes(tree, "cloud-init-config")
    if not (policy.cloud_init.install or system.cloud_init.installed):
        return changes
    keep = policy.network == "keep"
    changes.write(CLOUD_INIT_CONFIG, cloud_init_text(keep),
                  "datasources ConfigDrive, OpenStack" + ("; the kept network config stays" if keep else ""), 0o644)
    later = sorted(name for name in tree.listdir(CLOUD_CFG_DIR)
                   if name.endswith(".cfg") and name > CLOUD_INIT_CONFIG.rsplit("/", 1)[1])
    for name in later:
        text = tree.read(f"{CLOUD_CFG_DIR}/{name}") or ""
        if "datasource_list" in text:
            changes.note(f"{CLOUD_CFG_DIR}/{name} sorts after {CLOUD_INIT_CONFIG} and overrides it")
    return changes


def _changed_types(layout: Mapping[str, Any], plan: DiskPlan) -> list[str]:
    """'/var/log: ext4 -> xfs' for every source filesystem whose type the target changes."""
    out = []
    for fs in plan.filesystems:
        for source in fs.sources:
            if source.fstype != fs.fstype:
                out.append(f"{source.mountpoint}: {source.fstype} -> {fs.fstype}")
    return out


def fix_selinux(tree: TreeReader, system: SystemDescription, layout: Mapping[str, Any], plan: DiskPlan,
                policy: FixPolicy, edits: Sequence[FileEdit]) -> Changes:
    """/.autorelabel when a file may lack its SELinux label.

    The copy keeps security.selinux xattrs and the writer carries a replaced
    file's over, but a file that did not exist before (cloud-init's config, a
    .link file, packages installed from a chroot whose host runs no SELinux)
    has none, and a filesystem of another type is a reason on its own. So
    does the swap file the fix stage makes: swapon wants it labelled.
    """
    changes = Changes(tree, "selinux")
    marker = family_of_system(system).relabel_marker(system)
    if marker is None:
        return changes
    reasons = _changed_types(layout, plan)
    new_files = [e.path for e in edits if e.text is not None and not tree.exists(e.path)]
    if new_files:
        reasons.append(f"new files {', '.join(new_files)}")
    if policy.cloud_init.install and not system.cloud_init.installed:
        reasons.append("cloud-init installed from the chroot")
    if plan.swap_file is not None and not tree.exists(plan.swap_file.path):
        reasons.append(f"the new swap file {plan.swap_file.path} (swapfile_t)")
    if reasons and not tree.exists(marker):
        changes.write(marker, "", f"SELinux {system.selinux}: relabel at first boot ({'; '.join(reasons)})",
                      0o644)
    return changes
