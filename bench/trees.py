"""Trees to copy, for bench/sync.py and tests/integration/test_copy.py.

- `fixture_tree(name)`: a fixture server's filesystems, mounted read-only the
  way its fstab says (tasks.lib.storage + tasks.inspect.mounted_tree).
- `synthetic_tree(files)`: many small files on an ext4 image in /var/tmp,
  built once and cached, mounted read-only.
- `tiny_tree(files)`: millions of tiny files (bench/scale.py), likewise.
- `scratch_target(directory, filesystems)`: fresh filesystems on sparse
  images, loop-attached with direct I/O and mounted parents first.

Each is a context manager that leaves nothing attached or mounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks import inspect
from tasks.lib import storage
from tasks.lib.fsfacts import fs_features
from tasks.lib.fstab import mount_order
from tasks.lib.planning.features import XFS_FLAGS, ext_feature_set, xfs_flags
from tasks.lib.planning.model import CopyPlan, FilesystemPlan, PartitionPlan, SourceMount
from tasks.lib.resources import loop_device, mounted, read_only_mount_options
from tasks.lib.runner import P2VError, run
from tasks.lib.spec import load_specs
from tests.fixtures.build import FixtureServer, build_server

BENCH_DIR = Path(os.environ.get("P2V_BENCH_DIR", "/var/tmp/p2v-bench"))
SYNTHETIC_FORMAT = 1  # bump to rebuild cached synthetic trees


@dataclass(frozen=True)
class Tree:
    name: str
    root: Path  # the tree, mounted read-only
    mountpoints: tuple[str, ...]  # its filesystems, parents first
    filesystems: tuple[tuple[str, str, int], ...]  # (mountpoint, fstype, size) to build a target like it
    run_dir: Path | None = None  # where p2v mounted it (a fixture's), for leftover checks


def fixture_mounts(server: FixtureServer) -> list[dict[str, Any]]:
    """Mounts as inspect would plan them, from the fixture's facts (partitions only)."""
    by_point = {}
    for fs in server.facts["filesystems"]:
        where = fs["device"]
        if not fs.get("mountpoint"):
            continue
        if "partition" not in where:
            raise P2VError(f"{server.name}: {fs['mountpoint']} is on LVM; fixture_tree reads partitions only")
        by_point[fs["mountpoint"]] = {"mountpoint": fs["mountpoint"], "fstype": fs["fstype"],
                                      "device": f"disk{where['disk']}p{where['partition']}", "size": fs["size"]}
    return [by_point[point] for point in mount_order(list(by_point))]


@contextlib.contextmanager
def fixture_tree(name: str, directory: Path | None = None) -> Iterator[Tree]:
    """With `directory`: the spec, and hard links to the cached images, go there, so that the
    loop devices name files of this caller's only (a test checks them while others run)."""
    server = build_server(name)
    mounts = fixture_mounts(server)
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2v-tree-spec-")))
            images = list(server.disks)
        else:
            images = [_own_link(disk, directory / "images" / str(index)) for index, disk in enumerate(server.disks)]
            links = [image for image in images if image.is_relative_to(directory)]  # never a cached image
            for link in links:
                stack.callback(link.unlink, missing_ok=True)
        spec_dir = directory / "specs"
        spec_dir.mkdir(parents=True, exist_ok=True)
        listed = "".join(f"    - {image}\n" for image in images)
        (spec_dir / f"{name}.yaml").write_text(f"source:\n  images:\n{listed}workdir: {directory / 'work'}\n")
        (spec,) = load_specs(spec_dir)
        with storage.attached_source(spec.source) as (_disks, devices), \
                inspect.mounted_tree(spec, mounts, devices) as root:
            yield Tree(name=name, root=root, mountpoints=tuple(m["mountpoint"] for m in mounts),
                       filesystems=tuple((m["mountpoint"], m["fstype"], m["size"]) for m in mounts),
                       run_dir=spec.run_dir)


def _own_link(image: Path, directory: Path) -> Path:
    """A hard link to `image` in `directory`; the image itself where the cache is on another filesystem."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / image.name
    link.unlink(missing_ok=True)
    try:
        os.link(image, link)
    except OSError:
        return image
    return link


def make_filesystem(image: Path, fstype: str, size: int, options: Sequence[str] = ()) -> None:
    image.unlink(missing_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size)  # sparse
    if fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", *options, str(image)])
    else:
        run([f"mkfs.{fstype}", "-q", "-F", *options, str(image)])


@contextlib.contextmanager
def scratch_target(directory: Path, filesystems: Sequence[tuple[str, str, int]], *,
                   images: Sequence[Path] | None = None, keep: bool = False,
                   mkfs_options: Sequence[str] = ()) -> Iterator[Path]:
    """Filesystems (mountpoint, fstype, size) mounted under `directory`/tree, parents first.

    Fresh ones in `directory`, removed afterwards; or, with `images` (one per
    filesystem, in mount order) and `keep`, made only where an image is
    missing and kept for the next mount. `mkfs_options` go to every mkfs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tree = directory / "tree"
    tree.mkdir(exist_ok=True)
    by_point = {fs[0]: fs for fs in filesystems}
    ordered = [by_point[point] for point in mount_order(list(by_point))]
    paths = list(images) if images is not None else [directory / f"target{n}.img" for n in range(len(ordered))]
    made = []
    try:
        with contextlib.ExitStack() as stack:
            for image, (mountpoint, fstype, size) in zip(paths, ordered, strict=True):
                made.append(image)
                if not (keep and image.exists()):
                    make_filesystem(image, fstype, size, mkfs_options)
                loop = stack.enter_context(loop_device(image, read_only=False, direct_io=True))
                point = tree / mountpoint.lstrip("/")
                point.mkdir(exist_ok=True)
                stack.enter_context(mounted(loop.path, point, fstype=fstype))
            yield tree
    finally:
        for image in made if not keep else ():
            image.unlink(missing_ok=True)


