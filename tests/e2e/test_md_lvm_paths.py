"""p2v's real md and device-mapper paths, quickly: LVM on md RAID1 made and inspected in one live guest boot.

The md-lvm-bookworm fixture (test_md_lvm_live.py) takes half an hour to build
under TCG; this test needs only the live system. In one job: two small disks
get an md RAID1 with an LVM PV, a root LV holding the start of a Debian tree
and a swap LV; everything is stopped; the members' sha256 is taken; `doit
inspect` runs on them (source.devices); the sha256 is taken again.

Then, in the same boot, a killed run: `doit inspect` again, in a session of
its own, SIGKILLed as a group the moment the array is assembled under its
host-tagged name and the root LV is active; nothing of it is undone (arrays 1
and dm > 0 right after the kill). The next `doit inspect` undoes what the
killed one's resource journal names (tasks/lib/journal.py, unwind.py), newest
first: the LVs by `vgchange -an` with the recorded `--devices`, then the
array by `mdadm --stop`; arrays 0 and dm 0 afterwards, the members unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tasks.lib import journal, unwind
from tasks.lib.resources import remove_tree
from tasks.lib.runner import run
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.guest import GuestDisk, JobResult, run_job
from tests.fixtures.rootfs import ensure_rootfs

HOST = "mdquick"
VG = "vg_mdquick"
SERIALS = ("mdquick-disk1", "mdquick-disk2")
OUTPUTS = ["layout.json", "journal-after-kill.jsonl", "rerun-inspect.log"]
# What of a Debian tree inspect reads (os-release, fstab, kernels and initrds: 50 MB), cut from the
# cached root tree here and sent uncompressed: the guest decompressing the whole 250 MB tarball
# under TCG took 59 s.
TREE_PART = "tree-part.tar"
TREE_MEMBERS = ("./etc", "./boot", "./usr/lib/os-release")
# Each member is hashed three times in the guest, about 50 s per GiB under TCG: big enough for
# md's metadata, a PV, a 160 MiB root LV and a swap LV, no more.
DISK_BYTES = 256 << 20

# Each traced command carries the guest's uptime: the job log says where the time goes.
JOB = f"""\
PS4='+ $(cut -d" " -f1 /proc/uptime) '
set -euxo pipefail
job=$PWD
d1=/dev/disk/by-id/virtio-{SERIALS[0]}; d2=/dev/disk/by-id/virtio-{SERIALS[1]}
udevadm settle; modprobe md_mod; modprobe raid1; modprobe dm_mod
for d in $d1 $d2; do printf 'label: dos\\nstart=2048, type=fd, bootable\\n' | sfdisk --quiet $d; done
udevadm settle; p1=$(readlink -f $d1)1; p2=$(readlink -f $d2)1
mdadm --create /dev/md0 --run --assume-clean --level=1 --raid-devices=2 --metadata=1.2 --homehost={HOST} \\
    --name=0 $p1 $p2
pvcreate /dev/md0; vgcreate {VG} /dev/md0
lvcreate -y -ay -L 160M -n root {VG}; lvcreate -y -ay -l 100%FREE -n swap {VG}
mkfs.ext4 -q /dev/{VG}/root; mkswap /dev/{VG}/swap
mkdir -p /mnt/t; mount /dev/{VG}/root /mnt/t
tar --numeric-owner -C /mnt/t -xpf {TREE_PART}
ru=$(blkid -s UUID -o value /dev/{VG}/root); su=$(blkid -s UUID -o value /dev/{VG}/swap)
printf 'UUID=%s / ext4 errors=remount-ro 0 1\\nUUID=%s none swap sw 0 0\\n' $ru $su >/mnt/t/etc/fstab
umount /mnt/t; vgchange -an {VG}; mdadm --stop /dev/md0; sync
echo "sha before: $(sha256sum $d1 $d2 | cut -d' ' -f1 | xargs)"
mkdir -p specs work
printf 'source:\\n  devices:\\n    - %s\\n    - %s\\nworkdir: %s\\n' $d1 $d2 $job/work/{HOST} >specs/{HOST}.yaml
cd /opt/p2v
P2V_SPECS=$job/specs .venv/bin/python -m doit inspect:{HOST}
cd "$job"
cp work/{HOST}/layout.json layout.json
echo "after: arrays $(grep -c ^md /proc/mdstat || true), dm $(dmsetup ls | grep -vc 'No devices' || true)"
echo "sha after: $(sha256sum $d1 $d2 | cut -d' ' -f1 | xargs)"
rm work/{HOST}/layout.json  # so that doit runs inspect again
cd /opt/p2v
setsid env P2V_SPECS=$job/specs .venv/bin/python -m doit inspect:{HOST} >$job/killed.log 2>&1 &
victim=$!
set +x  # not every poll into the log
for i in $(seq 6000); do
  if compgen -G '/dev/md/p2v-{HOST}-*' >/dev/null && [ -e /dev/mapper/{VG}-root ]; then break; fi
  sleep 0.1
