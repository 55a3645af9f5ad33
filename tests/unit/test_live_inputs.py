"""What a live build is made of (live/inputs.py), its checks and its command line: pure parts."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from live import build
from live.assemble import DRACUT_MODULES, DRACUT_OMIT, INITRD_DRIVERS, check_initrd, missing_tools, parse_lsinitrd
from live.cmdline import live_cmdline
from live.inputs import (
    AptSource,
    LiveInputError,
    gather,
    live_apt_sources,
    parse_apt_sources,
    project_files,
    runtime_requirements,
)
from live.tools import LIVE_TOOLS
from tasks.lib.bootcheck import KernelBootConfig, kernel_qemu_argv
from tasks.lib.runner import P2VError

ROOT = Path(__file__).resolve().parents[2]

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security/
Suites: bookworm-security
Components: main contrib
"""


def test_apt_sources_in_both_formats() -> None:
    entries = parse_apt_sources([
        ("debian.sources", DEB822),
        ("sources.list", "# old\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ trixie main\n"),
    ])
    assert entries == [
        ("http://deb.debian.org/debian", "bookworm", ("main",)),
        ("http://deb.debian.org/debian", "bookworm-updates", ("main",)),
        ("http://deb.debian.org/debian-security", "bookworm-security", ("main", "contrib")),
        ("http://mirror.example/debian", "trixie", ("main",)),
    ]
    assert live_apt_sources(entries) == (
        AptSource("http://deb.debian.org/debian", "bookworm"),
        AptSource("http://deb.debian.org/debian", "bookworm-updates"),
        AptSource("http://deb.debian.org/debian-security", "bookworm-security"),
    )


def test_the_mirror_is_the_one_apt_uses_and_updates_are_optional() -> None:
    entries = parse_apt_sources([("sources.list", "deb http://mirror.example/debian bookworm main\n")])
    assert live_apt_sources(entries) == (AptSource("http://mirror.example/debian", "bookworm"),)


def test_no_bookworm_source_is_one_clear_error() -> None:
    entries = parse_apt_sources([("sources.list", "deb http://mirror.example/debian trixie main\n")])
    with pytest.raises(LiveInputError, match=r"apt has no source for Debian bookworm main \(hint: add"):
        live_apt_sources(entries)
    disabled = DEB822.replace("Types: deb\n", "Types: deb\nEnabled: no\n")
    with pytest.raises(LiveInputError):
        live_apt_sources(parse_apt_sources([("x.sources", disabled)]))


def test_the_venv_gets_the_runtime_requirements_only() -> None:
    text = (ROOT / "requirements.txt").read_text()
    runtime = runtime_requirements(text).split()
    assert "doit==0.37.0" in runtime and any(r.startswith("pyparted==") for r in runtime)
    assert not any(r.startswith(("pytest", "ruff", "mypy", "types-")) for r in runtime)
    with pytest.raises(LiveInputError, match="no '# Test and lint tools' line"):
        runtime_requirements("doit==0.37.0\npytest==9\n")


def test_p2v_files_copied_in_are_the_runtime_ones() -> None:
    files = project_files(ROOT)
    assert {"dodo.py", "doit.cfg", "requirements.txt", "tasks/__init__.py", "tasks/schemas/spec.schema.json",
            "live/cmdline.py"} <= set(files)
    assert not [f for f in files if f.startswith(("tests/", "live/root/", "bin/", "specs/")) or "__pycache__" in f]


