"""Building the live system: the verbs, in the order they run.

base (cached by live.inputs' base key):
  debootstrap -> install packages -> build the venv -> configure -> prune
  kernel modules -> make the initrd (dracut, in the tree) -> check the initrd
  -> export kernel and initrd -> clean -> squash -> check the tools
live (cached by the full key):
  copy the base squashfs -> append p2v's files under /opt/p2v -> check -> manifest

Every command runs through tasks.lib.runner; chroot binds go through
tasks.lib.resources.chroot_binds, and whatever debootstrap leaves mounted
when it fails is unmounted before the tree is removed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from live.cmdline import INITRD_NAME, KERNEL_NAME, SQUASHFS_NAME, live_cmdline
from live.inputs import HOSTNAME, LIVE_DIR, PROJECT_DIR, VENV_DIR, LiveInputs
from live.tools import BIN_DIRS, LIVE_TOOLS
from tasks.lib.paths import resolve_in_root
from tasks.lib.resources import chroot_binds, mounts_released, remove_tree, unmount_below
from tasks.lib.runner import P2VError, Result, run

log = logging.getLogger("p2v.live")

BASE_SQUASHFS = "base.squashfs"
BASE_RECORD = "base.json"
MANIFEST = "manifest.json"

# zstd rather than xz: measured on this tree, xz made a 9% smaller image (172
# against 190 MB) in three times the time (551 against 172 s), and zstd
# decompresses faster, which a TCG boot feels. Debian's kernel reads both.
SQUASHFS_COMPRESSION = "zstd"
# Level 6, not mksquashfs's 15: measured on the 726 MB base tree (2 cores, 2026-12-03), 15 took
# 86 s for 194 MB, 6 took 8 s for 209 MB (+8 %), 3 took 3 s for 224 MB (+15 %). The image is
# fetched once per boot and held in RAM; zstd decompresses as fast at either level.
SQUASHFS_LEVEL = 6
# gzip: zstd -3 saved 4%, xz 32% at several minutes per build; the kernel reads
# all three, and an old server's TFTP is rarely what is slow.
INITRD_COMPRESSION = "gzip"

# dracut modules as Debian's dracut 059 names them. `network` picks its
# handler from what is installed; the tree has systemd-networkd, so ask for
# network-legacy (dhclient) explicitly: it is what livenet is tested with.
# p2v-live is ours (live/root/usr/lib/dracut/modules.d/99p2v-live): without
# it, every boot printed a FAILED mount of /sysroot before dracut recovered.
DRACUT_MODULES: tuple[str, ...] = ("livenet", "dmsquash-live", "nfs", "network", "network-legacy", "p2v-live")
# Modules that assemble or activate storage (and would do so on the source's
# disks before p2v set them read-only), and what a live boot has no use for.
DRACUT_OMIT: tuple[str, ...] = ("lvm", "mdraid", "dmraid", "crypt", "multipath", "resume", "iscsi", "fcoe",
                                "btrfs", "plymouth")
# Storage and NIC drivers of the servers p2v converts, and virtio for the tests.
# --no-hostonly brings every block and network driver anyway; these must be there.
INITRD_DRIVERS: tuple[str, ...] = (
    "ahci", "ata_piix", "mptsas", "mpt3sas", "megaraid_sas", "hpsa", "aacraid",
    "e1000", "e1000e", "igb", "tg3", "bnx2", "bnx2x", "ixgbe",
    "virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci",
)

# Kernel module trees a conversion never loads: about 190 MB of the 414 MB.
PRUNED_MODULE_DIRS: tuple[str, ...] = (
    "sound", "drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband", "drivers/iio",
    "drivers/staging", "drivers/comedi", "drivers/isdn", "drivers/bluetooth", "drivers/mtd",
    "net/bluetooth", "net/wireless", "net/mac80211",
)

# Units that would write to the source's disks behind p2v's back, or reach the
# network for nothing.
MASKED_UNITS: tuple[str, ...] = (
    "e2scrub_all.timer", "e2scrub_reap.service",  # snapshot LVs to scrub them; remove such snapshots
    "fstrim.timer",  # trims every mounted filesystem
    "mdadm-last-resort@.timer", "mdadm-last-resort@.service",  # start incomplete arrays degraded
    "mdcheck_start.timer", "mdcheck_continue.timer",  # array checks (a repair writes)
    "mdmonitor.service", "mdmonitor-oneshot.timer",
    "lvm2-monitor.service",  # dmeventd acts on LVs it monitors
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    # At poweroff they build (mdadm) or unpack (dracut) a shutdown initramfs to
    # unmount a root on md or dm cleanly: the live root is in RAM, and the
    # dracut run held a TCG poweroff for 90 s.
    "mdadm-shutdown.service", "dracut-shutdown.service",
)
# udev rules that assemble md arrays and activate LVs as disks appear
# (mdadm.conf's `AUTO -all` and lvmlocal.conf say the same; belt and braces).
MASKED_UDEV_RULES: tuple[str, ...] = ("64-md-raid-assembly.rules", "69-lvm.rules")
# It would activate swap partitions it finds on a disk.
MASKED_GENERATORS: tuple[str, ...] = ("systemd-gpt-auto-generator",)

# Kept out of the tree by dpkg (and removed from what debootstrap installed).
DPKG_EXCLUDES = """\
# p2v live system: no documentation, manuals or translations (the squashfs is held in RAM)
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