done
set -x
kill -KILL -- -$victim
wait $victim || true
cd "$job"
echo "md names: $(ls /dev/md | xargs)"
echo "killed: arrays $(grep -c ^md /proc/mdstat || true), dm $(dmsetup ls | grep -vc 'No devices' || true)"
cp /run/p2v/{HOST}-*/resources.journal journal-after-kill.jsonl
cd /opt/p2v
P2V_SPECS=$job/specs .venv/bin/python -m doit inspect:{HOST}
cd "$job"
cp work/{HOST}/logs/inspect.log rerun-inspect.log
echo "after rerun: arrays $(grep -c ^md /proc/mdstat || true), dm $(dmsetup ls | grep -vc 'No devices' || true)"
echo "sha after rerun: $(sha256sum $d1 $d2 | cut -d' ' -f1 | xargs)"
"""


@pytest.fixture(scope="module")
def inspected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("md-quick")
    disks = []
    for serial in SERIALS:
        image = work / f"{serial}.img"
        with image.open("wb") as handle:
            handle.truncate(DISK_BYTES)
        disks.append(GuestDisk(image, serial))
    tarball = ensure_rootfs("bookworm", [*BASE_PACKAGES, "initramfs-tools"])
    tree, part = work / "tree", work / TREE_PART
    tree.mkdir()
    run(["tar", "--zstd", "--numeric-owner", "-C", str(tree), "-xpf", str(tarball), *TREE_MEMBERS])
    run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(part), "."])
    remove_tree(tree)
    try:
        result = run_job(JOB, work / "job", disks=disks, inputs={TREE_PART: part}, outputs=OUTPUTS,
                         timeout=1800, what="md+LVM inspect in the live guest")
        return {"result": result, "layout": json.loads(result.outputs["layout.json"].read_text()),
                "journal": result.outputs["journal-after-kill.jsonl"].read_text(),
                "rerun_log": result.outputs["rerun-inspect.log"].read_text()}
    finally:
        part.unlink(missing_ok=True)
        for disk in disks:
            disk.path.unlink(missing_ok=True)


def line_after(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix):].strip()


def test_the_real_md_and_device_mapper_paths_ran_read_only(inspected: dict[str, Any]) -> None:
    result: JobResult = inspected["result"]
    log = result.log
    assert "md: md:0 (raid1) assembled read-only with the md driver from disk1p1, disk2p1" in log, result.tail()
    assert f"LVM: {VG}/root activated read-only with device-mapper" in log, result.tail()
    assert f"LVM: {VG}/swap activated read-only with device-mapper" in log, result.tail()
    assert "no md driver" not in log and "no device-mapper" not in log
    assert "after: arrays 0, dm 0" in log


def test_the_members_are_unchanged(inspected: dict[str, Any]) -> None:
    log = inspected["result"].log
    assert line_after(log, "sha before:") == line_after(log, "sha after:")


def test_layout_records_lvm_on_md_raid1(inspected: dict[str, Any]) -> None:
    layout = inspected["layout"]
    (array,) = layout["md"]
    assert (array["level"], array["metadata"], array["members"]) == ("raid1", "1.2", ["disk1p1", "disk2p1"])
    assert [(pv["device"], pv["vg"]) for pv in layout["lvm"]["pvs"]] == [("md:0", VG)]
    assert sorted(lv["name"] for lv in layout["lvm"]["lvs"]) == ["root", "swap"]


def test_a_killed_inspect_left_the_array_and_the_lvs_and_the_next_run_undid_them(inspected: dict[str, Any]) -> None:
    log = inspected["result"].log
    (md_name,) = line_after(log, "md names:").split()
    assert re.fullmatch(rf"p2v-{HOST}-[0-9a-f]{{6}}-0", md_name), md_name  # the host's tag in a global name
    arrays, dm = re.fullmatch(r"arrays (\d+), dm (\d+)", line_after(log, "killed:")).groups()  # type: ignore[union-attr]
    assert (int(arrays), int(dm) > 0) == (1, True), log
    records, problems = journal.parse(inspected["journal"], "journal-after-kill.jsonl")
    assert problems == []
    held = journal.held(records)
    kinds = [h.kind for h in held]
    assert kinds[kinds.index("lvm"):] == ["lvm", "md"], kinds  # newest first: the LVs before their array
    lvm = next(h for h in held if h.kind == "lvm").resource
    assert (lvm["vgs"], lvm["devices"]) == ([VG], [f"/dev/md/{md_name}"])
    rerun = inspected["rerun_log"]
    undone = [line.partition(unwind.RELEASED)[2] for line in rerun.splitlines()
              if unwind.RELEASED in line]
    md_uuid = next(h for h in held if h.kind == "md").resource["uuid"]
    assert undone[-2:] == [f"LVM {VG} active (devices /dev/md/{md_name})",
                           f"md array /dev/md/{md_name} (uuid {md_uuid})"], rerun
    assert "after rerun: arrays 0, dm 0" in log
    assert line_after(log, "sha before:") == line_after(log, "sha after rerun:")
