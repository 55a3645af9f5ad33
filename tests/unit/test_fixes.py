"""The fix planner (tasks.lib.fixes) on synthetic trees and recorded layouts.

Each case's expected output lives in tests/unit/data/fixes/<case>/:
`files/<path>` is the full text every edited file must get, `deleted` lists
the files deleted, and `commands.json` the kernel, its arguments and every
command line. They are the specification, checked by hand; after a
deliberate change, `P2V_REGENERATE_FIXES=1 pytest tests/unit/test_fixes.py`
rewrites them, and the diff is what gets reviewed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tasks.lib.fixes import (
    EditPlan,
    apply_edit,
    bootloader_config_commands,
    bootloader_install_commands,
    expected_initrd_drivers,
    initrd_check_command,
    initrd_commands,
    plan_edits,
)
from tasks.lib.fixes.bootconfig import LOOP_DEVICE as LOOP_DEVICE_NAME
from tasks.lib.paths import RootTreeReader
from tasks.lib.plan import DiskPlan
from tasks.lib.spec import FixPolicy
from tests.fixtures.synthetic import SYNTHETIC_TREES, write_tree
from tests.unit.fix_layouts import completed_plan, fixture_tree, synthetic_layout, tree_layout
from tests.unit.layouts import LAYOUTS, layout

EXPECTED = Path(__file__).parent / "data" / "fixes"
RECORDED = sorted(p.stem for p in LAYOUTS.glob("*.json"))
DHCP = ["centos7", "rhel9-nm", "ubuntu-netplan", "debian12-ifupdown"]
CASES = [*SYNTHETIC_TREES, *RECORDED, *(f"{name}+dhcp" for name in DHCP)]
LOOP_DEVICE = "/dev/loop7"


def build(case: str, root: Path) -> tuple[dict[str, Any], DiskPlan, FixPolicy]:
    name, _, network = case.partition("+")
    policy = FixPolicy(network=network or "keep")
    if name in RECORDED:
        lay = layout(name)
        root.mkdir(parents=True)
        fixture_tree(name, lay, root)
    else:
        lay = synthetic_layout(name, root)
    return lay, completed_plan(lay), policy


def commands(lay: dict[str, Any], plan: DiskPlan, edits: EditPlan) -> dict[str, Any]:
    return {
        "kernel": edits.kernel,
        "kernel_cmdline": list(edits.kernel_cmdline),
        "initrd": initrd_commands(lay, edits.kernel),
        "initrd_check": initrd_check_command(lay, edits.kernel),
        "initrd_must_list": expected_initrd_drivers(lay, edits.kernel),
        "bootloader_install": [asdict(c) for c in bootloader_install_commands(lay, plan, LOOP_DEVICE)],
        "bootloader_config": bootloader_config_commands(lay),
        "findings": [f"{f.step}: {f.message}" for f in edits.findings],
    }


def _regenerate(case: str, edits: EditPlan, got_commands: dict[str, Any]) -> None:
    import shutil

    target = EXPECTED / case
    shutil.rmtree(target, ignore_errors=True)
    for edit in edits.edits:
        if edit.text is not None:
            path = target / "files" / edit.path.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(edit.text)
    target.mkdir(parents=True, exist_ok=True)
    deleted = sorted(e.path for e in edits.edits if e.text is None)
    (target / "deleted").write_text("".join(f"{p}\n" for p in deleted))
    (target / "commands.json").write_text(json.dumps(got_commands, indent=2) + "\n")


@pytest.mark.parametrize("case", CASES)
def test_edits_and_commands_match_the_expected_output(case: str, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    lay, plan, policy = build(case, root)
    edits = plan_edits(RootTreeReader(root), lay, plan, policy)
    got_commands = json.loads(json.dumps(commands(lay, plan, edits)))  # tuples as JSON lists
    if os.environ.get("P2V_REGENERATE_FIXES"):
        _regenerate(case, edits, got_commands)
    expected_dir = EXPECTED / case
    files = expected_dir / "files"
    expected_files = {"/" + str(p.relative_to(files)): p.read_text() for p in sorted(files.rglob("*"))
                      if p.is_file()} if files.is_dir() else {}
    written = {e.path: e.text for e in edits.edits if e.text is not None}
    assert sorted(written) == sorted(expected_files)
    for path, text in written.items():
        assert text == expected_files[path], path
    deleted = sorted(e.path for e in edits.edits if e.text is None)
    assert deleted == (expected_dir / "deleted").read_text().split()
    assert got_commands == json.loads((expected_dir / "commands.json").read_text())
    for edit in edits.edits:
        assert edit.text is None or not LOOP_DEVICE_NAME.search(edit.text), edit.path


@pytest.mark.parametrize("case", CASES)
def test_planning_on_the_fixed_tree_changes_nothing(case: str, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    lay, plan, policy = build(case, root)
    first = plan_edits(RootTreeReader(root), lay, plan, policy)
    assert first.edits
    for edit in first.edits:
        apply_edit(root, edit)
    second = plan_edits(RootTreeReader(root), lay, plan, policy)
    assert second.edits == ()
    assert second.kernel_cmdline == first.kernel_cmdline
    assert second.kernel == first.kernel


# ---------------------------------------------------------------- symlinks that point out of the tree


def _fingerprint(path: Path) -> str:
    """The file's content hash, or (unreadable as this user) its identity and times."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError:
        st = path.stat()
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    except FileNotFoundError:
        return "absent"