TREE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Passed into the tree; nothing else of this machine's environment is (its
# PIP_*, locale and paths would leak into the build otherwise).
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


# ---------------------------------------------------------------- helpers


def in_tree(tree: Path, argv: Sequence[str], *, timeout: float = 600, hint: str | None = None) -> Result:
    """Run a command inside the tree (chroot) with a clean environment."""
    env = [f"PATH={TREE_PATH}", "HOME=/root", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
           # Debian's kernel and dracut hooks skip their initrd: the build makes it once, explicitly.
           "INITRD=No"]
    env += [f"{name}={os.environ[name]}" for name in PASSED_ENV if name in os.environ]
    return run(["chroot", str(tree), "env", "-i", *env, *argv], timeout=timeout, hint=hint)


def file_facts(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def build_in_partial(final: Path, make: Callable[[Path], None]) -> None:
    """Run `make` on `<final>.partial`, and rename it to `final` only when it succeeded."""
    partial = final.with_name(final.name + ".partial")
    unmount_below(partial)  # a build killed before it could clean up
    remove_tree(partial)
    partial.mkdir(parents=True)
    try:
        make(partial)
    except BaseException:
        unmount_below(partial)
        remove_tree(partial)
        raise
    partial.rename(final)


# ---------------------------------------------------------------- base


def debootstrap(inputs: LiveInputs, tree: Path) -> None:
    log.info("live: debootstrap %s from %s", inputs.suite, inputs.sources[0].uri)
    with mounts_released(tree):
        run(["debootstrap", "--variant=minbase", "--components=main", inputs.suite, str(tree), inputs.sources[0].uri],
            timeout=1800, hint="debootstrap needs the Debian mirror; see the output tail for what failed")
    (tree / "etc/apt/sources.list").write_text("".join(s.line() + "\n" for s in inputs.sources))
    (tree / "etc/dpkg/dpkg.cfg.d/p2v-live-nodoc").write_text(DPKG_EXCLUDES)
    remove_docs(tree)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_docs(tree: Path) -> None:
    """What DPKG_EXCLUDES keeps out of later packages, removed from debootstrap's."""
    for path in (tree / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            _remove(path)
    for path in [*(tree / "usr/share/man").glob("*"), *(tree / "usr/share/info").glob("*")]:
        _remove(path)
    for path in (tree / "usr/share/locale").glob("*"):
        if path.name != "locale.alias":
            _remove(path)


def install_packages(tree: Path, packages: Sequence[str]) -> None:
    log.info("live: installing %d packages", len(packages))
    in_tree(tree, ["apt-get", "update"], timeout=600)
    in_tree(tree, ["apt-get", "install", "-y", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold",
                   *packages], timeout=2400, hint="a package could not be installed from the mirror")


def tree_python(tree: Path) -> str:
    return in_tree(tree, ["python3", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"]
                   ).stdout.strip()


def build_venv(inputs: LiveInputs, tree: Path) -> list[str]:
    """p2v's venv at VENV_DIR, from the runtime requirements; returns `pip freeze`.

    The wheels and sources are downloaded here, by this machine's pip with its
    own index, certificates and proxy; the tree installs them with --no-index.
    pyparted compiles in the tree against its libparted; the compiler and the
    headers are purged afterwards.
    """
    python = tree_python(tree)
    if python != inputs.python:
        raise P2VError(f"the live tree has Python {python}, this machine's pip downloads for {inputs.python}",
                       hint="run bin/live-build with the project's .venv on the same Debian release as the tree")
    wheels = tree / "tmp/p2v-wheels"
    wheels.mkdir(parents=True)
    requirements = tree / "tmp/p2v-requirements.txt"
    requirements.write_text(inputs.requirements)
    log.info("live: downloading the venv's packages")
    run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--dest", str(wheels),
         "-r", str(requirements)], timeout=1200, hint="pip needs this machine's package index")
    install_packages(tree, inputs.build_packages)
    log.info("live: building the venv at %s", VENV_DIR)
    in_tree(tree, ["python3", "-m", "venv", VENV_DIR])
    pip = f"{VENV_DIR}/bin/pip"
    in_tree(tree, [pip, "install", "--no-index", "--find-links", "/tmp/p2v-wheels", "--no-cache-dir",
                   "--disable-pip-version-check", "-r", "/tmp/p2v-requirements.txt"], timeout=1800)
    # As bin/install does for .venv: the project is importable from the venv
    # (doit loads tasks.lib.state from doit.cfg before dodo.py sets sys.path).
    site = f"{VENV_DIR}/lib/python{python}/site-packages"
    (tree / site.lstrip("/") / "p2v-project.pth").write_text(PROJECT_DIR + "\n")
    in_tree(tree, ["apt-get", "purge", "-y", "--autoremove", *inputs.build_packages], timeout=900)
    # The compiled part still loads without the headers, and the set is consistent.
    in_tree(tree, [f"{VENV_DIR}/bin/python", "-c", "import parted, doit, yaml, jinja2, jsonschema, tqdm"])
    in_tree(tree, [pip, "check", "--disable-pip-version-check"])
    freeze = in_tree(tree, [pip, "freeze", "--disable-pip-version-check"]).stdout.split()
    shutil.rmtree(wheels)
    requirements.unlink()
    return freeze


def lay_root_files(tree: Path, source: Path = LIVE_DIR / "root") -> list[str]:
    """live/root/ over the tree (configuration owned by p2v); returns the paths written."""
    written: list[str] = []
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(source).as_posix()
        target = resolve_in_root(tree, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        shutil.copyfile(path, target)
        target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
        written.append("/" + relative)
    return written


def configure(tree: Path) -> dict[str, Any]:
    """Host name, consoles, network, no automatic storage assembly; what was done, for the manifest."""
    log.info("live: configuring %s", HOSTNAME)
    written = lay_root_files(tree)
    in_tree(tree, ["systemctl", "mask", *MASKED_UNITS])
    # p2v-runner.service (live/runner.py) starts only on a command line with p2v.host (doit pxe's menus);
    # p2v-job.service only with p2v.job (a fixture build or a test in a guest: tests/fixtures/guest.py).
    in_tree(tree, ["systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service",
                   "p2v-runner.service", "p2v-job.service"])
    for rule in MASKED_UDEV_RULES:
        link = tree / "etc/udev/rules.d" / rule
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for generator in MASKED_GENERATORS:
        link = tree / "etc/systemd/system-generators" / generator
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # Empty: systemd makes a new machine id at each boot, and no two servers share one.
    (tree / "etc/machine-id").write_text("")
    dbus_id = tree / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    (tree / "etc/fstab").write_text("# p2v live system: the root is dracut's overlay over the squashfs, in RAM\n")
    shadow = (tree / "etc/shadow").read_text()
    if not re.search(r"^root:[*!]", shadow, re.M):
        raise P2VError("root has a password in the live tree; the live system must have none")
    lvm = in_tree(tree, ["lvmconfig", "--type", "current", "activation/auto_activation_volume_list"]).stdout.strip()
    if lvm.replace(" ", "") != "auto_activation_volume_list=[]":
        raise P2VError(f"lvm in the live tree would still activate volumes by itself: {lvm!r}")
    return {"files": written, "masked_units": list(MASKED_UNITS), "masked_udev_rules": list(MASKED_UDEV_RULES),
            "masked_generators": list(MASKED_GENERATORS), "lvm": lvm}


def kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "usr/lib/modules").iterdir() if (p / "modules.dep").is_file())
    if len(versions) != 1:
        raise P2VError(f"the live tree should have exactly one kernel, found {versions or 'none'}")
    return versions[0]


