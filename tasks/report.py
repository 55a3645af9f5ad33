"""Report stage: one readable page per host, for the operator who reviews a conversion.

    report:<host>  layout.json + disk-plan.json + the sync, fix and verify receipts  ->  report.md

What the server was, what the disk became, what the copy moved, what each fix
step changed and why, what was checked in the booted image, and every
warning, in that order. Pure: `plan_page` decides every line from the receipts
(frozen dataclasses of plain words), and the jinja2 template tasks/templates/report.md.j2
lays them out as Markdown; `render_report` does both. Tested on its own, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lib import templating
from tasks.lib.outputs import load_fix_stamp, load_sync_stamp, load_verify_stamp
from tasks.lib.pipeline import Stage, StageRun
from tasks.lib.planning.model import DiskPlan
from tasks.lib.planning.render import render_plan, swap_summary
from tasks.lib.spec import Spec
from tasks.plan import LAYOUT_FILE, PLAN_FILE, read_disk_plan, read_layout

INPUTS = (LAYOUT_FILE, PLAN_FILE, "rootfs-synced.stamp", "fixed.stamp", "verified.stamp")


TEMPLATES = Path(__file__).parent / "templates"


def _mib(value: int) -> str:
    return f"{value / (1 << 20):,.0f} MiB"


# ---------------------------------------------------------------- what the page says (pure data)


@dataclass(frozen=True)
class StepRow:
    """One fix step: its receipt's name, status and changes, as the fix stage recorded them."""

    name: str
    status: str
    changes: tuple[str, ...]


@dataclass(frozen=True)
class CheckRow:
    """One check run in the booted image: `result` is "ok" or "FAILED: " and the judge's problem."""

    name: str
    result: str
    output: str


@dataclass(frozen=True)
class VerifySection:
    """What verify did: `booted` only when the image was booted (then its checks follow the facts)."""

    booted: bool
    facts: tuple[str, ...]
    checks: tuple[CheckRow, ...] = ()


@dataclass(frozen=True)
class ReportPage:
    """Every line of report.md, in words; tasks/templates/report.md.j2 lays it out as Markdown."""

    host: str
    source: tuple[str, ...]
    target_disk: str
    copy: tuple[str, ...]
    fix: tuple[str, ...]
    steps: tuple[StepRow, ...]
    verify: VerifySection
    warnings: tuple[str, ...]


def plan_page(host: str, layout: Mapping[str, Any], plan: DiskPlan, sync: Mapping[str, Any],
              fix: Mapping[str, Any], verify: Mapping[str, Any]) -> ReportPage:
    """What the report says, from the receipts: each line claims only what a receipt records."""
    copy = sync.get("copy", {})
    return ReportPage(
        host=host,
        source=_source_lines(layout),
        target_disk=render_plan(plan).rstrip("\n"),
        copy=_copy_lines(sync),
        fix=(
            (f"kernel {fix['kernel']}" if fix.get("kernel") else "kernel: not recorded in the fix receipt")
            + f", command line: `{' '.join(fix.get('kernel_cmdline', []))}`",
            f"packages: {', '.join(fix.get('installed_packages', [])) or 'none'}",
            f"swap: {swap_summary(plan)}",
            f"inode flags set last: {_restored_flags(fix)}",
        ),
        steps=tuple(StepRow(name=step["name"], status=step["status"], changes=tuple(step.get("changes", [])))
                    for step in fix.get("steps", [])),
        verify=_verify_section(verify),
        warnings=(*layout.get("warnings", []), *plan.notes, *copy.get("warnings", []), *fix.get("warnings", [])),
    )


def _source_lines(layout: Mapping[str, Any]) -> tuple[str, ...]:
    system = layout["system"]
    os_info = system.get("os") or {}
    boot = system.get("bootloader") or {}
    return (
        f"OS: {os_info.get('pretty_name') or os_info.get('id')} (family {os_info.get('family')})",
        f"kernels: {', '.join(k['version'] for k in system.get('kernels', []))}",
        f"bootloader: {boot.get('kind')} ({system.get('bootloader', {}).get('firmware', 'bios')}), "
        f"initrd by {(system.get('initrd') or {}).get('tool')}",
        f"disks: {len(layout.get('disks', []))}; used: {_mib(int(layout.get('used_bytes', 0)))}",
        f"mounts: {', '.join(m['mountpoint'] + ' (' + m['fstype'] + ')' for m in layout.get('mounts', []))}",
        *(f"not shut down cleanly: {fs['device']} ({fs.get('mountpoint') or 'not mounted'}, {fs['type']}); "
          "inspect read it with its journal replayed in a throw-away overlay"
          for fs in layout.get("filesystems", []) if fs.get("needs_recovery")),
    )


