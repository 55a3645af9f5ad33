"""A broken fix fails verify, with the console: a physical server's host-only initrd has no virtio,
and with the step that fixes it skipped, verify must fail quickly with the serial console's tail.

Its own file, apart from test_convert.py's batch, so that the suite's two workers (bin/test) can
run it beside the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.lib.plan import DiskPlan
from tasks.lib.resources import chroot_binds
from tasks.lib.runner import chroot_run
from tests.e2e.test_convert import conversion_spec, doit, own_server, read_stamp
from tests.fixtures.build import build_server
from tests.fixtures.cache import sha256
from tests.integration.test_inspect import host_leftovers


def test_initrd_without_virtio_and_the_initrd_step_skipped_fails_verify(tmp_path: Path) -> None:
    """A physical server's host-only initrd has no virtio; skip the step that fixes it and
    verify must fail, quickly, with the serial console's tail in the error."""
    server = own_server(build_server("plain-bullseye"), tmp_path / "sources")
    before = {image: sha256(image) for image in server.disks}
    spec_dir = conversion_spec(tmp_path, server, "flatten", extra_fix="  skip: [initrd]\n")
    synced = doit(spec_dir, f"sync:{server.name}")
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    workdir = tmp_path / "work" / server.name
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    # Make the copy's initrd like a host-only one from old hardware: IDE/SATA and ext4, no virtio.
    from tasks.lib.target import mounted_target

    with mounted_target(workdir / "disk.img", plan, run_dir=tmp_path / "run", direct_io=False) as target, \
            chroot_binds(target.root):
        conf = target.root / "etc/initramfs-tools/initramfs.conf"
        conf.write_text(conf.read_text().replace("MODULES=most", "MODULES=list"))
        (target.root / "etc/initramfs-tools/modules").write_text("ata_piix\nahci\nsd_mod\next4\n")
        kernel = sorted(p.name.removeprefix("vmlinuz-") for p in (target.root / "boot").glob("vmlinuz-*"))[-1]
        chroot_run(target.root, ["update-initramfs", "-u", "-k", kernel], timeout=900)
        listing = chroot_run(target.root, ["lsinitramfs", f"/boot/initrd.img-{kernel}"]).stdout
    assert "virtio_blk" not in listing
    result = doit(spec_dir, f"verify:{server.name}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "verify:plain-bullseye" in output and "did not boot" in output, output[-3000:]
    assert "serial log tail" in output
    assert not (workdir / "verified.stamp").exists()
    fixed = read_stamp(workdir, "fixed.stamp")
    assert {s["name"]: s["status"] for s in fixed["steps"]}["initrd"] == "skipped"
    assert before == {image: sha256(image) for image in server.disks}
    assert host_leftovers(spec_dir) == []


