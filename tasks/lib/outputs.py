"""Stage outputs: the files one stage writes and later stages read, each checked against its schema.

    file                 written by  read by                        schema (tasks/schemas/)   typed as
    layout.json          inspect     every later stage              layout.schema.json        Layout
    disk-plan.json       disk        sync fix verify report upload  disk-plan.schema.json     DiskPlan
    rootfs-synced.stamp  sync        fix report                     sync-stamp.schema.json    SyncStamp
    fixed.stamp          fix         report upload                  fix-stamp.schema.json     FixStamp
    verified.stamp       verify      report                         verify-stamp.schema.json  VerifyStamp
    uploaded.stamp       upload      the operator                   upload-stamp.schema.json  UploadStamp

`load_<thing>(spec)` reads a host's file and `write_<thing>(path, data)` writes
one (a stage writes its target at `StageRun.partial`; the pipeline renames it).
`read(output, path)` is the by-path form (tasks/plan.py's `read_layout` and
`read_disk_plan` use it); the hint then names the host the file records.
Both check the document against its schema (JSON Schema draft 2020-12), so:

- a writer that strays from its schema fails the stage that has the bug, and
  nothing is written;
- a file from another p2v version, or edited by hand, is refused by the stage
  that reads it, in one line: the file, the field and what was expected, with
  the stage to rerun as the hint. A format version other than this p2v's says
  so before any field is looked at.

After a load the reader can rely on the shape: a field the schema requires is
there with its type, so no reader guesses. The stamps are typed as TypedDicts
(they are plain JSON, and the report renders them as mappings); the layout
stays a mapping (its schema is its type); the plan is the `DiskPlan` dataclass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from tasks.lib.paths import write_file_atomically
from tasks.lib.planning.model import DiskPlan
from tasks.lib.runner import P2VError
from tasks.lib.spec import PROJECT_DIR, Spec, SpecError, validate

SCHEMA_DIR = PROJECT_DIR / "tasks" / "schemas"


@dataclass(frozen=True)
class Output:
    """One stage output: its file in the host's workdir, the stage that writes it, its schema."""

    file: str
    stage: str
    schema: str  # file name in tasks/schemas; its `format` and `version` consts are the current ones

    @property
    def schema_path(self) -> Path:
        return SCHEMA_DIR / self.schema

    @property
    def format(self) -> str:
        return str(_schema_const(self.schema_path, "format"))

    @property
    def version(self) -> int:
        return int(_schema_const(self.schema_path, "version"))


LAYOUT = Output("layout.json", "inspect", "layout.schema.json")
DISK_PLAN = Output("disk-plan.json", "disk", "disk-plan.schema.json")
SYNC_STAMP = Output("rootfs-synced.stamp", "sync", "sync-stamp.schema.json")
FIX_STAMP = Output("fixed.stamp", "fix", "fix-stamp.schema.json")
VERIFY_STAMP = Output("verified.stamp", "verify", "verify-stamp.schema.json")
UPLOAD_STAMP = Output("uploaded.stamp", "upload", "upload-stamp.schema.json")
OUTPUTS = (LAYOUT, DISK_PLAN, SYNC_STAMP, FIX_STAMP, VERIFY_STAMP, UPLOAD_STAMP)


@cache
def _schema_const(path: Path, key: str) -> Any:
    return json.loads(path.read_text())["properties"][key]["const"]


# ---------------------------------------------------------------- the typed shapes (what the schemas say)

Layout = dict[str, Any]


class FlagRow(TypedDict):
    path: str
    flags: str  # inode flag letters, as lsattr shows them


class DroppedFlagRow(TypedDict):
    path: str
    flags: str
    reason: str


class InodeFlagsReceipt(TypedDict):
    entries: int
    kept: dict[str, int]
    pending: list[FlagRow]  # i and a: left for the fix stage to set
    dropped: list[DroppedFlagRow]


class ReplayedFilesystem(TypedDict):
    device: str
    mountpoint: str
    fstype: str
    reason: str


class EspReceipt(TypedDict):
    files: int
    bytes: int
    entries: int
    digest: str
    changed_entries: int
    verified: bool
    verified_by: str


class CopyReceipt(TypedDict):
    format: str
    version: int
    method: str
    started: str
    duration_seconds: float
    copy_seconds: float
    verify_seconds: float
    files: int | None
    regular_files: int | None
    bytes: int | None
    bytes_transferred: int | None
    verified: bool
    verified_by: str | None
    fast_path: bool
    seal: str
    manifest_digest: str | None
    tools: dict[str, str]
    excluded_contents: list[str]
    swap_files_skipped: list[str]
    atimes: str
    inode_flags: InodeFlagsReceipt
    warnings: list[str]
    filesystems: list[dict[str, Any]]  # one pass per filesystem (copy.PassResult)
    journal_replayed: list[ReplayedFilesystem]
    esp: NotRequired[dict[str, EspReceipt]]  # by mountpoint; only when the source has an ESP


class SyncStamp(TypedDict):
    format: str
    version: int
    host: str
    seconds: float
    copy: CopyReceipt


class StepReceipt(TypedDict):
    name: str
    status: str  # changed | unchanged | skipped
    changes: list[str]
    warnings: list[str]
    commands: list[str]


class RestoredFlags(TypedDict):
    restored: list[FlagRow]