def _copy_lines(sync: Mapping[str, Any]) -> tuple[str, ...]:
    copy = sync.get("copy", {})
    return (
        f"{copy.get('files', '?')} entries, {_mib(int(copy.get('bytes', 0)))}, in {sync.get('seconds', '?')} s; "
        + (f"manifest of both trees equal (digest `{str(copy['manifest_digest'])[:16]}`)"
           if copy.get("manifest_digest") else
           "the sync receipt records no manifest digest, so this report cannot say the trees were compared"),
        *(f"journal replayed: {fs['device']} ({fs['mountpoint']}, {fs['fstype']}) was not shut down cleanly; it "
          "was copied and verified from a throw-away overlay in which the kernel replayed its journal (the source "
          "was not written)" for fs in copy.get("journal_replayed", [])),
        *(_method_line(row) for row in copy.get("methods", [])),
        f"inode flags: {_copied_flags(copy)}",
        *(f"ESP {point}: {receipt.get('files')} files, {receipt.get('bytes')} bytes, copied by mtools; "
          f"{receipt.get('verified_by')} (digest `{str(receipt.get('digest', ''))[:16]}`)"
          for point, receipt in sorted((copy.get("esp") or {}).items())),
    )


def _method_line(row: Mapping[str, Any]) -> str:
    """How one source filesystem was copied, from the sync receipt (what was done, not what was planned)."""
    if row["method"] != "blocks":
        return f"{row['mountpoint']}: copied by files ({row['why']})"
    resized = {"grow": "grown to its partition", "shrink in place": "shrunk to its partition in place",
               "shrink in a scratch copy": "shrunk to its partition in a scratch copy"}.get(
                   str(row.get("resize")), f"resized ({row.get('resize')})")
    earlier = " (in an earlier run into this disk.img, then brought up to date by rsync)" \
        if row.get("earlier") else ""
    return (f"{row['mountpoint']}: copied by blocks{earlier}: {row.get('tool')} wrote "
            f"{_mib(int(row.get('bytes_written', 0)))} of used blocks, {resized}; "
            f"{row.get('removed_after', 0)} entries a file copy leaves behind removed (excluded contents, swap files, "
            f"what lay under other filesystems' mount points){_released(row)}")


def _released(row: Mapping[str, Any]) -> str:
    """What discarding the block copy's free blocks gave back (receipts before it have neither field)."""
    if row.get("trim_failed"):
        return (f"; its free blocks stay allocated in disk.img: fstrim failed ({row['trim_failed']}), "
                "the work area may not punch holes")
    if "released" in row:
        return f"; free blocks discarded (fstrim): disk.img gave back {_mib(int(row['released']))}"
    return ""


def _verify_section(verify: Mapping[str, Any]) -> VerifySection:
    if verify.get("skipped"):
        return VerifySection(booted=False, facts=(
            "**skipped** (verify: false in the spec): the image was not booted before upload.",))
    machine = verify.get("machine", {})
    firmware = {"uefi": "UEFI (OVMF, empty variable store)", "bios": "BIOS (SeaBIOS)"}.get(
        machine.get("firmware", ""), "firmware not recorded")
    facts = [f"booted on machine type {machine.get('machine_type', 'not recorded')} with {firmware} "
             f"(image property hw_machine_type: {machine.get('hw_machine_type', 'not recorded')})",
             f"{machine.get('disk_bus')} disk + {machine.get('nic_model')} NIC "
             f"(MAC {machine.get('mac')}), login after {verify.get('seconds_to_login')} s"]
    if machine.get("accel"):
        facts.append(f"accelerator: {machine['accel']} ({machine.get('accel_reason', 'reason not recorded')})")
    checks = tuple(CheckRow(name=check["name"],
                            result="ok" if check.get("ok") else f"FAILED: {check.get('problem') or ''}",
                            output=str(check.get("output", "")))
                   for check in verify.get("checks", []))
    return VerifySection(booted=True, facts=tuple(facts), checks=checks)


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


def _cell(text: object, limit: int | None = None) -> str:
    """Text as one Markdown table cell (or list item): no pipe ends it, no newline breaks it."""
    escaped = str(text).replace("|", "\\|").replace("\n", "<br>")
    return escaped if limit is None else escaped[:limit]


# ---------------------------------------------------------------- the page, laid out


def render_report(host: str, layout: Mapping[str, Any], plan: DiskPlan, sync: Mapping[str, Any],
                  fix: Mapping[str, Any], verify: Mapping[str, Any]) -> str:
    page = plan_page(host, layout, plan, sync, fix, verify)
    env = templating.environment(TEMPLATES, filters={"cell": _cell})
    return env.get_template("report.md.j2").render(page=page)


def report_host(run: StageRun) -> None:
    layout = read_layout(run.input(LAYOUT_FILE))
    plan = read_disk_plan(run.input(PLAN_FILE))
    text = render_report(run.spec.host, layout, plan, load_sync_stamp(run.spec), load_fix_stamp(run.spec),
                         load_verify_stamp(run.spec))
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
