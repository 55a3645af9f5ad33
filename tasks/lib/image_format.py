"""The file that goes to Glance: disk.img itself (raw), or a qcow2 made from it.

raw uploads disk.img as it is: nothing is written, so nothing is inflated. qcow2 is made with
`qemu-img convert -O qcow2` (with `-c` to compress clusters), which skips zero clusters, so the
result is as sparse as the data allows. It is written as `disk.qcow2.partial`, checked with
`qemu-img check`, then renamed; a rerun reuses it while disk.img (size, mtime) and the options
are unchanged, which a small key file next to it records.

Also here: the sha512 of the file to upload, cached by (path, size, mtime) in the host's state
directory, because the reuse check needs it before anything is created in Glance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.paths import write_file_atomically
from tasks.lib.runner import P2VError, run

log = logging.getLogger("p2v.image")

READ_BLOCK = 4 << 20


@dataclass(frozen=True)
class UploadFile:
    path: Path
    disk_format: str  # Glance's disk_format: raw or qcow2
    size: int  # bytes to upload


def _key(raw: Path, fmt: str, compress: bool) -> dict[str, object]:
    info = raw.stat()
    return {"source": str(raw), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "format": fmt,
            "compress": compress}


def upload_file(raw: Path, fmt: str, compress: bool) -> UploadFile:
    """The file to upload in format `fmt`, converting disk.img to qcow2 where asked."""
    if not raw.is_file():
        raise P2VError(f"{raw} does not exist", hint="run the disk, sync and fix stages first")
    if fmt == "raw":
        return UploadFile(raw, "raw", raw.stat().st_size)
    if fmt != "qcow2":
        raise P2VError(f"unknown target format {fmt!r}")
    target = raw.with_name(raw.stem + ".qcow2")
    key_file = target.with_name(target.name + ".key")
    key = _key(raw, fmt, compress)
    if target.is_file() and key_file.is_file():
        try:
            if json.loads(key_file.read_text()) == key:
                log.info("reusing %s (made from the same %s)", target.name, raw.name)
                return UploadFile(target, "qcow2", target.stat().st_size)
        except ValueError:
            pass
    convert_to_qcow2(raw, target, compress)
    key_file.write_text(json.dumps(key, sort_keys=True) + "\n")
    return UploadFile(target, "qcow2", target.stat().st_size)


def convert_to_qcow2(raw: Path, target: Path, compress: bool) -> None:
    partial = target.with_name(target.name + ".partial")
    target.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1"]
    if compress:
        argv.append("-c")
    log.info("converting %s to qcow2%s", raw.name, " (compressed)" if compress else "")
    try:
        run([*argv, str(raw), str(partial)], hint="the work area needs room for the qcow2 file")
        run(["qemu-img", "check", "-f", "qcow2", str(partial)], hint="qemu-img made a damaged qcow2; rerun")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log.info("%s: %d MiB (from %d MiB of %s, %d MiB allocated)", target.name, target.stat().st_size >> 20,
             raw.stat().st_size >> 20, raw.name, (raw.stat().st_blocks * 512) >> 20)


def sha512_of(path: Path, cache: Path | None = None, progress: Callable[[int], None] | None = None) -> str:
    """sha512 of a file, cached in `cache` (JSON) by path, size and mtime."""
    return digest_of(path, "sha512", cache, progress)


def digest_of(path: Path, algorithm: str, cache: Path | None = None,
              progress: Callable[[int], None] | None = None) -> str:
    """A hashlib digest of a file, cached in `cache` (JSON) by path, size and mtime and algorithm."""
    info = path.stat()
    key = {"path": str(path.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    known: dict[str, str] = {}
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                known = {name: value for name, value in data.items() if name != "key" and isinstance(value, str)}
        except ValueError:
            pass
    if algorithm in known:
        return known[algorithm]
    digest = hashlib.new(algorithm)
    done = 0
    with path.open("rb", buffering=0) as handle:
        view = memoryview(bytearray(READ_BLOCK))
        while count := handle.readinto(view):
            digest.update(view[:count])
            done += count
            if progress is not None:
                progress(done)
    value = digest.hexdigest()
    if path.stat().st_mtime_ns != info.st_mtime_ns:
        raise P2VError(f"{path} changed while its checksum was computed", hint="is another run using it?")
    if cache is not None:
        write_file_atomically(cache, json.dumps({"key": key, **known, algorithm: value}, indent=2, sort_keys=True)
                              + "\n")
    return value
