"""Report stage: one readable page per host, for the operator who reviews a conversion.

    report:<host>  layout.json + disk-plan.json + the sync, fix and verify receipts  ->  report.md

What the server was, what the disk became, what the copy moved, what each fix
step changed and why, what was checked in the booted image, and every
warning, in that order. Pure rendering (`render_report`), tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.plan import DiskPlan, render_plan, swap_summary
from tasks.lib.spec import Spec
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

INPUTS = (LAYOUT_FILE, PLAN_FILE, "rootfs-synced.stamp", "fixed.stamp", "verified.stamp")


def _mib(value: int) -> str:
    return f"{value / (1 << 20):,.0f} MiB"


def render_report(host: str, layout: Mapping[str, Any], plan: DiskPlan, sync: Mapping[str, Any],
                  fix: Mapping[str, Any], verify: Mapping[str, Any]) -> str:
    system = layout["system"]
    os_info = system.get("os") or {}
    boot = system.get("bootloader") or {}
    lines = [f"# p2v conversion report: {host}", ""]
    lines += [
        "## Source",
        "",
        f"- OS: {os_info.get('pretty_name') or os_info.get('id')} (family {os_info.get('family')})",
        f"- kernels: {', '.join(k['version'] for k in system.get('kernels', []))}",
        f"- bootloader: {boot.get('kind')} ({system.get('bootloader', {}).get('firmware', 'bios')}), "
        f"initrd by {(system.get('initrd') or {}).get('tool')}",
        f"- disks: {len(layout.get('disks', []))}; used: {_mib(int(layout.get('used_bytes', 0)))}",
        f"- mounts: {', '.join(m['mountpoint'] + ' (' + m['fstype'] + ')' for m in layout.get('mounts', []))}",
        *[f"- not shut down cleanly: {fs['device']} ({fs.get('mountpoint') or 'not mounted'}, {fs['type']}); "
          "inspect read it with its journal replayed in a throw-away overlay"
          for fs in layout.get("filesystems", []) if fs.get("needs_recovery")],
        "",
        "## Target disk",
        "",
        "```",
        render_plan(plan).rstrip("\n"),
        "```",
        "",
    ]
    copy = sync.get("copy", {})
    lines += [
        "## Copy",
        "",
        f"- {copy.get('files', '?')} entries, {_mib(int(copy.get('bytes', 0)))}, in {sync.get('seconds', '?')} s; "
        f"manifest of both trees equal (digest `{str(copy.get('manifest_digest', ''))[:16]}`)",
        *[f"- journal replayed: {fs['device']} ({fs['mountpoint']}, {fs['fstype']}) was not shut down cleanly; it "
          "was copied and verified from a throw-away overlay in which the kernel replayed its journal (the source "
          "was not written)" for fs in copy.get("journal_replayed", [])],
        f"- inode flags: {_copied_flags(copy)}",
        *(f"- ESP {point}: {receipt.get('files')} files, {receipt.get('bytes')} bytes, copied by mtools; "
          f"{receipt.get('verified_by')} (digest `{str(receipt.get('digest', ''))[:16]}`)"
          for point, receipt in sorted((copy.get("esp") or {}).items())),
        "",
        "## Fix",
        "",
        f"- kernel {fix.get('kernel')}, command line: `{' '.join(fix.get('kernel_cmdline', []))}`",
        f"- packages: {', '.join(fix.get('installed_packages', [])) or 'none'}",
        f"- swap: {swap_summary(plan)}",
        f"- inode flags set last: {_restored_flags(fix)}",
        "",
        "| step | result | what changed |",
        "|---|---|---|",
    ]
    for step in fix.get("steps", []):
        changes = "<br>".join(_cell(c) for c in step.get("changes", [])) or "-"
        lines.append(f"| {step['name']} | {step['status']} | {changes} |")
    lines += ["", "## Verify", ""]
    if verify.get("skipped"):
        lines.append("- **skipped** (verify: false in the spec): the image was not booted before upload.")
    else:
        machine = verify.get("machine", {})
        firmware = {"uefi": "UEFI (OVMF, empty variable store)", "bios": "BIOS (SeaBIOS)"}.get(
            machine.get("firmware", ""), "firmware not recorded")
        lines.append(f"- booted on machine type {machine.get('machine_type', 'not recorded')} with {firmware} "
                     f"(image property hw_machine_type: {machine.get('hw_machine_type', 'not recorded')})")
        lines.append(f"- {machine.get('disk_bus')} disk + {machine.get('nic_model')} NIC "
                     f"(MAC {machine.get('mac')}), login after {verify.get('seconds_to_login')} s")
        if machine.get("accel"):
            lines.append(f"- accelerator: {machine['accel']} ({machine.get('accel_reason', 'reason not recorded')})")
        lines += ["", "| check | result | output |", "|---|---|---|"]
        for check in verify.get("checks", []):
            result = "ok" if check.get("ok") else f"FAILED: {_cell(check.get('problem') or '')}"
            lines.append(f"| {check['name']} | {result} | {_cell(check.get('output', ''))[:300]} |")
    warnings = [*layout.get("warnings", []), *plan.notes, *copy.get("warnings", []), *fix.get("warnings", [])]
    lines += ["", "## Warnings and notes", ""]
    lines += [f"- {_cell(w)}" for w in warnings] or ["- none"]
    return "\n".join(lines) + "\n"


def _copied_flags(copy: Mapping[str, Any]) -> str:
    flags = copy.get("inode_flags")
    if flags is None:
        return "not recorded (a copy by an older p2v)"
    if not flags.get("entries"):
        return "none on the source"
    kept = ", ".join(f"{letter} on {count}" for letter, count in sorted(flags.get("kept", {}).items())) or "none"
    return (f"{flags['entries']} source entries have some; on the target: {kept}; "
            f"{len(flags.get('pending', []))} immutable/append-only left to the fix stage; "
            f"{len(flags.get('dropped', []))} the target filesystem does not keep (see the warnings)")


def _restored_flags(fix: Mapping[str, Any]) -> str:
    restored = fix.get("inode_flags", {}).get("restored")
    if restored is None:
        return "not recorded (a fix by an older p2v)"
    if not restored:
        return "none (no immutable or append-only entry on the source)"
    shown = ", ".join(f"{row['path']} ({row['flags']})" for row in restored[:10])
    count = f"{len(restored)} entr{'y' if len(restored) == 1 else 'ies'}"
    return f"{count}, read back: {shown}" + (f" and {len(restored) - 10} more" if len(restored) > 10 else "")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def report_host(run: StageRun) -> None:
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    text = render_report(run.spec.host, layout, plan, _read_json(run.input("rootfs-synced.stamp")),
                         _read_json(run.input("fixed.stamp")), _read_json(run.input("verified.stamp")))
    run.partial.write_text(text)
    print(f"{run.spec.host}: report in {run.spec.artifact('report.md')}")


def _config(spec: Spec) -> dict[str, object]:
    return {"report_version": 1}


STAGE = Stage(
    name="report",
    doc="a readable per-host summary of what changed and what was checked -> report.md",
    target="report.md",
    inputs=INPUTS,
    run=report_host,
    config=_config,
)
