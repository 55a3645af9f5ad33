"""Build the p2v live system, or find it in the cache: `bin/live-build`.

    $P2V_CACHE/live/<key>/        vmlinuz, initrd.img, squashfs.img, manifest.json
    $P2V_CACHE/live/base-<key>/   the Debian layer the live systems share
    $P2V_CACHE/live/<name>.build.log   every command of the last build of <name>

Each directory is built as `<name>.partial` and renamed when complete; one
lock serialises builders. A cached call reads the inputs, finds manifest.json
and returns, without loading the build code or p2v's stages (of `tasks` it
imports only tasks.lib.runner, for its errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from live.cmdline import INITRD_NAME, KERNEL_NAME, SQUASHFS_NAME
from live.inputs import PROJECT, LiveInputError, LiveInputs, gather
from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.live")


def cache_root() -> Path:
    return Path(os.environ.get("P2V_CACHE", "/var/cache/p2v"))


@dataclass(frozen=True)
class LiveImage:
    """A built live system: the three files a PXE server serves, and what they are."""

    directory: Path

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_NAME

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD_NAME

    @property
    def squashfs(self) -> Path:
        return self.directory / SQUASHFS_NAME

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data


@contextlib.contextmanager
def build_log(path: Path) -> Iterator[None]:
    """Every command of a build (tasks.lib.runner logs them at debug level) into `path`."""
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("p2v")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def ensure_live(project: Path = PROJECT, cache: Path | None = None, inputs: LiveInputs | None = None) -> LiveImage:
    """The live system for this project's files, built if the cache does not have it."""
    inputs = inputs or gather(project)
    top = (cache or cache_root()) / "live"
    image = LiveImage(top / inputs.key)
    if image.is_complete():
        return image
    if os.geteuid() != 0:
        raise LiveInputError("building the live system needs root (debootstrap, chroot, mounts)")
    # Only a build loads the builder and the tasks package it uses.
    from live import assemble
    from tasks.lib.resources import file_lock

    top.mkdir(parents=True, exist_ok=True)
    with file_lock(top / "build.lock"):
        if image.is_complete():  # another builder made it while we waited
            return image
        base = top / f"base-{inputs.base_key}"
        if not (base / assemble.BASE_RECORD).is_file():
            log.info("live: building the base %s (Debian, venv, kernel, initrd), several minutes", base.name)
            started = time.monotonic()
            with build_log(top / f"{base.name}.build.log"):
                assemble.build_in_partial(base, lambda work: assemble.build_base(inputs, work))
            log.info("live: base %s built in %.0f s", base.name, time.monotonic() - started)
        with build_log(top / f"{inputs.key}.build.log"):
            assemble.build_in_partial(image.directory, lambda work: assemble.build_live(inputs, base, work))
        log.info("live: %s built: %s", image.key, assemble.sizes(image.manifest()))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/live-build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="the cache directory (default $P2V_CACHE or /var/cache/p2v)")
    args = parser.parse_args(argv)
    # The steps on the console; every command only in the build log (build_log).
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.INFO)
    started = time.monotonic()
    try:
        image = ensure_live(cache=args.cache)
    except P2VError as error:  # a bug shows its traceback
        print(f"bin/live-build: {error}", file=sys.stderr)
        if not isinstance(error, LiveInputError):  # an input error stops before any build log is written
            print(f"bin/live-build: the build log is in {(args.cache or cache_root()) / 'live'}/*.build.log",
                  file=sys.stderr)
        return 1
    log.info("live: %s (%.1f s)", image.directory, time.monotonic() - started)
    print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
