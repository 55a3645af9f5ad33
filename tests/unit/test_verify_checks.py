"""The verify stage's checks and the report, without booting anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.plan import DiskPlan, plan_disk
from tasks.lib.runner import P2VError
from tasks.lib.spec import CloudInitPolicy, FixPolicy, GlancePolicy, Source, Spec, TargetPolicy
from tasks.report import render_report
from tasks.verify import active_swap_kib, expected_addresses, old_macs, plan_checks, shadow_with_root_password
from tests.unit.layouts import layout


def make_spec(network: str = "keep", install: bool = True, **target: Any) -> Spec:
    return Spec(host="plain-bookworm", path=Path("/nonexistent/specs/x.yaml"), file="specs/x.yaml",
                source=Source(images=(Path("/nonexistent/disk1.img"),)), workdir=Path("/nonexistent/work"),
                target=TargetPolicy(**target),
                fix=FixPolicy(network=network, cloud_init=CloudInitPolicy(install=install)),
                glance=GlancePolicy())


def completed_plan(name: str, **target: Any) -> DiskPlan:
    fresh = plan_disk(layout(name), make_spec(**target))
    return fresh.with_uuids({p.number: f"11111111-2222-4333-8444-5555555555{p.number:02d}" for p in fresh.partitions})


def checks_by_name(name: str, **kwargs: Any) -> dict[str, Any]:
    spec = make_spec(**kwargs)
    return {c.name: c for c in plan_checks(layout(name), completed_plan(name), spec)}


def test_every_promise_gets_a_check() -> None:
    checks = checks_by_name("plain-bookworm")
    assert list(checks) == ["system-state", "root-virtio", "mounts", "swap", "hostname", "network", "cloud-init",
                            "mac-bindings"]
    assert "52:54:00:a0:00:12" in checks["mac-bindings"].command
    assert "cloud-init" not in checks_by_name("plain-bookworm", install=False)


def test_system_state_judge() -> None:
    judge = checks_by_name("plain-bookworm")["system-state"].judge
    assert judge("running\n", 0) is None
    assert judge("N 5\n", 0) is None
    problem = judge("degraded\nnetworking.service loaded failed failed Raise network interfaces\n", 1)
    assert problem is not None and "degraded" in problem and "networking.service" in problem
    assert judge("", 1) is not None


def test_mounts_judge_wants_every_planned_mount_from_its_new_uuid() -> None:
    plan = completed_plan("plain-bookworm")
    judge = checks_by_name("plain-bookworm")["mounts"].judge
    good = "\n".join(f"{fs.mountpoint} {fs.uuid} {fs.fstype}" for fs in plan.filesystems) + "\n/proc  proc\n"
    assert judge(good, 0) is None
    root = plan.filesystem("/")
    bad = good.replace(str(root.uuid), "99999999-0000-4000-8000-000000000000")
    assert judge(bad, 0) == f"/ is mounted from UUID 99999999-0000-4000-8000-000000000000, not {root.uuid}"
    assert "is not mounted" in str(judge("/proc  proc\n", 0))


def test_swap_judge() -> None:
    plan = completed_plan("plain-bookworm")
    part = plan.swap_partition
    assert part is not None and part.swap is not None
    kib = active_swap_kib(part.size)
    assert kib == (part.size // 4096 - 1) * 4
    judge = checks_by_name("plain-bookworm")["swap"].judge
    assert judge(f"/dev/vda3 partition {kib} {part.swap.uuid}\n", 0) is None
    assert "not active" in str(judge("", 0))
    smaller = judge(f"/dev/vda3 partition {kib - 4} {part.swap.uuid}\n", 0)
    assert smaller is not None and f"with {kib - 4} KiB, not the planned {kib} KiB" in smaller
    # Active, but not the planned one (another UUID): not it.
    assert "not active" in str(judge(f"/dev/vda3 partition {kib} 99999999-0000-4000-8000-000000000000\n", 0))


def test_swap_judge_for_a_swap_file_wants_its_size() -> None:
    lay = layout("plain-bookworm")
    plan = completed_plan("plain-bookworm", swap="file")
    assert plan.swap_file is not None and plan.swap_partition is None
    judge = {c.name: c for c in plan_checks(lay, plan, make_spec(swap="file"))}["swap"].judge
    kib = active_swap_kib(plan.swap_file.size)
    assert judge(f"/swapfile file {kib} 0d6f5c1e-9a2b-4c3d-8e4f-5a6b7c8d9e0f\n", 0) is None
    assert judge(f"/swapfile file {kib}\n", 0) is None  # a file's UUID is not what fstab names
    assert "the swap file /swapfile is not active" in str(judge("", 0))
    assert f"not the planned {kib} KiB" in str(judge("/swapfile file 1024\n", 0))
    # The plan promises as much swap as the source had; a plan that gives less is caught too.
    short = dataclasses.replace(plan, source_swap=plan.swap_file.size + (1 << 20))
    judge = {c.name: c for c in plan_checks(lay, short, make_spec(swap="file"))}["swap"].judge
    assert "less than the source's" in str(judge(f"/swapfile file {kib}\n", 0))


def test_network_judge_wants_the_kept_address_on_the_same_name() -> None:
    judge = checks_by_name("plain-bookworm")["network"].judge
    line = "2: eth0    inet 192.0.2.12/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever"
    assert judge("1: lo    inet 127.0.0.1/8 scope host lo\n" + line + "\n", 0) is None
    assert "192.0.2.12/24 is not on eth0" in str(judge(line.replace("eth0", "ens3"), 0))
    assert expected_addresses(layout("plain-bookworm"), make_spec()) == {"eth0": ["192.0.2.12/24"]}
    assert expected_addresses(layout("plain-bookworm"), make_spec(network="dhcp")) == {}
    dhcp = checks_by_name("plain-bookworm", network="dhcp")["network"].judge
    assert dhcp("2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic eth0\n", 0) is None


def test_mac_binding_and_hostname_and_virtio_judges() -> None:
    checks = checks_by_name("plain-bookworm")
    assert checks["mac-bindings"].judge("", 0) is None
    left = checks["mac-bindings"].judge("/etc/udev/rules.d/70-persistent-net.rules\n", 0)
    assert "70-persistent-net.rules" in str(left)
    assert checks["hostname"].judge("plain-bookworm\n", 0) is None
    assert checks["hostname"].judge("localhost\n", 0) is not None
    assert checks["root-virtio"].judge("/dev/vda2\n/sys/bus/virtio/drivers/virtio_blk\n", 0) is None
    assert checks["root-virtio"].judge("/dev/sda2\n/sys/bus/pci/drivers/ahci\n", 0) is not None
    assert old_macs(layout("plain-bookworm")) == ["52:54:00:a0:00:12"]


def test_shadow_gets_a_one_time_root_password_and_nothing_else_changes() -> None:
    shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    assert shadow_with_root_password(shadow, "$6$salt$hash") == (
        "root:$6$salt$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    with pytest.raises(P2VError, match="no root entry"):
        shadow_with_root_password("daemon:*:1::::::\n", "x")


def test_report_says_what_changed_and_what_was_checked() -> None:
    lay = layout("plain-bookworm")
    plan = completed_plan("plain-bookworm")
    plan = dataclasses.replace(plan, notes=("a planner note",))
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro", "console=ttyS0,115200n8"],
           "installed_packages": ["cloud-init"], "warnings": ["network: a | warning"],
           "steps": [{"name": "fstab", "status": "changed", "changes": ["edited /etc/fstab: new UUIDs"]},
                     {"name": "initrd", "status": "skipped", "changes": []}]}
    verify = {"skipped": False, "seconds_to_login": 91.0,
              "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": "52:54:00:7e:57:01"},
              "checks": [{"name": "hostname", "ok": True, "output": "plain-bookworm"},
                         {"name": "swap", "ok": False, "problem": "not active", "output": ""}]}
    text = render_report("plain-bookworm", lay, plan, {"copy": {"files": 10, "bytes": 1 << 30}, "seconds": 3}, fix,
                         verify)
    assert "# p2v conversion report: plain-bookworm" in text
    assert "| fstab | changed | edited /etc/fstab: new UUIDs |" in text
    assert "| initrd | skipped | - |" in text
    assert "| swap | FAILED: not active |" in text
    assert "a planner note" in text and "a \\| warning" in text
    assert "Debian GNU/Linux 12" in text


def _report(lay: dict[str, object], sync: dict[str, object]) -> str:
    fix = {"kernel": "6.1.0-50-amd64", "kernel_cmdline": ["ro"], "installed_packages": [], "steps": []}
    return render_report("plain-bookworm", lay, completed_plan("plain-bookworm"), sync, fix, {"skipped": True})


def test_report_says_journal_replayed_for_each_replayed_filesystem_and_only_those() -> None:
    lay = layout("plain-bookworm")
    for fs in lay["filesystems"]:
        fs["needs_recovery"] = fs.get("mountpoint") in ("/", "/srv")
    replayed = [{"device": "disk1p2", "mountpoint": "/", "fstype": "ext4", "reason": "ext feature needs_recovery"},
                {"device": "disk2p1", "mountpoint": "/srv", "fstype": "xfs", "reason": "xfs log tail: 2 head: 11"}]
    text = _report(lay, {"copy": {"files": 10, "bytes": 1 << 30, "journal_replayed": replayed}, "seconds": 3})
    copy_lines = [line for line in text.splitlines() if line.startswith("- journal replayed: ")]
    assert copy_lines == [
        "- journal replayed: disk1p2 (/, ext4) was not shut down cleanly; it was copied and verified from a "
        "throw-away overlay in which the kernel replayed its journal (the source was not written)",
        "- journal replayed: disk2p1 (/srv, xfs) was not shut down cleanly; it was copied and verified from a "
        "throw-away overlay in which the kernel replayed its journal (the source was not written)",
    ]
    assert "- not shut down cleanly: disk1p2 (/, ext4); inspect read it with its journal replayed" in text
    assert "- not shut down cleanly: disk2p1 (/srv, xfs); inspect read it with its journal replayed" in text
    assert "disk1p1 (/boot" not in text


def test_report_claims_no_replay_that_did_not_happen() -> None:
    lay = layout("plain-bookworm")
    assert not any(fs["needs_recovery"] for fs in lay["filesystems"])
    for sync in ({"copy": {"files": 10, "bytes": 1, "journal_replayed": []}, "seconds": 3},
                 {"copy": {"files": 10, "bytes": 1}, "seconds": 3}):  # a stamp from before journal replay
        text = _report(lay, sync)
        assert "replayed" not in text and "not shut down cleanly" not in text


def test_report_says_what_became_of_swap_and_inode_flags() -> None:
    from tests.unit.layouts import with_swap_file

    lay = with_swap_file("plain-bookworm", size=256 << 20)
    plan = plan_disk(lay, make_spec()).with_uuids({1: "11111111-2222-4333-8444-555555555501"})
    copy = {"files": 10, "bytes": 1 << 30,
            "inode_flags": {"entries": 3, "kept": {"d": 2, "A": 1},
                            "pending": [{"path": "/etc/resolv.conf", "flags": "i"}],
                            "dropped": [{"path": "/srv/x", "flags": "C", "reason": "Operation not supported"}]},
            "warnings": ["inode flag C (no copy on write) not kept on 1 entry of the target (Operation not "
                         "supported): /srv/x"]}
    fix = {"steps": [], "inode_flags": {"restored": [{"path": "/etc/resolv.conf", "flags": "i"}]}}
    text = render_report("x", lay, plan, {"copy": copy, "seconds": 3}, fix, {"skipped": True})
    assert "- swap: the source had 256 MiB of swap in fstab; swap file /swap.img of 256 MiB (made by the fix " \
           "stage)" in text
    assert "- inode flags: 3 source entries have some; on the target: A on 1, d on 2; 1 immutable/append-only " \
           "left to the fix stage; 1 the target filesystem does not keep (see the warnings)" in text
    assert "- inode flags set last: 1 entry, read back: /etc/resolv.conf (i)" in text
    assert "- inode flag C (no copy on write) not kept on 1 entry" in text
    # Receipts of an older p2v do not say: neither does the report.
    old = render_report("x", lay, plan, {"copy": {"files": 1, "bytes": 1}}, {"steps": []}, {"skipped": True})
    assert "- inode flags: not recorded (a copy by an older p2v)" in old
    assert "- inode flags set last: not recorded (a fix by an older p2v)" in old


def test_a_uefi_image_must_have_booted_by_uefi_through_the_fallback_loader() -> None:
    from tests.unit.test_efi_loader import uefi_layout

    lay = uefi_layout(["/boot/efi/EFI/debian/grubx64.efi"])
    fresh = plan_disk(lay, make_spec())
    done = fresh.with_uuids({p.number: "ABCD-1234" if p.filesystem is not None and p.filesystem.fstype == "vfat"
                             else f"11111111-2222-4333-8444-5555555555{p.number:02d}" for p in fresh.partitions})
    checks = {c.name: c for c in plan_checks(lay, done, make_spec())}
    assert "uefi" in checks and "uefi" not in checks_by_name("plain-bookworm")
    judge = checks["uefi"].judge
    good = "booted-by-uefi\n/boot/efi/EFI/BOOT/:\nBOOTX64.EFI\n\n/boot/efi/EFI/debian/:\ngrubx64.efi\n"
    assert judge(good, 0) is None
    assert "did not boot by UEFI" in (judge("/boot/efi/EFI/BOOT/:\nBOOTX64.EFI\n", 2) or "")
    assert "no fallback loader" in (judge("booted-by-uefi\n/boot/efi/EFI/debian/:\ngrubx64.efi\n", 0) or "")
    mounts = checks["mounts"].judge
    assert mounts("/ 11111111-2222-4333-8444-555555555503 ext4\n/boot/efi ABCD-1234 vfat\n", 0) is None


def test_report_names_the_machine_type_and_firmware() -> None:
    lay = layout("plain-bookworm")
    plan = completed_plan("plain-bookworm")
    verify = {"skipped": False, "seconds_to_login": 80.0, "checks": [],
              "machine": {"disk_bus": "virtio", "nic_model": "virtio", "mac": "52:54:00:7e:57:01",
                          "machine_type": "q35", "firmware": "uefi", "hw_machine_type": "q35"}}
    esp = {"/boot/efi": {"files": 2, "bytes": 300000, "verified_by": "listing, sizes, sha256",
                         "digest": "sha256:0123456789abcdef"}}
    text = render_report("plain-bookworm", lay, plan, {"copy": {"esp": esp}, "seconds": 1}, {"steps": []}, verify)
    assert "- ESP /boot/efi: 2 files, 300000 bytes, copied by mtools; listing, sizes, sha256" in text
    assert "- booted on machine type q35 with UEFI (OVMF, empty variable store) (image property " \
           "hw_machine_type: q35)" in text