HOST_FILES = [Path("/etc/shadow"), Path("/etc/passwd"), Path("/etc/hosts"), Path("/etc/hostname"),
              Path("/etc/fstab"), Path("/etc/default/grub")]


def test_symlinks_out_of_the_tree_change_nothing_outside_it(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "er" / "tree"
    write_tree("centos7", root)
    # The real contents move to the files the links name inside the tree, as on
    # a server whose admin made such links; followed on the host they would be
    # the host's /etc/shadow, /etc/passwd and /etc/hosts.
    for link, target, shown in (
        ("/etc/fstab", "/etc/shadow", "/etc/shadow"),
        ("/etc/sysconfig/network-scripts/ifcfg-eth0", "/etc/passwd", "/etc/passwd"),
        ("/etc/default/grub", "../../../../etc/hosts", "/etc/hosts"),
        ("/etc/udev/rules.d/70-persistent-net.rules", "/etc/hostname", "/etc/hostname"),
    ):
        path = root / link.lstrip("/")
        text = path.read_text()
        path.unlink()
        (root / shown.lstrip("/")).write_text(text)
        path.symlink_to(target)
    (root / "etc/sysconfig/grub").unlink()
    (root / "etc/sysconfig/grub").symlink_to("/etc/default/grub")
    lay = tree_layout("centos7", root)
    before = {p: _fingerprint(p) for p in HOST_FILES}
    outside_before = _tree_snapshot(tmp_path, exclude=root)

    plan = completed_plan(lay)
    edits = plan_edits(RootTreeReader(root), lay, plan, FixPolicy())
    for edit in edits.edits:
        apply_edit(root, edit)

    assert {p: _fingerprint(p) for p in HOST_FILES} == before
    assert _tree_snapshot(tmp_path, exclude=root) == outside_before
    edited = {e.path for e in edits.edits}
    assert {"/etc/fstab", "/etc/sysconfig/network-scripts/ifcfg-eth0", "/etc/default/grub",
            "/etc/udev/rules.d/70-persistent-net.rules"} <= edited
    # the edits landed in the tree's files the links point at; the links are still links
    assert (root / "etc/fstab").is_symlink() and os.readlink(root / "etc/fstab") == "/etc/shadow"
    assert "UUID=00000002-aaaa-4bbb-8ccc-000000000002 /" in (root / "etc/shadow").read_text()
    assert "HWADDR" not in (root / "etc/passwd").read_text()
    assert "console=ttyS0,115200n8" in (root / "etc/hosts").read_text()
    # deleting a link deletes the link, not the file it names
    assert not os.path.lexists(root / "etc/udev/rules.d/70-persistent-net.rules")
    assert (root / "etc/hostname").read_text().startswith("# This file was automatically generated")


def _tree_snapshot(top: Path, exclude: Path) -> dict[str, str]:
    out = {}
    for directory, dirs, names in os.walk(top):
        if Path(directory) == exclude or exclude in Path(directory).parents:
            dirs[:] = []
            continue
        for name in names:
            out[os.path.join(directory, name)] = _fingerprint(Path(directory, name))
    return out


# ---------------------------------------------------------------- grubenv that cannot hold the new kernelopts


def _rhel8_style(root: Path, kernelopts: str) -> None:
    """The rhel9 tree as RHEL 8 has it: entries say `options $kernelopts`, grubenv holds the value."""
    entries = root / "boot" / "loader" / "entries"
    for entry in entries.glob("*.conf"):
        text = entry.read_text()
        entry.write_text(re.sub(r"^options .*$", "options $kernelopts $tuned_params", text, flags=re.MULTILINE))
    head = "# GRUB Environment Block\n"
    body = head + f"saved_entry=x\nkernelopts={kernelopts}\n"
    assert len(body.encode()) <= 1024
    (root / "boot" / "grub2" / "grubenv").write_text(body + "#" * (1024 - len(body.encode())))


def test_a_grubenv_too_small_for_the_new_kernelopts_is_a_finding_and_the_entries_carry_them(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    lay, plan, policy = build("rhel9-nm", root)
    old = "root=/dev/mapper/rhel-root ro crashkernel=auto rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap rhgb quiet"
    # Padding arguments that fill the block so that the longer new value cannot fit.
    filler = " ".join(f"p2v.pad{n}=0123456789abcdef" for n in range(32)) + " p2v.tail=1234567"  # 1020 bytes
    _rhel8_style(root, f"{old} {filler}")
    lay = tree_layout("rhel9-nm", root)
    edits = plan_edits(RootTreeReader(root), lay, plan, policy)
    findings = [f.message for f in edits.findings if f.step == "bootloader-config"]
    assert any("do not fit its 1024-byte block" in m and "grubenv keeps the old value" in m for m in findings), \
        findings
    written = {e.path: e.text for e in edits.edits if e.text is not None}
    assert "/boot/grub2/grubenv" not in written  # the block is left as it was, and the finding says so
    entries = [path for path in written if path.startswith("/boot/loader/entries/")]
    assert entries
    for path in entries:
        options = next(line for line in written[path].splitlines() if line.startswith("options "))
        assert "$kernelopts" not in options
        assert f"root=UUID={plan.filesystem('/').uuid}" in options.split()
        assert not any(word.startswith("rd.lvm.lv=") for word in options.split())
        assert "p2v.pad0=0123456789abcdef" in options.split()
    # What the verify stage expects the kernel to get is what the entries now say.
    assert f"root=UUID={plan.filesystem('/').uuid}" in edits.kernel_cmdline
    for edit in edits.edits:
        apply_edit(root, edit)
    again = plan_edits(RootTreeReader(root), lay, plan, policy)
    assert again.edits == ()


def test_a_grubenv_that_fits_is_rewritten_in_place(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    lay, plan, policy = build("rhel9-nm", root)
    _rhel8_style(root, "root=/dev/mapper/rhel-root ro rd.lvm.lv=rhel/root")
    lay = tree_layout("rhel9-nm", root)
    edits = plan_edits(RootTreeReader(root), lay, plan, policy)
    assert not any("1024-byte block" in f.message for f in edits.findings)
    grubenv = next(e.text for e in edits.edits if e.path == "/boot/grub2/grubenv")
    assert grubenv is not None and len(grubenv.encode()) == 1024
    assert f"kernelopts=root=UUID={plan.filesystem('/').uuid} ro" in grubenv
