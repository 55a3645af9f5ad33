"""The target's /etc/fstab: exactly what the disk plan decided, line by line.

Each source line has a `FstabChange` in the completed plan (keyed by its
line number): `replace` gets the new spec, type, options and pass number,
`remove` becomes a comment that says why (so the line numbers, which the plan
refers to, stay the same and a second run finds every line where the plan
says it is), `keep` stays as written (network, bind, `nofail` entries).
Comments and every other line are kept as they are, and so is the column
layout where the new values fit.
"""

from __future__ import annotations

import dataclasses

from tasks.lib.fixes.model import Changes, TreeReader
from tasks.lib.formats.fstab import parse_fstab, rewrite_fields, source_kind
from tasks.lib.planning.model import DiskPlan, FstabChange

FSTAB = "/etc/fstab"
REMOVED_MARK = "# p2v removed"


def _changed_line(line: str, change: FstabChange) -> str:
    if change.action == "remove":
        return f"{REMOVED_MARK} ({change.reason}): {line.strip()}"
    assert change.new_spec is not None and change.new_vfstype is not None
    values = {0: change.new_spec, 2: change.new_vfstype, 3: ",".join(change.new_options) or "defaults"}
    if change.new_passno is not None:
        values[5] = str(change.new_passno)
    return rewrite_fields(line, values)


def _entry_file(line: str) -> str | None:
    entries, _ = parse_fstab(line)
    return entries[0].file if entries else None


def _is_swap_file(spec: str, vfstype: str) -> bool:
    kind, value = source_kind(spec)
    return vfstype == "swap" and kind == "path" and value.startswith("/") and not value.startswith("/dev/")


def rewrite_fstab(text: str, plan: DiskPlan) -> tuple[str, list[str]]:
    """(the new fstab, warnings) for the completed `plan`."""
    if not plan.complete:
        raise ValueError("the fstab is rewritten from a completed disk plan (with its UUIDs)")
    lines = text.splitlines()
    warnings: list[str] = []
    for change in plan.fstab:
        index = change.line - 1
        if change.action == "keep":
            # A swap file is not copied (sync leaves swap files out), so its line would fail at boot.
            if _is_swap_file(change.spec, change.vfstype) and (plan.swap_file is None
                                                                or plan.swap_file.path != change.spec):
                change = dataclasses.replace(change, action="remove", reason="swap file, not copied")
            else:
                continue
        if index >= len(lines) or lines[index].lstrip().startswith(REMOVED_MARK):
            continue  # removed by an earlier run
        line = lines[index]
        if _entry_file(line) != change.file:
            warnings.append(f"fstab line {change.line} is no longer the {change.file} entry the plan was made "
                            f"for; left as it is: {line.strip()!r}")
            continue
        lines[index] = _changed_line(line, change)
    swap_file = plan.swap_file
    if swap_file is not None:
        entries, _ = parse_fstab("\n".join(lines))
        if not any(e.spec == swap_file.path for e in entries):
            lines.append(f"{swap_file.path} none swap sw 0 0")
    return "\n".join(lines) + "\n", warnings


def fix_fstab(tree: TreeReader, plan: DiskPlan) -> Changes:
    changes = Changes(tree, "fstab")
    text = tree.read(FSTAB)
    if text is None:
        changes.note("/etc/fstab is missing on the target; nothing to rewrite")
        return changes
    new, warnings = rewrite_fstab(text, plan)
    for warning in warnings:
        changes.note(warning)
    changes.write(FSTAB, new, fstab_why(plan))
    return changes


def fstab_why(plan: DiskPlan) -> str:
    """What the rewrite does, as the plan says it (for the receipt)."""
    said = ["new UUIDs"]
    merged = [c.file for c in plan.fstab if c.action == "remove" and c.vfstype != "swap"]
    if merged:
        said.append(f"merged mounts removed ({', '.join(merged)})")
    swaps = [c for c in plan.fstab if c.vfstype == "swap" and c.action != "keep"]
    if any(c.action == "remove" for c in swaps):
        said.append("source swap lines removed: " + "; ".join(f"{c.spec} ({c.reason})" for c in swaps
                                                             if c.action == "remove"))
    said += [f"swap on {c.new_spec} ({c.reason})" for c in swaps if c.action == "replace"]
    if plan.swap_file is not None and not any(c.new_spec == plan.swap_file.path for c in swaps):
        said.append(f"swap on {plan.swap_file.path} (added)")
    return "; ".join(said)
