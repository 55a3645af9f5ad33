"""How fast the sync stage is, next to a tar pipe and a raw read of the same tree.

    .venv/bin/python -m bench.sync [--trees fixture,synthetic,mail] [--files 200000] [--repeat 1]

Three trees, two harnesses:

- `fixture`: the plain-bookworm fixture server. Its disk.img is made once by
  the real disk stage (doit disk:<host> in /var/tmp/p2v-bench/project-*), kept
  as a pristine copy, and copied back (sparse) before every run; the sync
  stage itself (tasks.sync.sync_host, in this process) is what is timed: it
  attaches and mounts both sides, copies, lists, verifies, seals, lets go.
- `synthetic`: 200k small files on an ext4 image cached in
  /var/tmp/p2v-bench. No server around it (no layout to plan a disk from), so
  the target is one mkfs.ext4 image as big as the source, mounted by the
  bench, and copy_tree (the stage's engine, as the stage calls it) is timed.
- `mail`: a server with those small files, through the same stage harness as
  the fixture: plain-bookworm whose fstab mounts the synthetic filesystem (a
  third disk) on /var/mail (bench/trees.py mail_server). The plan, by
  default, merges it into / (so it goes by files whatever the method).

Columns, each cold (`sync; echo 3 > drop_caches` before, a final `sync`
included):

    stage        the whole first sync: copy, listings for the seal, verification
    copy         copy_tree without verification, in a fresh target: the first copy proper
    verify       the stage's verification part (from its receipt: listings + both manifests)
    tar pipe     the textbook tar -c | tar -x per filesystem (it loses sockets)
    dd           the same number of bytes as the source uses, read sequentially
                 from the start of each source device: the physical limit
    dd copy      those bytes read the same way and written sequentially into
                 a file beside the target image, fsync'ed: a copy's own limit
    resync       the stage again, nothing changed: the stage seal, nothing
                 mounted (not for synthetic: no stage, no stage seal)
    resync list  the same when the stage seal cannot vouch (disk.img touched):
                 the copy seal's listings of both trees (synthetic: copy_tree
                 again with its seal)
    resync full  the same without any seal: rsync's quick check + verification

After the first sync: the target image's allocated size (st_blocks * 512)
against the source's used bytes plus what mkfs had written into the empty
image (the filesystems' metadata). Needs root. Loop devices and mounts are
all context managers: an error or Ctrl-C leaves nothing attached.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cold import timed
from bench.trees import BENCH_DIR, Tree, block_plan, mail_server, scratch_target, synthetic_tree
from tasks import inspect
from tasks import sync as sync_stage
from tasks.lib import copy, storage
from tasks.lib.copy import copy_tree, human
from tasks.lib.copy.blocks import BlockJob, allocated, fill_by_blocks
from tasks.lib.copy.model import PassResult
from tasks.lib.fstab import mount_order
from tasks.lib.pipeline import StageRun
from tasks.lib.plan import DiskPlan
from tasks.lib.planning.model import PartitionPlan
from tasks.lib.resources import loop_device
from tasks.lib.runner import P2VError, output, run
from tasks.lib.spec import PROJECT_DIR, load_specs
from tasks.lib.target import mounted_target
from tests.fixtures.build import build_server

FIRST_COPY_TARGET = 1.10  # first copy / tar pipe
# First copy / a sequential read of the used bytes (dd). The mail server is the fixture with the synthetic tree
# mounted in it: mostly those small files, by bytes and by count, so the synthetic tree's target.
READ_TARGETS = {"fixture": 1.5, "synthetic": 2.0, "mail server": 2.0}
RESYNC_TARGET = 0.05  # no-change resync / first sync
ALLOCATED_TARGET = 1.05  # disk.img allocated / (used bytes + filesystem metadata)

log = logging.getLogger("p2v.bench")


TEXTBOOK_TAR = ("--xattrs", "--xattrs-include=*", "--acls", "--selinux", "--numeric-owner")


def tar_pipe(tree: Tree, target: Path) -> None:
    """The textbook pipe (not the engine's tuned flags), with the engine's exclusions so both copy the same."""
    for mp in tree.mountpoints:
        excluded = copy.assign(list(copy.ALWAYS_EXCLUDED), list(tree.mountpoints))[mp]
        into = target / mp.lstrip("/")
        into.mkdir(exist_ok=True)  # a directory of / where the plan merged the filesystem
        create = ["tar", *TEXTBOOK_TAR, "--sparse", "--one-file-system", *copy.tar_filters(excluded, []),
                  "-C", str(tree.root / mp.lstrip("/")), "-cpf", "-", "."]
        extract = ["tar", *TEXTBOOK_TAR, "-C", str(into), "-xpf", "-"]
        run(["bash", "-o", "pipefail", "-c", f"{shlex.join(create)} | {shlex.join(extract)}"])


def _used_extents(tree: Tree) -> list[tuple[str, int]]:
    """Per source filesystem: its device, and as many 4 MiB blocks as the filesystem uses."""
    extents = []
    for mp in tree.mountpoints:
        point = tree.root / mp.lstrip("/")
        device = output(["findmnt", "-no", "SOURCE", "--mountpoint", str(point)])
        extents.append((device, -(-copy._used(point)[0] // (4 << 20))))
    return extents


def read_devices(extents: Sequence[tuple[str, int]]) -> None:
    """As many bytes as each source filesystem uses, read sequentially from the start of its device."""
    for device, blocks in extents:
        run(["dd", f"if={device}", "of=/dev/null", "bs=4M", f"count={blocks}"])


def copy_devices(extents: Sequence[tuple[str, int]], scratch: Path) -> None:
    """The same bytes as read_devices, also written sequentially into one file in the bench's directory
    (where the target image is) and fsync'ed: what a copy of the used bytes costs at the least on this
    disk."""
    try:
        scratch.write_bytes(b"")
        for device, blocks in extents:
            run(["dd", f"if={device}", f"of={scratch}", "bs=4M", f"count={blocks}", "oflag=append",
                 "conv=notrunc,fsync"])
    finally:
        scratch.unlink(missing_ok=True)


# ---------------------------------------------------------------- figures


@dataclass
class Figures:
    tree: str
    target: str = ""
    kind: str = "fixture"  # "fixture", "synthetic" or "mail server": which of READ_TARGETS applies
    files: int = 0
    used_bytes: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        log.info("  %-13s %7.2f s", name, seconds)

    def size(self, name: str, value: int) -> None:
        self.sizes.setdefault(name, []).append(value)

    def get(self, name: str) -> float:
        return statistics.median(self.times[name]) if name in self.times else float("nan")

    def bytes(self, name: str) -> float:
        return statistics.median(self.sizes[name]) if name in self.sizes else float("nan")

    def expect(self, receipt: dict[str, Any], verified_by: str, what: str) -> None:
        if receipt.get("verified_by") != verified_by:
            self.notes.append(f"{what}: verified by {receipt.get('verified_by')}, not {verified_by} "
                              f"({receipt.get('seal')})")


# ---------------------------------------------------------------- the fixture: the sync stage itself


@dataclass(frozen=True)
class StageBench:
    """A bench project whose disk stage ran once; the sync stage run in this process."""

    run: StageRun
    image: Path
    pristine: Path
    plan: DiskPlan

    @classmethod
    def prepare(cls, host: str, disks: Sequence[Path], method: str, layout: str = "flatten") -> StageBench:
        project = BENCH_DIR / f"project-{host}-{method}" if layout == "flatten" else \
            BENCH_DIR / f"project-{host}-{layout}-{method}"
        specs = project / "specs"
        specs.mkdir(parents=True, exist_ok=True)
        images = "".join(f"    - {disk}\n" for disk in disks)
        (specs / f"{host}.yaml").write_text(f"source:\n  images:\n{images}target:\n  layout: {layout}\n"
                                            f"  copy: {method}\n")
        (spec,) = load_specs(specs)
        image, pristine = spec.artifact("disk.img"), spec.artifact("disk.pristine.img")
        if not pristine.exists():
            log.info("%s: the disk stage makes disk.img (once)", host)
            done = subprocess.run([sys.executable, "-m", "doit", f"disk:{host}"], cwd=PROJECT_DIR,
                                  env={**os.environ, "P2V_SPECS": str(specs)}, capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise P2VError(f"doit disk:{host} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            run(["cp", "--sparse=always", str(image), str(pristine)])
        plan = DiskPlan.from_json(json.loads(spec.artifact("disk-plan.json").read_text()))
        stage_run = StageRun(spec=spec, stage="sync", partial=spec.artifact("rootfs-synced.stamp.partial"),
                             log_path=spec.log_dir / "bench-sync.log")
        return cls(run=stage_run, image=image, pristine=pristine, plan=plan)

    def describe(self) -> str:
        filesystems = ", ".join(f"{fs.fstype} for {' '.join(s.mountpoint for s in fs.sources)}"
                                for fs in self.plan.filesystems)
        methods = ", ".join(f"{c.source_mountpoint} by {c.method}" for c in self.plan.copies)
        return f"disk.img from the disk stage ({self.plan.policy.layout}: {filesystems}; {methods})"

    def fresh(self) -> None:
        for seal in (sync_stage.seal_path(self.run.spec), sync_stage.stage_seal_path(self.run.spec),
                     sync_stage.blocks_record_path(self.run.spec)):
            seal.unlink(missing_ok=True)
        self.image.unlink(missing_ok=True)
        run(["cp", "--sparse=always", str(self.pristine), str(self.image)])

    def sync(self) -> tuple[float, dict[str, Any]]:
        seconds = timed(lambda: sync_stage.sync_host(self.run))
        receipt: dict[str, Any] = json.loads(self.run.partial.read_text())["copy"]
        return seconds, receipt

    @contextlib.contextmanager
    def target(self) -> Iterator[Path]:
        with mounted_target(self.image, self.plan, run_dir=self.run.spec.run_dir, direct_io=True) as target:
            yield target.root

    @contextlib.contextmanager
    def source(self) -> Iterator[Tree]:
        """The source's filesystems as inspect found them (layout.json), read-only, mounted as the stage mounts them."""
        spec = self.run.spec
        layout = json.loads(spec.artifact("layout.json").read_text())
        by_point = {mount["mountpoint"]: mount for mount in layout["mounts"]}
        mounts = [by_point[point] for point in mount_order(list(by_point))]
        with storage.attached_source(spec.source) as (_disks, devices), \
                inspect.mounted_tree(spec, mounts, devices) as root:
            yield Tree(name=spec.host, root=root, mountpoints=tuple(m["mountpoint"] for m in mounts),
                       filesystems=(), run_dir=spec.run_dir)


def copy_part(receipt: dict[str, Any]) -> float:
    """The stage's own copy, from its receipt: the block copies and copy_tree's passes (no verification)."""
    blocks = sum(row.get("seconds", 0.0) for row in receipt.get("methods", []) if row["method"] == "blocks")
    return float(blocks + receipt["copy_seconds"])


def bench_stage(name: str, disks: Sequence[Path], repeat: int, method: str, kind: str,
                layout: str = "flatten") -> Figures:
    stage = StageBench.prepare(name, disks, method, layout)
    shown = name if layout == "flatten" else f"{name} {layout}"
    figures = Figures(tree=f"{shown} by {method}", target=stage.describe(), kind=kind)
    try:
        for _ in range(repeat):
            stage.fresh()
            figures.size("metadata", allocated(stage.image))
            seconds, receipt = stage.sync()
            figures.add("stage", seconds)
            figures.add("copy", copy_part(receipt))
            figures.add("verify", receipt["verify_seconds"])
            figures.size("allocated", allocated(stage.image))
            seconds, receipt = stage.sync()
            figures.add("resync", seconds)
            figures.expect(receipt, "stage seal", "resync")
            os.utime(stage.image)  # as a later stage's write would: only the trees can tell now
            seconds, receipt = stage.sync()
            figures.add("resync list", seconds)
            figures.expect(receipt, "seal", "resync list")
            for seal in (sync_stage.seal_path(stage.run.spec), sync_stage.stage_seal_path(stage.run.spec)):
                seal.unlink()
            seconds, receipt = stage.sync()
            figures.add("resync full", seconds)
            figures.expect(receipt, "manifests", "resync full")
            with stage.source() as tree:
                used = [copy._used(tree.root / mp.lstrip("/")) for mp in tree.mountpoints]
                figures.used_bytes, figures.files = sum(u[0] for u in used), sum(u[1] for u in used)
                stage.fresh()
                with stage.target() as target:
                    figures.add("tar pipe", timed(lambda: tar_pipe(tree, target)))
                extents = _used_extents(tree)
                figures.add("dd", timed(functools.partial(read_devices, extents)))
                scratch = stage.image.with_name("dd-copy.scratch")
                figures.add("dd copy", timed(functools.partial(copy_devices, extents, scratch)))
    finally:
        stage.image.unlink(missing_ok=True)  # the pristine copy stays for the next bench run
    return figures


# ---------------------------------------------------------------- the synthetic tree: the copy engine


def bench_synthetic(files: int, repeat: int, method: str) -> Figures:
    work = BENCH_DIR / "runs" / "synthetic"
    work.mkdir(parents=True, exist_ok=True)
    image, seal, logs = work / "target.img", work / "seal.json", work / "logs"
    with synthetic_tree(files) as tree:
        used = [copy._used(tree.root / mp.lstrip("/")) for mp in tree.mountpoints]
        how = "fill_by_blocks, then copy_tree" if method == "blocks" else "copy_tree"
        figures = Figures(tree=f"{tree.name} by {method}", kind="synthetic",
                          target=f"one ext4 image as big as the source ({how} timed)",
                          used_bytes=sum(u[0] for u in used), files=sum(u[1] for u in used))
        filesystems = [(mp, "ext4", size) for mp, _fstype, size in tree.filesystems]
        source_node = output(["findmnt", "-no", "SOURCE", "--mountpoint", str(tree.root)])

        def target() -> contextlib.AbstractContextManager[Path]:
            return scratch_target(work, filesystems, images=[image], keep=True)

        def fresh() -> None:
            image.unlink(missing_ok=True)
            seal.unlink(missing_ok=True)
            with target():  # mkfs
                pass

        def blocks(name: str) -> dict[str, PassResult]:
            """The block copy the sync stage would make of this tree's one filesystem (it grows: no resize)."""
            if method != "blocks":
                return {}
            with loop_device(image, read_only=False, direct_io=True) as loop:
                whole = PartitionPlan(number=1, start=0, size=image.stat().st_size, role="filesystem",
                                      kind="primary", type_id="83", flags=())
                part, plan = block_plan(whole, source_node, "ext4", storage.probe(loop.path)["UUID"])
                outcome = fill_by_blocks(BlockJob(
                    copy=plan, partition=part, source_node=source_node, target_node=loop.path,
                    scratch=work / "scratch", run_dir=work / "run", image=image, in_place=False,
                    disk_size=image.stat().st_size, table="msdos", excluded=copy.ALWAYS_EXCLUDED, omitted=(),
                    hidden=()), logs / f"{name}-blocks.log")
            return {"/": outcome.pass_result()}

        def sync(name: str, with_seal: bool = True, first: bool = False, verify: bool = True
                 ) -> tuple[float, dict[str, Any]]:
            results: list[copy.CopyResult] = []

            def run_it() -> None:
                prefilled = blocks(name) if first else {}
                with target() as root:
                    results.append(copy_tree(tree.root, root, tree.mountpoints, log_file=logs / f"{name}.log",
                                             seal=seal if with_seal else None, verify=verify, prefilled=prefilled))
            seconds = timed(run_it)
            return seconds, results[0].receipt()

        try:
            for _ in range(repeat):
                fresh()
                figures.size("metadata", allocated(image))
                seconds, receipt = sync("stage", first=True)
                figures.add("stage", seconds)
                figures.add("verify", receipt["verify_seconds"])
                figures.size("allocated", allocated(image))
                seconds, receipt = sync("resync")
                figures.add("resync list", seconds)  # no stage around it: the copy seal's listings (see the doc)
                figures.expect(receipt, "seal", "resync list")
                seconds, receipt = sync("resync-full", with_seal=False)
                figures.add("resync full", seconds)
                figures.expect(receipt, "manifests", "resync full")
                fresh()
                figures.add("copy", sync("copy", with_seal=False, first=True, verify=False)[0])
                fresh()
                with target() as root:
                    figures.add("tar pipe", timed(lambda: tar_pipe(tree, root)))
                extents = _used_extents(tree)
                figures.add("dd", timed(functools.partial(read_devices, extents)))
                scratch = image.with_name("dd-copy.scratch")
                figures.add("dd copy", timed(functools.partial(copy_devices, extents, scratch)))
        finally:
            image.unlink(missing_ok=True)
    return figures


# ---------------------------------------------------------------- the table


COLUMNS = ("stage", "copy", "verify", "tar pipe", "dd", "dd copy", "resync", "resync list", "resync full")


def table(all_figures: Sequence[Figures]) -> str:
    head = f"{'tree':<28} {'files':>9} {'used':>10} " + " ".join(f"{c:>12}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for fig in all_figures:
        cells = " ".join(f"{fig.get(c):>10.2f} s" if c in fig.times else f"{'-':>12}" for c in COLUMNS)
        lines.append(f"{fig.tree:<28} {fig.files:>9,} {human(fig.used_bytes):>10} {cells}")
    lines.append("")

    def verdict(value: float, limit: float) -> str:
        return f"(target <= {limit:.2f}: {'ok' if value <= limit else 'MISSED'})"

    for fig in all_figures:
        read_limit = READ_TARGETS[fig.kind]
        by_read = fig.get("copy") / fig.get("dd")
        first = fig.get("copy") / fig.get("tar pipe")
        resync = fig.get("resync") / fig.get("stage")
        resync_line = (f"no-change resync / stage = {resync:.3f} {verdict(resync, RESYNC_TARGET)}; / copy alone "
                       f"{fig.get('resync') / fig.get('copy'):.3f}" if "resync" in fig.times else
                       "no-change resync: no stage seal without a stage around the copy (the mail server row has "
                       "one)")
        space = fig.bytes("allocated") / (fig.used_bytes + fig.bytes("metadata"))
        lines += [
            f"{fig.tree} -> {fig.target}:",
            f"  first copy / tar pipe    = {first:.2f} {verdict(first, FIRST_COPY_TARGET)}; the whole stage "
            f"(copy + verification) / tar pipe = {fig.get('stage') / fig.get('tar pipe'):.2f}; "
            f"copy / dd = {by_read:.2f} {verdict(by_read, read_limit)}; copy / dd copy = "
            f"{fig.get('copy') / fig.get('dd copy'):.2f} (no target: dd's own read and write of those bytes)",
            f"  {resync_line}"
            + (f"; by listings {fig.get('resync list') / fig.get('stage'):.3f}" if "resync list" in fig.times else "")
            + f"; without a seal {fig.get('resync full') / fig.get('stage'):.2f}",
            f"  allocated {human(fig.bytes('allocated'))} / (used {human(fig.used_bytes)} + metadata "
            f"{human(fig.bytes('metadata'))} written by mkfs) = {space:.3f} {verdict(space, ALLOCATED_TARGET)}",
            *(f"  note: {note}" for note in fig.notes),
        ]
    runs = max(len(v) for v in all_figures[0].times.values())
    lines.append(f"(median of {runs} run(s) each; page cache dropped before every timed run; loop devices with "
                 f"direct I/O; default method: {copy.DEFAULT_METHOD})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trees", default="fixture,synthetic,mail",
                        help="comma-separated: fixture, synthetic, mail (the fixture with the synthetic tree as "
                             "/var/mail, through the sync stage)")
    parser.add_argument("--fixture", default="plain-bookworm", help="fixture server to copy (partitions only)")
    parser.add_argument("--files", type=int, default=200_000, help="files in the synthetic tree")
    parser.add_argument("--copy", default="blocks,files", help="comma-separated target.copy methods to time")
    parser.add_argument("--layout", default="flatten", choices=("flatten", "keep"),
                        help="target.layout of the fixture and mail server (keep: each filesystem its own, so the "
                             "mail server's /var/mail goes by blocks too)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the median is shown)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.sync needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = []
    try:
        for name in args.trees.split(","):
            for method in args.copy.split(","):
                if name == "fixture":
                    disks = build_server(args.fixture).disks
                    results.append(bench_stage(args.fixture, disks, args.repeat, method, "fixture", args.layout))
                elif name == "mail":
                    results.append(bench_stage(f"mail-{args.files // 1000}k", mail_server(args.files, args.fixture),
                                               args.repeat, method, "mail server", args.layout))
                elif name == "synthetic":
                    results.append(bench_synthetic(args.files, args.repeat, method))
                else:
                    parser.error(f"--trees: unknown tree {name!r} (fixture, synthetic, mail)")
    except KeyboardInterrupt:  # every context manager above has let go by now
        print("interrupted: nothing left attached or mounted", file=sys.stderr)
        return 130
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([{"tree": f.tree, "target": f.target, "files": f.files,
                                          "used_bytes": f.used_bytes, "seconds": f.times, "bytes": f.sizes,
                                          "notes": f.notes} for f in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
