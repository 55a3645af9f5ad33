"""Build what the suite needs, two at a time, before pytest starts: `python -m tests.prefetch`.

On a fresh machine the suite first builds a dozen cached things (debootstrap trees, fixture
servers, package directories, the Keystone/Glance venv, the live system). Each is built on first
use, under its own lock, one after another: tens of minutes with one core idle, since debootstrap
waits on the mirror and mkinitramfs uses one core. Started here side by side, they overlap; the
tests then find them cached (or wait on the same locks). With a warm cache this takes a second.

A failed build is one line here and does not stop the run: the tests that need it fail with
the builder's own message. What needs a failed build (a fixture, its root tree) is not started.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any

from tasks.lib.runner import P2VError
from tests.fixtures.cache import all_names
from tests.fixtures.description import BASE_PACKAGES, load_description
from tests.fixtures.rootfs import SUITES, base_packages, ensure_rootfs, rootfs_key


def _live() -> str:
    from live.build import ensure_live

    return str(ensure_live().directory)


def _rootfs(suite: str, packages: tuple[str, ...]) -> str:
    return str(ensure_rootfs(suite, packages))


def _fixture(name: str) -> str:
    from tests.fixtures.build import build_server

    return str(build_server(name).directory)


def _packages(suite: str) -> str:
    from tests.fixtures.packages import ensure_package_dir

    return str(ensure_package_dir(suite))


def _openstack_venv() -> str:
    from tests.services.openstack import ensure_venv

    return str(ensure_venv())


@dataclass(frozen=True)
class Job:
    name: str
    function: Callable[..., str]
    args: tuple[Any, ...] = ()
    needs: frozenset[str] = frozenset()  # names of the jobs that must be done first


def _tree_job(suite: str, packages: Sequence[str]) -> Job:
    """The job that makes a root tree, needing the plain tree it is made from, if any."""
    base = base_packages(packages)
    needs = frozenset() if base is None else frozenset({f"root tree {rootfs_key(suite, base)}"})
    return Job(f"root tree {rootfs_key(suite, packages)}", _rootfs, (suite, tuple(sorted(set(packages)))), needs)


def jobs() -> list[Job]:
    """In the order they start once what they need is done. The live system first (the longest,
    sharing nothing with the fixtures); then the root trees (debootstrap, minutes each), every
    plain one before one made from it; then the fixtures, each after its tree, the one that builds
    its initrd with dracut first (the longest); then the package directories (after their suite's
    plain tree) and the services' venv.

    Each build takes its own lock, so a job started before what it needs would only wait on
    that lock, holding one of the two builds for nothing (it held one for 100 s, 688d4cd)."""
    trees: dict[str, Job] = {}

    def add_tree(suite: str, packages: Sequence[str]) -> Job:
        base = base_packages(packages)
        if base is not None:
            add_tree(suite, base)
        job = _tree_job(suite, packages)
        trees.setdefault(job.name, job)
        return trees[job.name]

    dracut_first: list[tuple[bool, Job]] = []
    for name in all_names():
        desc = load_description(name)
        tree = add_tree(desc.suite, desc.install_packages)
        dracut_first.append((desc.initramfs != "dracut", Job(f"fixture {name}", _fixture, (name,),
                                                             frozenset({tree.name}))))
    fixtures = [job for _, job in sorted(dracut_first, key=lambda pair: pair[0])]  # stable
    packages = [Job(f"packages {suite}", _packages, (suite,),
                    frozenset({add_tree(suite, [*BASE_PACKAGES, "initramfs-tools"]).name})) for suite in SUITES]
    ordered_trees = sorted(trees.values(), key=lambda job: bool(job.needs))  # stable: plain ones first
    return [Job("live system", _live), *ordered_trees, *fixtures, *packages,
            Job("keystone/glance venv", _openstack_venv)]


def next_ready(pending: Sequence[Job], done: Set[str]) -> Job | None:
    """The first pending job whose needs are all done."""
    return next((job for job in pending if job.needs <= done), None)


def _timed(function: Callable[..., str], args: tuple[Any, ...]) -> tuple[float, str]:
    started = time.monotonic()
    result = function(*args)
    return time.monotonic() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.prefetch", description=__doc__.splitlines()[0])
    # Two, on two cores. Three were tried from an empty cache (0d912ad): 967 s, against 743 s
    # with two the run before (whose cores were 16 % idle). With three no core was idle, each
    # build took about twice as long, and the bookworm debootstraps, which wait on the mirror,
    # started later, into a tail with little else to run.
    parser.add_argument("-j", "--jobs", type=int, default=2, help="builds at a time (default: %(default)s)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    pending = jobs()
    total = len(pending)
    done: set[str] = set()
    failed: set[str] = set()
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        running: dict[concurrent.futures.Future[tuple[float, str]], Job] = {}
        while pending or running:
            # A job whose need failed is not started: it would only try the same build again.
            for job in [job for job in pending if job.needs & failed]:
                pending.remove(job)
                failed.add(job.name)
                print(f"prefetch: {job.name} not started: {', '.join(sorted(job.needs & failed))} failed",
                      file=sys.stderr)
            while len(running) < args.jobs and (ready := next_ready(pending, done)) is not None:
                pending.remove(ready)
                running[pool.submit(_timed, ready.function, ready.args)] = ready
            if not running:
                if pending:  # what is left needs a job that is not in the list: a bug here
                    raise RuntimeError(f"prefetch: no job can start: {[job.name for job in pending]}")
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    seconds, where = future.result()
                except Exception as error:  # one line each; the tests that need it report it again
                    failed.add(job.name)
                    kind = "" if isinstance(error, P2VError | OSError) else f"{type(error).__name__}: "
                    first = (str(error).splitlines() or [""])[0]
                    print(f"prefetch: {job.name} failed: {kind}{first}", file=sys.stderr)
                    continue
                done.add(job.name)
                if seconds >= 1:
                    print(f"prefetch: {job.name} built in {seconds:.0f} s ({where})", file=sys.stderr)
    print(f"prefetch: {total - len(failed)} of {total} ready in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