def prune_modules(tree: Path, kver: str) -> list[str]:
    top = tree / "usr/lib/modules" / kver / "kernel"
    removed = []
    for relative in PRUNED_MODULE_DIRS:
        if (top / relative).is_dir():
            shutil.rmtree(top / relative)
            removed.append(relative)
    in_tree(tree, ["depmod", kver])
    return removed


def make_initrd(tree: Path, kver: str) -> None:
    log.info("live: dracut for %s", kver)
    in_tree(tree, [
        "dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--reproducible", f"--{INITRD_COMPRESSION}",
        "--add", " ".join(DRACUT_MODULES), "--omit", " ".join(DRACUT_OMIT), "--add-drivers", " ".join(INITRD_DRIVERS),
        f"/boot/initrd.img-{kver}", kver,
    ], timeout=1800)


def parse_lsinitrd(text: str) -> tuple[list[str], set[str]]:
    """(dracut modules, kernel module names with '-' as '_') from `lsinitrd` output."""
    modules: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip() == "dracut modules:":
            for item in lines:
                if not item.strip() or item.startswith("===="):
                    break
                modules.append(item.strip())
            break
    drivers = {m.group(1).replace("-", "_") for m in re.finditer(r"/([^/\s]+)\.ko(?:\.xz|\.zst|\.gz)?$", text, re.M)}
    return modules, drivers