def _synthetic_sizes(count: int, seed: int) -> list[int]:
    """Small files like /usr and /etc hold: half under 2 KiB, most under 16 KiB, a few up to 1 MiB."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:
            sizes.append(rng.randint(0, 2048))
        elif roll < 0.9:
            sizes.append(rng.randint(2048, 16384))
        elif roll < 0.99:
            sizes.append(rng.randint(16384, 131072))
        else:
            sizes.append(rng.randint(131072, 1 << 20))
    return sizes


def _fill_synthetic(root: Path, count: int) -> None:
    rng = random.Random(count)
    per_directory = 100
    block = rng.randbytes(1 << 20)
    for index, size in enumerate(_synthetic_sizes(count, count)):
        directory = root / f"d{index // (per_directory * 100):03d}" / f"d{(index // per_directory) % 100:02d}"
        if index % per_directory == 0:
            directory.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(0, (1 << 20) - size + 1)
        (directory / f"f{index:07d}").write_bytes(block[start:start + size])


def _synthetic_size(files: int) -> int:
    return max(1 << 30, files * 32 * 1024)  # ~17 KiB a file on average, and room


def _synthetic_image(files: int) -> Path:
    return BENCH_DIR / f"synthetic-{files}-v{SYNTHETIC_FORMAT}.img"


@contextlib.contextmanager
def synthetic_tree(files: int = 200_000) -> Iterator[Tree]:
    """`files` small files on a cached ext4 image, mounted read-only."""
    size = _synthetic_size(files)
    with _cached_tree(_synthetic_image(files), size, lambda root: _fill_synthetic(root, files),
                      direct_io=True) as root:
        yield Tree(name=f"synthetic, {files // 1000}k small files", root=root, mountpoints=("/",),
                   filesystems=(("/", "ext4", size),))


MAIL_SERVER_FORMAT = 1  # bump to rebuild cached mail servers
MAIL_SPOOL = "/var/mail"


def mail_server(files: int = 200_000, fixture: str = "plain-bookworm") -> tuple[Path, ...]:
    """A server with many small files, for the sync stage itself: `fixture` with the synthetic tree as /var/mail.

    Its disks: a copy of the fixture's first disk, whose fstab mounts the synthetic
    filesystem (a whole-disk ext4, the cached synthetic image itself) on /var/mail;
    the fixture's other disks as they are cached. Built once in BENCH_DIR; the
    cached images are only read (a spec lists them, p2v attaches them read-only).
    """
    server = build_server(fixture)
    with _cached_tree(_synthetic_image(files), _synthetic_size(files), lambda root: _fill_synthetic(root, files),
                      direct_io=True):
        pass  # built, if it was not
    spool = _synthetic_image(files)
    directory = BENCH_DIR / f"mail-server-{files}-{server.directory.name}-v{MAIL_SERVER_FORMAT}"
    first = directory / server.disks[0].name
    if not first.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = first.with_name(first.name + ".partial")
        run(["cp", "--sparse=always", str(server.disks[0]), str(partial)])
        (root,) = [fs["device"] for fs in server.facts["filesystems"] if fs.get("mountpoint") == "/"]
        if root.get("disk") != 1 or "partition" not in root:
            raise P2VError(f"{fixture}: its / is not a partition of its first disk; mail_server edits that one")
        uuid = storage.probe(str(spool))["UUID"]
        with tempfile.TemporaryDirectory(prefix="p2v-mail-", dir=BENCH_DIR) as point, \
                loop_device(partial, read_only=False, partitions=True) as loop, \
                mounted(loop.partition(root["partition"]), point, fstype="ext4"):
            (Path(point) / MAIL_SPOOL.lstrip("/")).mkdir(parents=True, exist_ok=True)
            with open(Path(point) / "etc/fstab", "a") as fstab:
                fstab.write(f"UUID={uuid} {MAIL_SPOOL} ext4 defaults 0 2\n")
        partial.rename(first)
    return (first, *server.disks[1:], spool)


@contextlib.contextmanager
def _cached_tree(image: Path, size: int, fill: Callable[[Path], None], *, mkfs_options: Sequence[str] = (),
                 direct_io: bool = False) -> Iterator[Path]:
    """An ext4 image in BENCH_DIR, filled by `fill` the first time and kept, mounted read-only."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if not image.exists():
        partial = image.with_suffix(".partial")
        make_filesystem(partial, "ext4", size, mkfs_options)
        with tempfile.TemporaryDirectory(prefix="p2v-tree-", dir=BENCH_DIR) as point, \
                loop_device(partial, read_only=False, direct_io=direct_io) as loop, \
                mounted(loop.path, point, fstype="ext4") as root:
            fill(root)
        partial.rename(image)
    with tempfile.TemporaryDirectory(prefix="p2v-tree-", dir=BENCH_DIR) as point, \
            loop_device(image, read_only=True) as loop, \
            mounted(loop.path, point, fstype="ext4", options=read_only_mount_options("ext4")) as root:
        yield root


