"""Peak memory and time per file of the sync stage's copy engine, at millions of files.

    .venv/bin/python -m bench.scale --files 200000,1000000,3000000 [--runs stage,resync,full] [--json out.json]

The tree is bench/trees.py's `tiny_tree`: `files` files of 0 to 1023 bytes (100
to a directory, one in 1000 with a hard link beside it) on an ext4 image with
1 KiB blocks, built once in /var/tmp/p2v-bench (P2V_BENCH_DIR) and reused. The
target is a fresh image like it (same mkfs options), mounted by the bench.

Runs, each `copy_tree` as the sync stage calls it (verification and a seal):

    stage   the first sync into a fresh target: flags scan, tar, listings for
            the seal, both manifests, the comparison, the seal
    resync  the same again, nothing changed: the seal's listings of both trees
    full    the same again without a seal: rsync's quick check over every
            entry, then the whole verification

Each run is a child interpreter of its own (`--child`), so that its figures are
its own and nothing of the bench's (building the tree) counts:

    self      ru_maxrss of the child interpreter (getrusage RUSAGE_SELF)
    children  ru_maxrss of its largest child process (RUSAGE_CHILDREN: tar,
              find, rsync, du, the manifests' child interpreters), one process
    tree      the largest sum of VmRSS (/proc/<pid>/statm) over the child and
              all its descendants, sampled every 0.2 s: what the run holds at
              once. Shared pages (libraries) count in every process, so this
              is an upper bound; a peak shorter than 0.2 s can be missed.

The page cache is dropped before each run and its time includes a final sync
(bench/cold.py). Needs root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cold import drop_caches
from bench.trees import BENCH_DIR, scratch_target, tiny_mkfs_options, tiny_tree
from tasks.lib.spec import PROJECT_DIR

RSS_LIMIT = 1 << 30  # at 3M files (issue 14)
SAMPLE_SECONDS = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")
RUNS = ("stage", "resync", "full")

log = logging.getLogger("p2v.bench")


# ---------------------------------------------------------------- in the child: one run, measured


def tree_rss(pid: int) -> int:
    """VmRSS of `pid` and all its descendants, in bytes."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending += [int(child) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
    return total


class Sampler:
    """The largest tree_rss of this process seen while it runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def child(arguments: dict[str, Any]) -> dict[str, Any]:
    from tasks.lib.copy import copy_tree

    seal = Path(arguments["seal"]) if arguments["seal"] else None
    with Sampler() as sampler:
        started = time.monotonic()
        result = copy_tree(Path(arguments["source"]), Path(arguments["target"]), arguments["mountpoints"],
                           log_file=Path(arguments["log"]), seal=seal)
        os.sync()
        seconds = time.monotonic() - started
    receipt = result.receipt()
    return {
        "seconds": seconds, "copy_seconds": receipt["copy_seconds"], "verify_seconds": receipt["verify_seconds"],
        "files": receipt["files"], "verified_by": receipt["verified_by"], "digest": receipt["manifest_digest"],
        "self_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "tree_rss": sampler.peak,
    }


# ---------------------------------------------------------------- the bench


def measure(source: Path, target: Path, mountpoints: Sequence[str], seal: Path | None, log_file: Path
            ) -> dict[str, Any]:
    arguments = {"source": str(source), "target": str(target), "mountpoints": list(mountpoints),
                 "seal": str(seal) if seal else None, "log": str(log_file)}
    drop_caches()
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--child", json.dumps(arguments)], cwd=PROJECT_DIR,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the measured run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def bench_size(files: int, runs: Sequence[str]) -> list[dict[str, Any]]:
    work = BENCH_DIR / "runs" / f"scale-{files}"
    work.mkdir(parents=True, exist_ok=True)
    image, seal, logs = work / "target.img", work / "seal.json", work / "logs"
    results = []
    with tiny_tree(files) as tree:
        filesystems = [(mp, "ext4", size) for mp, _fstype, size in tree.filesystems]
        image.unlink(missing_ok=True)
        seal.unlink(missing_ok=True)
        try:
            for name in runs:
                with scratch_target(work, filesystems, images=[image], keep=True,
                                    mkfs_options=tiny_mkfs_options(files)) as root:
                    log.info("%s files: %s", f"{files:,}", name)
                    figures = measure(tree.root, root, tree.mountpoints, None if name == "full" else seal,
                                      logs / f"{name}.log")
                figures.update(run=name, tree_files=files)
                log.info("  %.1f s, self %s MiB, largest child %s MiB, tree %s MiB, verified by %s",
                         figures["seconds"], figures["self_rss"] >> 20, figures["children_rss"] >> 20,
                         figures["tree_rss"] >> 20, figures["verified_by"])
                results.append(figures)
        finally:
            image.unlink(missing_ok=True)
            seal.unlink(missing_ok=True)
    return results


def table(results: Sequence[dict[str, Any]]) -> str:
    head = (f"{'files':>10} {'entries':>10} {'run':<7} {'seconds':>8} {'us/entry':>8} {'self MiB':>9} "
            f"{'child MiB':>9} {'tree MiB':>9} {'tree MiB/M':>10}")
    lines = [head, "-" * len(head)]
    for row in results:
        entries = row["files"] or row["tree_files"]
        lines.append(f"{row['tree_files']:>10,} {entries:>10,} {row['run']:<7} {row['seconds']:>8.1f} "
                     f"{row['seconds'] / entries * 1e6:>8.1f} {row['self_rss'] / 2**20:>9.0f} "
                     f"{row['children_rss'] / 2**20:>9.0f} {row['tree_rss'] / 2**20:>9.0f} "
                     f"{row['tree_rss'] / 2**20 / (entries / 1e6):>10.0f}")
    worst = max(results, key=lambda row: max(row["self_rss"], row["tree_rss"]))
    peak = max(worst["self_rss"], worst["tree_rss"])
    lines += ["", f"largest peak: {peak / 2**20:.0f} MiB ({worst['run']}, {worst['tree_files']:,} files); "
                  f"limit at 3M files: {RSS_LIMIT >> 20} MiB",
              "self: the run's interpreter (ru_maxrss); child: its largest child process (ru_maxrss); tree: the "
              "largest sampled sum of VmRSS over the run and its descendants"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--files", default="200000,1000000", help="comma-separated tree sizes")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, in order: {', '.join(RUNS)}")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measured run, in its own interpreter
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if os.geteuid() != 0:
        print("bench.scale needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 1
    runs = args.runs.split(",")
    if unknown := set(runs) - set(RUNS):
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results: list[dict[str, Any]] = []
    try:
        for files in (int(n) for n in args.files.split(",")):
            results += bench_size(files, runs)
    except KeyboardInterrupt:  # every context manager above has let go by now
        print("interrupted: nothing left attached or mounted", file=sys.stderr)
        return 130
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