def check_initrd(listing: str, builtin: Iterable[str]) -> dict[str, Any]:
    """Every wanted dracut module and driver in the initrd (a driver built into the kernel counts), no omitted one."""
    modules, drivers = parse_lsinitrd(listing)
    builtin_names = {Path(line.strip()).name.split(".ko")[0].replace("-", "_") for line in builtin if line.strip()}
    missing_modules = [m for m in DRACUT_MODULES if m not in modules]
    unwanted = [m for m in DRACUT_OMIT if m in modules]
    found: dict[str, str] = {}
    missing_drivers = []
    for driver in INITRD_DRIVERS:
        if driver in drivers:
            found[driver] = "module"
        elif driver in builtin_names:
            found[driver] = "built in"
        else:
            missing_drivers.append(driver)
    problems = []
    if missing_modules:
        problems.append(f"dracut modules missing: {', '.join(missing_modules)}")
    if unwanted:
        problems.append(f"dracut modules that must be left out: {', '.join(unwanted)}")
    if missing_drivers:
        problems.append(f"drivers missing: {', '.join(missing_drivers)}")
    if problems:
        raise P2VError("the live initrd is not what it should be: " + "; ".join(problems))
    return {"dracut_modules": modules, "drivers": found, "kernel_modules": len(drivers)}


