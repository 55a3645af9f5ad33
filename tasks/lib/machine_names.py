"""Names that are global on the machine, for resources of hosts that may be converted side by side.

A kernel resource p2v makes under a name (an md array, an LV's device-mapper
device) shares one namespace with every other host's and with the machine's
own. md arrays carry the host's tag (resources.host_device_tag). LVM names an
LV's device after its VG and LV, and p2v cannot rename a source's VG without
writing its metadata, so VG names are taken in turns (vg_names_locked).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.lib.resources import RUN_DIR
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.storage")

# Machine-wide locks of VG names that p2v has active (vg_names_locked).
LVM_LOCK_DIR = RUN_DIR / "lvm"


def md_node(tag: str, index: int) -> str:
    """The name p2v assembles a source's array under: global on the machine, so it carries the host's tag
    (resources.host_device_tag); at most 26 characters after /dev/md/."""
    return f"/dev/md/p2v-{tag}-{index}"


def lv_dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives an LV (`/dev/mapper/<name>`): a `-` inside a name is doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def lv_dm_uuids(lvm: Mapping[str, Any]) -> list[str]:
    """The device-mapper uuids LVM gives the LVs (`LVM-<vg uuid><lv uuid>`, without the dashes): what
    names exactly this source's activations, whatever else of the same VG name is active."""
    vg_uuid = {vg["name"]: vg["uuid"].replace("-", "") for vg in lvm["vgs"]}
    return [f"LVM-{vg_uuid[lv['vg']]}{lv['uuid'].replace('-', '')}" for lv in lvm["lvs"] if lv["vg"] in vg_uuid]


def active_dm_uuids() -> set[str]:
    """The uuids of every device-mapper device on the machine (sysfs)."""
    found = set()
    for uuid_file in Path("/sys/block").glob("dm-*/dm/uuid"):
        with contextlib.suppress(OSError):
            found.add(uuid_file.read_text().strip())
    return found


@contextlib.contextmanager
def vg_names_locked(vg_names: Sequence[str]) -> Iterator[None]:
    """Hold a machine-wide lock per VG name while p2v has that VG active.

    LVM cannot activate two VGs of the same name at once: their LVs would
    take the same device-mapper names (`<vg>-<lv>`), and p2v does not rename a
    source's VG (that writes its metadata). `--devices` keeps each vgchange to
    its own host's PVs, so two hosts never touch each other's VGs; two hosts
    whose VGs share a name (`centos`, `vg00`), converted in parallel, take
    turns instead of failing: the second waits here until the first releases.
    Locks are taken in name order, so two stages never wait on each other.
    """
    with contextlib.ExitStack() as stack:
        for name in sorted(vg_names):
            path = LVM_LOCK_DIR / f"{name}.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(path.open("w"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("LVM: another p2v run has a volume group named %s active; waiting for it (%s)", name, path)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def refuse_taken_dm_names(lvs: Sequence[Mapping[str, Any]]) -> None:
    """One line, before anything is activated, when a device-mapper name an LV needs is taken by
    something other than p2v (the machine's own VG of the same name)."""
    for lv in lvs:
        name = lv_dm_name(lv["vg"], lv["name"])
        if os.path.lexists(f"/dev/mapper/{name}"):
            raise P2VError(f"LVM: /dev/mapper/{name} exists already: a volume group named {lv['vg']} is active on "
                           "this machine, and LVM cannot activate a second one of the same name",
                           hint="deactivate it (vgchange -an) or convert this server from its live system")