class FixStamp(TypedDict):
    format: str
    version: int
    host: str
    seconds: float
    kernel: str
    kernel_cmdline: list[str]
    installed_packages: list[str]
    inode_flags: RestoredFlags
    steps: list[StepReceipt]
    warnings: list[str]
    sync_receipt_sha256: str


class VerifyStamp(TypedDict):
    format: str
    version: int
    host: str
    skipped: bool
    checks: list[dict[str, Any]]
    # Only when the image was booted (skipped is false):
    seconds: NotRequired[float]
    seconds_to_login: NotRequired[float]
    machine: NotRequired[dict[str, Any]]
    serial_log: NotRequired[str]


class UploadStamp(TypedDict):
    format: str
    version: int
    host: str
    image: dict[str, Any]  # Glance's fields, as it answered
    properties: dict[str, str]
    file: dict[str, Any]
    reused: bool
    seconds: float
    endpoint: str
    credentials: dict[str, Any]  # what may be shown: no secret
    shutdown: str


# ---------------------------------------------------------------- checking


class OutputError(P2VError):
    """A stage output that is missing, not JSON, of another version, or not what its schema says."""


def _rerun(output: Output, path: Path, host: str | None) -> str:
    task = f"{output.stage}:{host or '<host>'}"
    return f"remove {path.name} and run {task} again: it writes the file anew"


def check(output: Output, data: Any, path: Path, host: str | None = None) -> None:
    """Refuse a document that is not `output` as this p2v writes it, in one line (OutputError)."""
    if isinstance(data, dict) and data.get("format") == output.format and data.get("version", output.version) != \
            output.version:
        raise OutputError(f"{path} was written by another p2v ({output.format} version {data.get('version')!r}; "
                          f"this p2v reads version {output.version})", hint=_rerun(output, path, host))
    try:
        validate(data, output.schema_path, os.fspath(path))
    except SpecError as error:
        raise OutputError(f"{error} (schema {output.schema})", hint=_rerun(output, path, host)) from None


def read(output: Output, path: Path, host: str | None = None) -> Any:
    """The document at `path`, checked; `host` names the task to rerun in the hint (else the file's own)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OutputError(f"{path} does not exist", hint=f"run {output.stage}:{host or '<host>'} first") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise OutputError(f"{path} is not valid JSON: {error}", hint=_rerun(output, path, host)) from None
    if host is None and isinstance(data, dict) and isinstance(data.get("host"), str):
        host = data["host"]
    check(output, data, path, host)
    return data


def write(output: Output, path: Path, data: Mapping[str, Any], *, ensure_ascii: bool = True) -> None:
    """Check `data`, then write it to `path` (the stage's partial target), as the stage always wrote it."""
    document = dict(data)
    try:
        check(output, document, path)
    except OutputError as error:
        raise P2VError(f"{output.stage} made a {output.file} that its schema refuses: {error.args[0]}",
                       hint="this is a bug in p2v; the file was not written (the stage's log has the details)"
                       ) from None
    path.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=ensure_ascii) + "\n")


# ---------------------------------------------------------------- each output


def load_layout(spec: Spec) -> Layout:
    data: Layout = read(LAYOUT, spec.artifact(LAYOUT.file), spec.host)
    return data


def write_layout(path: Path, layout: Mapping[str, Any]) -> None:
    write(LAYOUT, path, layout, ensure_ascii=False)


def load_disk_plan(spec: Spec) -> DiskPlan:
    return read_disk_plan(spec.artifact(DISK_PLAN.file), spec.host)


def read_disk_plan(path: Path, host: str | None = None) -> DiskPlan:
    return DiskPlan.from_json(read(DISK_PLAN, path, host))


def write_disk_plan(path: Path, plan: DiskPlan) -> None:
    """Checked, then written atomically (fsync, rename): disk-plan.json is not the disk stage's target."""
    document = plan.to_json()
    try:
        check(DISK_PLAN, document, path)
    except OutputError as error:
        raise P2VError(f"disk made a {DISK_PLAN.file} that its schema refuses: {error.args[0]}",
                       hint="this is a bug in p2v; the file was not written") from None
    write_json_atomically(path, document)


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as canonical JSON, written atomically and durably (paths.write_file_atomically)."""
    write_file_atomically(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def load_sync_stamp(spec: Spec) -> SyncStamp:
    return cast(SyncStamp, read(SYNC_STAMP, spec.artifact(SYNC_STAMP.file), spec.host))


def write_sync_stamp(path: Path, stamp: SyncStamp) -> None:
    write(SYNC_STAMP, path, stamp)


def load_fix_stamp(spec: Spec) -> FixStamp:
    return cast(FixStamp, read(FIX_STAMP, spec.artifact(FIX_STAMP.file), spec.host))


def write_fix_stamp(path: Path, stamp: FixStamp) -> None:
    write(FIX_STAMP, path, stamp)


def load_verify_stamp(spec: Spec) -> VerifyStamp:
    return cast(VerifyStamp, read(VERIFY_STAMP, spec.artifact(VERIFY_STAMP.file), spec.host))


def write_verify_stamp(path: Path, stamp: VerifyStamp) -> None:
    write(VERIFY_STAMP, path, stamp)


def load_upload_stamp(spec: Spec) -> UploadStamp:
    return cast(UploadStamp, read(UPLOAD_STAMP, spec.artifact(UPLOAD_STAMP.file), spec.host))


def write_upload_stamp(path: Path, stamp: UploadStamp) -> None:
    write(UPLOAD_STAMP, path, stamp)
