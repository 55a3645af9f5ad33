"""How fast the copy engine is, next to a tar pipe and a raw read of the same tree.

    .venv/bin/python -m bench.sync [--trees fixture,synthetic] [--files 200000] [--repeat 1]

For each tree (the plain-bookworm fixture's filesystems, mounted read-only
from its images, and a synthetic tree of many small files on an ext4 image
cached in /var/tmp/p2v-bench), and each run on fresh loop-mounted ext4
targets (direct I/O, as p2v's disk stage makes them):

    engine       copy_tree with the default method, verification off (timed apart)
    engine rsync copy_tree with method="rsync"
    tar pipe     the textbook tar -c | tar -x per filesystem (it loses sockets)
    cat          find -type f | xargs cat > /dev/null: every file read once (holes read as zeros)
    dd           the source block devices read sequentially (the images are sparse, so
                 this is about a read of the bytes ever written: the physical limit)
    resync       copy_tree again into the engine's target: nothing changed, nothing copied
    verify       both manifests (hashes of every file on both sides) and the comparison

Before every timed run: `sync; echo 3 > /proc/sys/vm/drop_caches`, so that
every run reads its source cold. Each time includes a final `sync` of what
the run wrote. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.trees import BENCH_DIR, Tree, fixture_tree, scratch_target, synthetic_tree
from tasks.lib import copy
from tasks.lib.copy import copy_tree, human, verify_copy
from tasks.lib.runner import output, run

FIRST_COPY_TARGET = 1.10  # engine first copy / tar pipe
RESYNC_TARGET = 0.05  # no-change resync / engine first copy

log = logging.getLogger("p2v.bench")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(action: Callable[[], object]) -> float:
    drop_caches()
    started = time.monotonic()
    action()
    os.sync()
    return time.monotonic() - started


TEXTBOOK_TAR = ("--xattrs", "--xattrs-include=*", "--acls", "--selinux", "--numeric-owner")


def tar_pipe(tree: Tree, target: Path) -> None:
    """The textbook pipe (not the engine's tuned flags), with the engine's exclusions so both copy the same."""
    for mp in tree.mountpoints:
        excluded = copy.assign(list(copy.ALWAYS_EXCLUDED), list(tree.mountpoints))[mp]
        create = ["tar", *TEXTBOOK_TAR, "--sparse", "--one-file-system", *copy.tar_filters(excluded, []),
                  "-C", str(tree.root / mp.lstrip("/")), "-cpf", "-", "."]
        extract = ["tar", *TEXTBOOK_TAR, "-C", str(target / mp.lstrip("/")), "-xpf", "-"]
        run(["bash", "-o", "pipefail", "-c", f"{shlex.join(create)} | {shlex.join(extract)}"])


def cat_files(tree: Tree) -> None:
    for mp in tree.mountpoints:
        run(["bash", "-o", "pipefail", "-c", "find . -xdev -type f -print0 | xargs -0 -r cat > /dev/null"],
            cwd=tree.root / mp.lstrip("/"))


def read_devices(tree: Tree) -> None:
    for mp in tree.mountpoints:
        device = output(["findmnt", "-no", "SOURCE", "--mountpoint", str(tree.root / mp.lstrip("/"))])
        run(["dd", f"if={device}", "of=/dev/null", "bs=4M"])


@dataclass
class Figures:
    tree: str
    files: int = 0
    used_bytes: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        log.info("  %-13s %7.2f s", name, seconds)

    def get(self, name: str) -> float:
        return statistics.median(self.times[name]) if name in self.times else float("nan")


@contextlib.contextmanager
def fresh_target(tree: Tree, name: str) -> Iterator[Path]:
    filesystems = [(mp, "ext4", size) for mp, _fstype, size in tree.filesystems]
    with scratch_target(BENCH_DIR / "targets" / name, filesystems) as target:
        yield target


def bench_tree(tree: Tree, repeat: int) -> Figures:
    used = [copy._used(tree.root / mp.lstrip("/")) for mp in tree.mountpoints]
    figures = Figures(tree=tree.name, used_bytes=sum(u[0] for u in used), files=sum(u[1] for u in used))
    logs = BENCH_DIR / "logs"
    log.info("%s: %s used, %s inodes", tree.name, human(figures.used_bytes), f"{figures.files:,}")
    for _ in range(repeat):
        with fresh_target(tree, "engine") as target:
            figures.add("engine", timed(lambda: copy_tree(tree.root, target, tree.mountpoints, verify=False,
                                                          log_file=logs / "engine.log")))
            figures.add("verify", timed(lambda: verify_copy(tree.root, target, tree.mountpoints,
                                                            log_file=logs / "engine.log")))
            figures.add("resync", timed(lambda: copy_tree(tree.root, target, tree.mountpoints, verify=False,
                                                          log_file=logs / "resync.log")))
        with fresh_target(tree, "rsync") as target:
            figures.add("engine rsync", timed(lambda: copy_tree(tree.root, target, tree.mountpoints, method="rsync",
                                                                verify=False, log_file=logs / "rsync.log")))
        with fresh_target(tree, "tar") as target:
            figures.add("tar pipe", timed(lambda: tar_pipe(tree, target)))
        figures.add("cat", timed(lambda: cat_files(tree)))
        figures.add("dd", timed(lambda: read_devices(tree)))
    return figures


COLUMNS = ("engine", "engine rsync", "tar pipe", "cat", "dd", "resync", "verify")


def table(all_figures: Sequence[Figures]) -> str:
    head = f"{'tree':<34} {'files':>9} {'used':>10} " + " ".join(f"{c:>12}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for fig in all_figures:
        cells = " ".join(f"{fig.get(c):>10.2f} s" for c in COLUMNS)
        lines.append(f"{fig.tree:<34} {fig.files:>9,} {human(fig.used_bytes):>10} {cells}")
    lines.append("")
    for fig in all_figures:
        first = fig.get("engine") / fig.get("tar pipe")
        resync = fig.get("resync") / fig.get("engine")
        rsync = fig.get("engine rsync") / fig.get("tar pipe")
        lines.append(
            f"{fig.tree}: engine first copy / tar pipe = {first:.2f} (target <= {FIRST_COPY_TARGET:.2f}: "
            f"{'ok' if first <= FIRST_COPY_TARGET else 'MISSED'}); no-change resync / first copy = {resync:.3f} "
            f"(target <= {RESYNC_TARGET:.2f}: {'ok' if resync <= RESYNC_TARGET else 'MISSED'}); "
            f"rsync method / tar pipe = {rsync:.2f}; engine / cat = {fig.get('engine') / fig.get('cat'):.2f}; "
            f"engine / dd = {fig.get('engine') / fig.get('dd'):.2f}"
        )
    lines.append(f"(median of {len(next(iter(all_figures[0].times.values())))} run(s) each; page cache dropped "
                 "before every run; targets: fresh ext4 on loop devices with direct I/O; "
                 f"default method: {copy.DEFAULT_METHOD})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default="fixture,synthetic", help="comma-separated: fixture, synthetic")
    parser.add_argument("--fixture", default="plain-bookworm", help="fixture server to copy (partitions only)")
    parser.add_argument("--files", type=int, default=200_000, help="files in the synthetic tree")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the median is shown)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.sync needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = []
    for name in args.trees.split(","):
        tree_context = fixture_tree(args.fixture) if name == "fixture" else synthetic_tree(args.files)
        with tree_context as tree:
            results.append(bench_tree(tree, args.repeat))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([{"tree": f.tree, "files": f.files, "used_bytes": f.used_bytes,
                                          "seconds": f.times} for f in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
