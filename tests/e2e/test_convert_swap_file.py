"""A source whose only swap is a file, with chattr flags, converted from inspect to the report.

Its own file, apart from test_convert.py's batch, so that the suite's two workers (bin/test) can
run it beside the batch.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from tasks.lib.plan import DiskPlan
from tasks.lib.resources import loop_device, mounted
from tasks.lib.runner import run
from tests.e2e.test_convert import doit, read_stamp, suite_of
from tests.fixtures.build import FixtureServer, build_server
from tests.fixtures.cache import sha256
from tests.fixtures.packages import ensure_package_dir
from tests.integration.test_inspect import host_leftovers, make_spec
from tests.integration.test_sync import image_tree

SWAP_FILE_HOST = "swapfile-bookworm"
SWAP_FILE_SIZE = 256 << 20
# path in the server -> the flags chattr gives it there (/srv is xfs on the source, merged into / by flatten).
CHATTRED = {
    "/etc/default/grub": "i",  # a file the fix stage edits (bootloader-config): i must come after it
    "/etc/shadow": "i",  # a hardening some servers have: verify's one-time password goes into its overlay anyway
    "/etc/p2v-locked": "i",  # a directory
    "/var/log/p2v-append.log": "a",
    "/var/backups/p2v-nodump": "dA",
    "/srv/p2v-flags/immutable": "i",
    "/srv/p2v-flags/nodump": "d",
}


def lsattr_letters(path: Path) -> str:
    shown = run(["lsattr", "-d", str(path)]).stdout.split()[0]
    return "".join(sorted(c for c in shown if c not in "-e"))


def swap_file_source(server: FixtureServer, directory: Path) -> list[Path]:
    """Copies of plain-bookworm's disks made into a server whose only swap is /swap.img (as Ubuntu
    installs it: no swap partition, RESUME=none), with files chattr made immutable, append-only,
    no-dump and no-atime on its ext4 / and its xfs /srv."""
    directory.mkdir(parents=True)
    disks = []
    for disk in server.disks:
        disks.append(directory / disk.name)
        run(["cp", "--sparse=always", str(disk), str(disks[-1])])
    where = {fs["mountpoint"]: fs["device"] for fs in server.facts["filesystems"]}
    swap_partition = server.facts["swap"][0]["device"]["partition"]
    root_point, srv_point = directory / "root", directory / "srv"
    root_point.mkdir()
    srv_point.mkdir()
    with loop_device(disks[0], read_only=False, partitions=True) as first, \
            loop_device(disks[1], read_only=False, partitions=True) as second:
        run(["wipefs", "--all", first.partition(swap_partition)])
        with mounted(first.partition(where["/"]["partition"]), root_point, fstype="ext4") as root:
            fstab = root / "etc" / "fstab"
            fstab.write_text("".join("/swap.img\tnone\tswap\tsw\t0\t0\n" if " swap " in line else line
                                     for line in fstab.read_text().splitlines(keepends=True)))
            (root / "etc/initramfs-tools/conf.d/resume").write_text("RESUME=none\n")
            swap = root / "swap.img"
            os.close(os.open(swap, os.O_WRONLY | os.O_CREAT, 0o600))
            run(["dd", "if=/dev/zero", f"of={swap}", "bs=1M", f"count={SWAP_FILE_SIZE >> 20}", "conv=notrunc",
                 "status=none"])
            run(["mkswap", str(swap)])
            (root / "etc/p2v-locked").mkdir()
            (root / "etc/p2v-locked/inside").write_text("in a directory nobody may add to\n")
            (root / "var/log/p2v-append.log").write_text("only ever appended to\n")
            (root / "var/backups/p2v-nodump").write_text("not for dump(8)\n")
            for path, flags in CHATTRED.items():
                if not path.startswith("/srv/"):
                    run(["chattr", f"+{flags}", str(root / path.lstrip("/"))])
        with mounted(second.partition(where["/srv"]["partition"]), srv_point, fstype="xfs") as srv:
            (srv / "p2v-flags").mkdir()
            for path, flags in CHATTRED.items():
                if path.startswith("/srv/"):
                    (srv / path.removeprefix("/srv/")).write_text(f"{path}\n")
                    run(["chattr", f"+{flags}", str(srv / path.removeprefix("/srv/"))])
    return disks


def test_swap_file_source_boots_with_as_much_swap_and_keeps_its_inode_flags(tmp_path: Path) -> None:
    """The acceptance of issue 10, parts 2 and 3, through doit from inspect to the report: the swap file
    is made again (same size, mkswap) and verify's boot finds exactly that much swap active; immutable
    and append-only files are so in the converted image, set after the fix stage edited one of them."""
    server = build_server("plain-bookworm")
    disks = swap_file_source(server, tmp_path / "source")
    before = {disk: sha256(disk) for disk in disks}
    packages = ensure_package_dir(suite_of(server.name))
    spec_dir = make_spec(tmp_path, SWAP_FILE_HOST, disks, extra=(
        "fix:\n  network: keep\n"
        f"  cloud_init:\n    install: true\n    source: {packages}\n"))
    workdir = tmp_path / "work" / SWAP_FILE_HOST
    started = time.monotonic()
    result = doit(spec_dir, f"report:{SWAP_FILE_HOST}")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"\n{SWAP_FILE_HOST}: inspect to report in {seconds:.0f} s")

    layout = json.loads((workdir / "layout.json").read_text())
    recorded = [e for e in layout["fstab"] if e["vfstype"] == "swap"]
    assert [(e["spec"], e["status"], e["size"]) for e in recorded] == [("/swap.img", "swapfile", SWAP_FILE_SIZE)]
    assert not any(s["in_fstab"] for s in layout["swaps"])
    plan = DiskPlan.from_json(json.loads((workdir / "disk-plan.json").read_text()))
    assert plan.swap_partition is None and plan.swap_file is not None
    assert (plan.swap_file.path, plan.swap_file.size, plan.source_swap) == ("/swap.img", SWAP_FILE_SIZE,
                                                                            SWAP_FILE_SIZE)
    shown = doit(spec_dir, f"plan:{SWAP_FILE_HOST}")
    assert "swap: the source had 256 MiB of swap in fstab; swap file /swap.img of 256 MiB" in shown.stdout

    # verify booted it on virtio: exactly the swap file, as large as the source's, is active.
    verified = read_stamp(workdir, "verified.stamp")
    swap_check = next(c for c in verified["checks"] if c["name"] == "swap")
    assert swap_check["ok"], swap_check
    active = [line.split() for line in swap_check["output"].splitlines() if line.strip()]
    source_kib = (SWAP_FILE_SIZE // 4096 - 1) * 4  # what the source's /swap.img gives swapon
    assert [(name, kind, int(kib)) for name, kind, kib, *_ in active] == [("/swap.img", "file", source_kib)]
    print(f"swap: source /swap.img {SWAP_FILE_SIZE >> 20} MiB ({source_kib} KiB usable); "
          f"converted: {active[0][2]} KiB active")

    fixed = read_stamp(workdir, "fixed.stamp")
    steps = {s["name"]: s for s in fixed["steps"]}
    assert steps["swap-file"]["status"] == "changed"
    assert steps["bootloader-config"]["status"] == "changed"  # it edited /etc/default/grub, immutable on the source
    assert steps["inode-flags"]["status"] == "changed"
    assert [s["name"] for s in fixed["steps"]][-1] == "inode-flags"
    want_pending = sorted((path, "".join(c for c in "ia" if c in flags)) for path, flags in CHATTRED.items()
                          if set(flags) & set("ia"))
    assert sorted((r["path"], r["flags"]) for r in fixed["inode_flags"]["restored"]) == want_pending
    synced = read_stamp(workdir, "rootfs-synced.stamp")["copy"]
    assert sorted((r["path"], r["flags"]) for r in synced["inode_flags"]["pending"]) == want_pending
    assert synced["warnings"] == []

    report = (workdir / "report.md").read_text()
    assert "- swap: the source had 256 MiB of swap in fstab; swap file /swap.img of 256 MiB" in report
    assert f"- inode flags set last: {len(want_pending)} entries, read back" in report

    with image_tree(workdir / "disk.img", plan, tmp_path / "converted") as tree:
        flags = {path: lsattr_letters(tree / path.lstrip("/")) for path in CHATTRED}
        fstab = (tree / "etc/fstab").read_text()
        swap = (tree / "swap.img").stat()
    assert flags == {path: "".join(sorted(want)) for path, want in CHATTRED.items()}
    assert "/swap.img\tnone\tswap\tsw\t0\t0" in fstab and "p2v removed" not in fstab.split("swap.img")[0][-40:]
    assert stat.S_IMODE(swap.st_mode) == 0o600 and swap.st_size == SWAP_FILE_SIZE
    assert swap.st_blocks * 512 >= SWAP_FILE_SIZE  # written, not sparse

    # Reruns into the locked image. fix again: it unlocks what it set, its steps write, it locks again.
    started = time.monotonic()
    assert doit(spec_dir, "forget", f"fix:{SWAP_FILE_HOST}").returncode == 0
    refix = doit(spec_dir, f"fix:{SWAP_FILE_HOST}")
    assert refix.returncode == 0, refix.stdout[-4000:] + refix.stderr[-4000:]
    steps = {s["name"]: s for s in read_stamp(workdir, "fixed.stamp")["steps"]}
    assert steps["swap-file"]["status"] == "unchanged" and steps["inode-flags"]["status"] == "changed"
    # sync again (doit reruns fix after it): the copy unlocks what the fix recorded in the image, puts the
    # source's files back over the fix's edits, and leaves i and a pending; fix locks them again.
    assert doit(spec_dir, "forget", f"sync:{SWAP_FILE_HOST}").returncode == 0
    resync = doit(spec_dir, f"fix:{SWAP_FILE_HOST}")
    assert resync.returncode == 0, resync.stdout[-4000:] + resync.stderr[-4000:]
    print(f"fix again, then sync and fix again: {time.monotonic() - started:.0f} s")
    synced = read_stamp(workdir, "rootfs-synced.stamp")["copy"]
    assert synced["verified_by"] == "manifests" and any(p["resumed"] for p in synced["filesystems"])
    assert "cleared i/a on" in (workdir / "logs" / "sync-copy.log").read_text()
    with image_tree(workdir / "disk.img", plan, tmp_path / "converted-again") as tree:
        again = {path: lsattr_letters(tree / path.lstrip("/")) for path in CHATTRED}
    assert again == flags
    assert before == {disk: sha256(disk) for disk in disks}
    # Ours only: other hosts' runs may share this machine's /run/p2v while this test runs.
    assert host_leftovers(spec_dir) == []