def export_boot_files(tree: Path, kver: str, directory: Path) -> None:
    """Kernel and initrd out of the tree (they are served beside the squashfs, not in it)."""
    shutil.copyfile(tree / f"boot/vmlinuz-{kver}", directory / KERNEL_NAME)
    shutil.copyfile(tree / f"boot/initrd.img-{kver}", directory / INITRD_NAME)
    for path in [*(tree / "boot").glob("vmlinuz-*"), *(tree / "boot").glob("initrd.img-*"),
                 *(tree / name for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"))]:
        if path.exists() or path.is_symlink():
            path.unlink()


def clean_tree(tree: Path) -> None:
    """Caches and logs of the build, and the empty /opt the appended layer brings back."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "tmp/*",
                    "var/tmp/*", "var/log/*.log", "var/log/apt/*", "root/.cache", "var/cache/debconf/*-old"):
        for path in tree.glob(pattern):
            _remove(path)
    (tree / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    # The live layer adds /opt/p2v, and a squashfs append cannot add to a
    # directory the base has: /opt must go, and it must be empty.
    opt = tree / "opt"
    if opt.exists():
        if any(opt.iterdir()):
            raise P2VError(f"a package installed files under /opt in the live tree: {sorted(os.listdir(opt))}",
                           hint="the live system keeps /opt for p2v; drop that package")
        opt.rmdir()


def squash(source: Path, image: Path, *, append: bool = False) -> None:
    argv = ["mksquashfs", str(source), str(image), "-no-progress", "-no-recovery"]
    if append:
        # Into the existing image's root, with its compression; owned by root like the rest.
        argv += ["-all-root"]
    else:
        argv += ["-noappend", "-comp", SQUASHFS_COMPRESSION, "-Xcompression-level", str(SQUASHFS_LEVEL)]
    run(argv, timeout=3600)


def squashfs_paths(image: Path) -> set[str]:
    """Every path in a squashfs image, absolute."""
    text = run(["unsquashfs", "-l", "-d", "", str(image)], timeout=600).stdout
    return {line.strip() for line in text.splitlines() if line.startswith("/")}


def missing_tools(paths: set[str], tools: Sequence[str] = LIVE_TOOLS) -> list[str]:
    return [tool for tool in tools if not any(f"/{directory}/{tool}" in paths for directory in BIN_DIRS)]


def installed_packages(tree: Path) -> dict[str, str]:
    text = in_tree(tree, ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]).stdout
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def build_base(inputs: LiveInputs, work: Path) -> None:
    """Debian with the packages, the venv, a kernel and an initrd: base.squashfs, vmlinuz, initrd.img, base.json."""
    started = time.monotonic()
    tree = work / "tree"
    tree.mkdir()
    debootstrap(inputs, tree)
    with chroot_binds(tree):
        install_packages(tree, inputs.packages)
        freeze = build_venv(inputs, tree)
        install_packages(tree, inputs.late_packages)
        configuration = configure(tree)
        kver = kernel_version(tree)
        pruned = prune_modules(tree, kver)
        make_initrd(tree, kver)
        listing = in_tree(tree, ["lsinitrd", f"/boot/initrd.img-{kver}"]).stdout
        packages = installed_packages(tree)
    builtin = (tree / "usr/lib/modules" / kver / "modules.builtin").read_text().splitlines()
    initrd = check_initrd(listing, builtin)
    export_boot_files(tree, kver, work)
    clean_tree(tree)
    log.info("live: mksquashfs (%s level %d) of the base", SQUASHFS_COMPRESSION, SQUASHFS_LEVEL)
    squash(tree, work / BASE_SQUASHFS)
    remove_tree(tree)
    missing = missing_tools(squashfs_paths(work / BASE_SQUASHFS))
    if missing:
        raise P2VError(f"the live root lacks commands p2v needs: {', '.join(missing)}",
                       hint="add the packages that provide them to live.inputs.LIVE_PACKAGES")
    record = {
        "base_key": inputs.base_key,
        "identity": inputs.base_identity(),
        "kernel": kver,
        "initrd": {"compression": INITRD_COMPRESSION, **initrd},
        "pruned_module_dirs": pruned,
        "configuration": configuration,
        "packages": packages,
        "python_packages": freeze,
        "build_seconds": round(time.monotonic() - started),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (work / BASE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- the live system


def stage_project(inputs: LiveInputs, staging: Path) -> None:
    """p2v's files under staging/opt/p2v, and .venv pointing at the base's venv (the checkout's layout)."""
    top = staging / PROJECT_DIR.lstrip("/")
    for relative in inputs.files:
        target = top / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(inputs.project / relative, target, follow_symlinks=False)
    (top / ".venv").symlink_to(VENV_DIR)


def build_live(inputs: LiveInputs, base: Path, work: Path) -> None:
    """The base's squashfs with /opt/p2v appended, the base's kernel and initrd, and manifest.json."""
    started = time.monotonic()
    record = json.loads((base / BASE_RECORD).read_text())
    staging = work / "staging"
    stage_project(inputs, staging)
    image = work / SQUASHFS_NAME
    shutil.copyfile(base / BASE_SQUASHFS, image)
    log.info("live: appending p2v (%d files) to the squashfs", len(inputs.files))
    squash(staging, image, append=True)
    shutil.rmtree(staging)
    paths = squashfs_paths(image)
    absent = [f for f in inputs.files if f"{PROJECT_DIR}/{f}" not in paths]
    if absent or any(p.startswith("/opt_") for p in paths):
        raise P2VError(f"the appended squashfs does not hold p2v where expected (missing: {absent[:5]})")
    missing = missing_tools(paths)
    if missing:
        raise P2VError(f"the live root lacks commands p2v needs: {', '.join(missing)}")
    for name in (KERNEL_NAME, INITRD_NAME):
        os.link(base / name, work / name)  # the same files as the base's: hard links, not copies
    manifest = {
        "key": inputs.key,
        "base_key": inputs.base_key,
        "distribution": f"Debian {inputs.suite}",
        "hostname": HOSTNAME,
        "kernel": record["kernel"],
        "files": {name: file_facts(work / name) for name in (KERNEL_NAME, INITRD_NAME, SQUASHFS_NAME)},
        "squashfs": {"compression": SQUASHFS_COMPRESSION, "level": SQUASHFS_LEVEL,
                     "base_bytes": (base / BASE_SQUASHFS).stat().st_size},
        "initrd": record["initrd"],
        "layout": {"project": PROJECT_DIR, "venv": VENV_DIR, "doit": f"{PROJECT_DIR}/.venv/bin/doit"},
        "cmdline": live_cmdline(f"http://SERVER/{SQUASHFS_NAME}"),
        "inputs": {**record["identity"], "project_files": list(inputs.files),
                   "project_digest": inputs.files_digest},
        "configuration": record["configuration"],
        "pruned_module_dirs": record["pruned_module_dirs"],
        "packages": record["packages"],
        "python_packages": record["python_packages"],
        "base_build_seconds": record["build_seconds"],
        "build_seconds": round(time.monotonic() - started),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def sizes(manifest: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {facts['bytes'] / 1e6:.1f} MB" for name, facts in manifest["files"].items())
