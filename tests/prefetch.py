"""Build what the suite needs, two at a time, before pytest starts: `python -m tests.prefetch`.

On a fresh machine the suite first builds a dozen cached things (debootstrap trees, fixture
servers, package directories, the Keystone/Glance venv, the live system). Each is built on first
use, under its own lock, one after another: tens of minutes with one core idle, since debootstrap
waits on the mirror and mkinitramfs uses one core. Started here side by side, they overlap; the
tests then find them cached (or wait on the same locks). With a warm cache this takes a second.

A failed build is one line here and does not stop the run: the tests that need it fail with
the builder's own message.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.lib.runner import P2VError
from tests.fixtures.cache import all_names
from tests.fixtures.description import load_description
from tests.fixtures.rootfs import SUITES


def _live() -> str:
    from live.build import ensure_live

    return str(ensure_live().directory)


def _fixture(name: str) -> str:
    from tests.fixtures.build import build_server

    return str(build_server(name).directory)


def _packages(suite: str) -> str:
    from tests.fixtures.packages import ensure_package_dir

    return str(ensure_package_dir(suite))


def _openstack_venv() -> str:
    from tests.services.openstack import ensure_venv

    return str(ensure_venv())


def jobs() -> list[tuple[str, Callable[..., str], tuple[Any, ...]]]:
    """The live system first (the longest, sharing nothing with the fixtures); then the
    fixtures, each suite's first one early, since the fixtures of one Debian suite wait on
    its debootstrap tree's lock; then the package directories and the services' venv."""
    suites: set[str] = set()
    firsts: list[str] = []
    others: list[str] = []
    for name in all_names():
        suite = load_description(name).suite
        (others if suite in suites else firsts).append(name)
        suites.add(suite)
    return [("live system", _live, ()),
            *((f"fixture {name}", _fixture, (name,)) for name in [*firsts, *others]),
            *((f"packages {suite}", _packages, (suite,)) for suite in SUITES),
            ("keystone/glance venv", _openstack_venv, ())]


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
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_timed, function, job_args): name for name, function, job_args in jobs()}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            try:
                seconds, where = future.result()
            except Exception as error:  # one line each; the tests that need it report it again
                failed += 1
                kind = "" if isinstance(error, P2VError | OSError) else f"{type(error).__name__}: "
                first = (str(error).splitlines() or [""])[0]
                print(f"prefetch: {name} failed: {kind}{first}", file=sys.stderr)
                continue
            if seconds >= 1:
                print(f"prefetch: {name} built in {seconds:.0f} s ({where})", file=sys.stderr)
    print(f"prefetch: {len(futures) - failed} of {len(futures)} ready in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