def _copy_project(target: Path) -> Path:
    for name in ("dodo.py", "doit.cfg", "requirements.txt"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "tasks", target / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "live", target / "live", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_keys_follow_the_inputs(tmp_path: Path) -> None:
    project = _copy_project(tmp_path)
    first = gather(project)
    assert gather(project) == first  # nothing random in it
    (project / "tasks/sync.py").write_text((project / "tasks/sync.py").read_text() + "\n# changed\n")
    stage_changed = gather(project)
    # A stage change: a new live system on the same base.
    assert stage_changed.key != first.key and stage_changed.base_key == first.base_key
    (project / "live/root/etc/hostname").write_text("other\n")
    root_changed = gather(project)
    assert root_changed.base_key != first.base_key
    more_packages = dataclasses.replace(first, packages=(*first.packages, "htop"))
    assert more_packages.base_key != first.base_key and more_packages.key != first.key
    other_mirror = dataclasses.replace(first, sources=(AptSource("http://mirror.example/debian", "bookworm"),))
    assert other_mirror.base_key != first.base_key
    requirements = (project / "requirements.txt").read_text().replace("tenacity==9.2.1", "tenacity==9.2.0")
    (project / "requirements.txt").write_text(requirements)
    assert gather(project).base_key != root_changed.base_key


LSINITRD = """\
Image: /boot/initrd.img-6.1.0-57-amd64: 62M
========================================================================
Version: dracut-059-4

dracut modules:
bash
systemd
network-legacy
network
dm
dmsquash-live
livenet
nfs
========================================================================
drwxr-xr-x   2 root root 0 Dec  1 17:24 usr/lib/modules/6.1.0-57-amd64/kernel/drivers/ata
-rw-r--r--   1 root root 1 Jul  2 13:50 usr/lib/modules/6.1.0-57-amd64/kernel/drivers/ata/ahci.ko
-rw-r--r--   1 root root 1 Jul  2 13:50 usr/lib/modules/6.1.0-57-amd64/kernel/drivers/ata/ata_piix.ko.xz
-rw-r--r--   1 root root 1 Jul  2 13:50 usr/lib/modules/6.1.0-57-amd64/kernel/drivers/md/dm-mod.ko
"""


def test_lsinitrd_listing_is_read() -> None:
    modules, drivers = parse_lsinitrd(LSINITRD)
    assert modules == ["bash", "systemd", "network-legacy", "network", "dm", "dmsquash-live", "livenet", "nfs"]
    assert drivers == {"ahci", "ata_piix", "dm_mod"}


def _full_listing(skip_driver: str = "", extra_module: str = "") -> str:
    lines = ["dracut modules:", *DRACUT_MODULES, *([extra_module] if extra_module else []), "=" * 8]
    lines += [f"-rw-r--r-- 1 root root 1 Jul 2 13:50 usr/lib/modules/k/{d}.ko" for d in INITRD_DRIVERS
              if d != skip_driver]
    return "\n".join(lines) + "\n"


def test_initrd_check_names_what_is_wrong() -> None:
    facts = check_initrd(_full_listing(), [])
    assert facts["drivers"]["hpsa"] == "module"
    # A driver built into the kernel needs no module in the initrd.
    builtin = check_initrd(_full_listing(skip_driver="ahci"), ["kernel/drivers/ata/ahci.ko"])
    assert builtin["drivers"]["ahci"] == "built in"
    with pytest.raises(P2VError, match="drivers missing: megaraid_sas"):
        check_initrd(_full_listing(skip_driver="megaraid_sas"), [])
    with pytest.raises(P2VError, match=f"must be left out: {DRACUT_OMIT[0]}"):
        check_initrd(_full_listing(extra_module=DRACUT_OMIT[0]), [])


def test_missing_tools_looks_in_the_bin_directories() -> None:
    paths = {f"/usr/sbin/{tool}" for tool in LIVE_TOOLS if tool != "mdadm"} | {"/usr/share/mdadm"}
    assert missing_tools(paths) == ["mdadm"]


def test_live_cmdline() -> None:
    line = live_cmdline("http://10.0.2.2:8080/squashfs.img", ["rd.shell"])
    assert line.split() == ["root=live:http://10.0.2.2:8080/squashfs.img", "rd.live.overlay.overlayfs=1", "ip=dhcp",
                            "rd.neednet=1", "console=tty0", "console=ttyS0,115200n8", "rd.shell"]
    with pytest.raises(ValueError, match="http"):
        live_cmdline("/srv/squashfs.img")


def test_kernel_boot_argv(tmp_path: Path) -> None:
    disk = tmp_path / "scratch.img"
    disk.write_bytes(b"\0" * 512)
    config = KernelBootConfig(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", append="root=live:x",
                              disks=(disk,))
    argv = kernel_qemu_argv(config)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-m") + 1] == "2048"
    assert argv[argv.index("-append") + 1] == "root=live:x"
    assert "-snapshot" in argv
    assert f"file={disk},format=raw,if=none,id=disk0" in argv
    assert "user,id=net0,restrict=off" in argv and "e1000,netdev=net0" in argv


def test_an_input_error_is_a_p2v_error_with_its_hint() -> None:
    error = LiveInputError("requirements.txt is missing", hint="run from the checkout")
    assert isinstance(error, P2VError)
    assert str(error) == "requirements.txt is missing (hint: run from the checkout)"


def test_the_inputs_load_none_of_the_stages() -> None:
    # A cached bin/live-build computes the key from live.inputs: the pipeline
    # (half a second of imports) must not come with P2VError.
    code = "import sys, live.inputs; print(sorted(m for m in sys.modules if m.startswith('tasks')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "['tasks', 'tasks.lib', 'tasks.lib.runner']"


def test_live_build_reports_an_input_error_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(**_: object) -> None:
        raise LiveInputError("apt has no source for Debian bookworm main", hint="add one")

    monkeypatch.setattr(build, "ensure_live", refuse)
    # main() adds its console handler to the root logger: to a list thrown away afterwards.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    assert build.main([]) == 1
    assert capsys.readouterr().err == "bin/live-build: apt has no source for Debian bookworm main (hint: add one)\n"
