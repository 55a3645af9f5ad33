"""How fast the upload is, next to a plain sequential read of the same file, in the same run.

    .venv/bin/python -m bench.upload [--size-mib 1024] [--repeat 1] [--json figures.json]

Starts the local Keystone + Glance (tests/services; the venv is built on first use), makes a
file of random data (cached in /var/tmp/p2v-bench, `P2V_BENCH_DIR`), then for each run:

    read      the file read sequentially in 1 MiB blocks (the local limit)
    hash      the same read with our sha512 on the way (what the client side costs)
    upload    the stage's upload path: HashingReader (our sha512 + progress) into
              glanceclient's images.upload, through Keystone auth, into Glance's file store

Before every timed run: `sync; echo 3 > /proc/sys/vm/drop_caches`, so that both read the file
cold. Below the table: upload / read throughput (target >= 0.90). Needs root (drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.cold import drop_caches
from tasks.lib import glance
from tasks.lib.copy import human
from tasks.lib.progress import Progress
from tasks.upload import HashingReader
from tests.services.openstack import OpenStackServices

TARGET = 0.90
BENCH_DIR = Path(os.environ.get("P2V_BENCH_DIR", "/var/tmp/p2v-bench"))
MiB = 1 << 20


def data_file(size_mib: int) -> Path:
    path = BENCH_DIR / f"upload-{size_mib}M.bin"
    if path.is_file() and path.stat().st_size == size_mib * MiB:
        return path
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(MiB))
    os.replace(partial, path)
    return path


def timed_read(path: Path) -> float:
    drop_caches()
    started = time.monotonic()
    with path.open("rb", buffering=0) as handle:
        while handle.read(MiB):
            pass
    return time.monotonic() - started


def timed_hash(path: Path) -> float:
    drop_caches()
    started = time.monotonic()
    with path.open("rb", buffering=0) as handle:
        reader = HashingReader(handle, path.stat().st_size, lambda _p: None)
        while reader.read(MiB):
            pass
    return time.monotonic() - started


def timed_upload(service: glance.ImageService, path: Path) -> float:
    size = path.stat().st_size
    image = service.create({"name": "p2v-bench", "disk_format": "raw", "container_format": "bare",
                            "p2v_source_host": "p2v-bench"})
    drop_caches()
    try:
        started = time.monotonic()
        with path.open("rb", buffering=0) as handle:
            reader = HashingReader(handle, size, lambda _p: None)
            service.upload(image["id"], reader, size)
        seconds = time.monotonic() - started
        stored = service.get(image["id"])
        assert stored["os_hash_value"] == reader.digest.hexdigest(), "sha512 mismatch"
    finally:
        service.delete(image["id"])
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.upload: run as root (it drops the page cache)", file=sys.stderr)
        return 1
    path = data_file(args.size_mib)
    size = path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="p2v-bench-openstack-") as state, \
            OpenStackServices(Path(state), log=lambda t: print(t, file=sys.stderr)) as services:
        cloud = glance.load_cloud("p2v-test", env={"OS_CLIENT_CONFIG_FILE": str(services.clouds_yaml)})
        service = glance.ImageService(cloud)
        service.authenticate()
        reads, hashes, uploads = [], [], []
        for _ in range(args.repeat):
            reads.append(timed_read(path))
            hashes.append(timed_hash(path))
            uploads.append(timed_upload(service, path))
    read_s, hash_s, upload_s = statistics.median(reads), statistics.median(hashes), statistics.median(uploads)
    read_rate, upload_rate = size / read_s, size / upload_s
    ratio = upload_rate / read_rate
    print(f"file: {path} ({human(size)}), {args.repeat} run(s), median")
    print(f"{'read':<8} {read_s:7.2f} s  {human(read_rate)}/s")
    print(f"{'hash':<8} {hash_s:7.2f} s  {human(size / hash_s)}/s")
    done = Progress("upload", size, size, upload_s, final=True).line()
    print(f"{'upload':<8} {upload_s:7.2f} s  {human(upload_rate)}/s   ({done})")
    verdict = "ok" if ratio >= TARGET else "below target"
    print(f"upload / read: {ratio:.2f} (target >= {TARGET:.2f}: {verdict})")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "read_seconds": reads, "hash_seconds": hashes,
                                         "upload_seconds": uploads, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