TINY_FORMAT = 1  # bump to rebuild cached tiny trees
TINY_PER_DIRECTORY = 100
TINY_LINK_EVERY = 1000  # one file in this many has a second name (a hard link) in its directory


def tiny_mkfs_options(files: int) -> list[str]:
    """ext4 with 1 KiB blocks (a tiny file takes one) and an inode for every entry, and room."""
    return ["-b", "1024", "-N", str(files + files // 20 + 10_000)]


def tiny_size(files: int) -> int:
    return (256 << 20) + files * 2048  # a 1 KiB block and a 256-byte inode per file, directories, journal


def _fill_tiny(root: Path, count: int) -> None:
    """`count` files of 0 to 1023 bytes, 100 to a directory, 100 directories to a parent; a few hard links."""
    rng = random.Random(count)
    block = rng.randbytes(1 << 16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    directory_fd = -1
    try:
        for index in range(count):
            if index % TINY_PER_DIRECTORY == 0:
                if directory_fd >= 0:
                    os.close(directory_fd)
                directory = root / f"d{index // (TINY_PER_DIRECTORY * 100):04d}" / \
                    f"d{(index // TINY_PER_DIRECTORY) % 100:02d}"
                directory.mkdir(parents=True)
                directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            name = f"f{index:08d}"
            size = rng.randrange(1024)
            start = rng.randrange(len(block) - size)
            fd = os.open(name, flags, 0o644, dir_fd=directory_fd)
            try:
                os.write(fd, block[start:start + size])
            finally:
                os.close(fd)
            if index % TINY_LINK_EVERY == TINY_LINK_EVERY - 1:
                os.link(name, f"h{index:08d}", src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    finally:
        if directory_fd >= 0:
            os.close(directory_fd)


@contextlib.contextmanager
def tiny_tree(files: int) -> Iterator[Tree]:
    """`files` tiny files (0-1023 bytes) on a cached ext4 image, mounted read-only: for bench/scale.py."""
    size = tiny_size(files)
    with _cached_tree(BENCH_DIR / f"tiny-{files}-v{TINY_FORMAT}.img", size, lambda root: _fill_tiny(root, files),
                      mkfs_options=tiny_mkfs_options(files)) as root:
        yield Tree(name=f"tiny, {files:,} files", root=root, mountpoints=("/",), filesystems=(("/", "ext4", size),))


def remove_cached() -> None:
    if BENCH_DIR.exists():
        shutil.rmtree(BENCH_DIR)


def block_plan(part: PartitionPlan, source_node: str, fstype: str, uuid: str, *, keep_uuid: bool = False,
               resize: Literal["grow", "shrink"] = "grow") -> tuple[PartitionPlan, CopyPlan]:
    """The plan the planner makes for a block copy of a source's / into `part`: the source's features, `uuid`.
    For the bench and the tests, which copy filesystems with no server (no layout.json) around them."""
    found = fs_features(fstype, source_node)
    if fstype == "xfs":
        flags = xfs_flags(found["features"])
        features = tuple(f"{k}={flags[k]}" for k in XFS_FLAGS)
        block, inode = int(found["features"]["data.bsize"]), int(found["features"]["isize"])
    else:
        features = tuple(sorted(ext_feature_set(found["features"])))
        block, inode = found["block_size"], found["inode_size"]
    mount = SourceMount(mountpoint="/", device="disk1p1", fstype=fstype, used_bytes=0, used_inodes=0, uuid="",
                        label="")
    fs = FilesystemPlan(mountpoint="/", fstype=fstype, label="root", uuid=uuid, keep_uuid=keep_uuid,
                        features=features, features_off=(), features_from="as on the source", block_size=block,
                        inode_size=inode, inodes=None, mkfs=(), sources=(mount,), used_bytes=0, headroom=0,
                        overhead=0)
    copy = CopyPlan("/", "disk1p1", "/", method="blocks", why="a block copy of the source's /", resize=resize)
    return dataclasses.replace(part, filesystem=fs), copy
