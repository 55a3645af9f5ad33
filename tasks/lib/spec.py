"""Host specs: one YAML file per server, validated once, here, at the edge.

Everything after `load_specs` works with frozen `Spec` objects whose defaults
are filled in and whose paths are absolute; nothing downstream re-checks.
Every error is one line: `<file>: <field path>: <what was expected>`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tasks.lib.resources import host_run_dir
from tasks.lib.runner import P2VError

PROJECT_DIR = Path(__file__).resolve().parents[2]
SCHEMA_PATH = PROJECT_DIR / "tasks" / "schemas" / "spec.schema.json"

# Set by the live runner (live/runner.py): the server's disks for source.disks, in order.
LIVE_DISKS_ENV = "P2V_LIVE_DISKS"

# One DNS label, lower case: host names become directory names and doit task
# names (`inspect:<host>`), so no dots, colons, slashes or upper case.
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class SpecError(P2VError):
    def __init__(self, file: str | os.PathLike[str], field_path: str, message: str):
        self.file = os.fspath(file)
        self.field_path = field_path
        where = f"{self.file}: {field_path}" if field_path else self.file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Source:
    devices: tuple[str, ...] = ()
    images: tuple[Path, ...] = ()
    root: str | None = None
    # PXE live path: ("auto",) or stable disk names (by-id, serial:, wwn:),
    # resolved to device nodes only by the live system on the server.
    live_disks: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        return bool(self.devices)

    @property
    def pxe(self) -> bool:
        return bool(self.live_disks)

    @property
    def disks(self) -> tuple[str, ...]:
        if self.pxe and not self.devices:
            raise P2VError("the source's disks (source.disks) are the server's own: they are reachable only "
                           "from the live system on the server",
                           hint="PXE-boot the server (`doit pxe` renders its boot files); "
                                "stages that read the source run there")
        return self.devices or tuple(str(p) for p in self.images)

    @property
    def identity(self) -> tuple[str, ...]:
        """What names the source in doit's state: the same on the infra side and in the live system."""
        return self.live_disks or self.disks


@dataclass(frozen=True)
class LivePolicy:
    """The PXE live path (see tasks/pxe.py and live/)."""

    mac: str | None = None  # lower case, colon-separated
    address: str | None = None
    debug: bool = False
    last_stage: str = "upload"


@dataclass(frozen=True)
class TargetPolicy:
    layout: str = "flatten"
    root_fs: str = "auto"
    label: str = "auto"  # msdos for a BIOS server, gpt for a UEFI one (tasks/lib/planning/layout.py)
    swap: str = "source"
    size: str = "auto"
    headroom_percent: int = 20
    min_headroom: str = "1G"
    keep_uuids: bool = False
    copy: str = "auto"  # how sync fills each target filesystem: tasks/lib/planning/copy_method.py
    format: str = "raw"
    compress: bool = False


@dataclass(frozen=True)
class CloudInitPolicy:
    install: bool = True
    source: str = "distro"
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class FixPolicy:
    network: str = "keep"
    cloud_init: CloudInitPolicy = field(default_factory=CloudInitPolicy)
    remove_services: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()  # fix steps not to run (diagnosis)


@dataclass(frozen=True)
class GlancePolicy:
    cloud: str | None = None
    image_name: str | None = None
    visibility: str = "private"
    properties: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    host: str
    path: Path
    file: str  # the spec file as shown in messages: specs/<host>.yaml
    source: Source
    workdir: Path
    target: TargetPolicy
    fix: FixPolicy
    glance: GlancePolicy
    verify: bool = True
    shutdown: bool = True
    description: str = ""
    live: LivePolicy = field(default_factory=LivePolicy)

    @property
    def state_dir(self) -> Path:
        """doit's dependency state for this host lives with its work."""
        return self.workdir / ".p2v"

    @property
    def run_dir(self) -> Path:
        """Where this host's scratch mounts go (under /run/p2v): released after a killed run."""
        return host_run_dir(self.host, self.workdir)

    @property
    def scratch_dir(self) -> Path:
        """Throw-away files of a run on the work area (a journal replay's overlay): emptied after a killed run."""
        return self.state_dir / "scratch"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def artifact(self, name: str) -> Path:
        return self.workdir / name


@cache
def _schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def validate(data: Any, schema_path: Path, shown: str) -> None:
    """Check a document against its schema; the first error, as one SpecError line."""
    validator = jsonschema.Draft202012Validator(_schema(schema_path))
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        field_path, message = _describe(errors[0])
        raise SpecError(shown, field_path, message)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: str, mark: yaml.Mark):
        super().__init__(None, None, f"duplicate key {key!r}", mark)
        self.key = key


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKeyError(str(key), key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _field_path(path: Any) -> str:
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts)


def _describe(error: jsonschema.ValidationError) -> tuple[str, str]:
    """Turn a jsonschema error into (field path, one-line expectation)."""
    path = _field_path(error.absolute_path)
    kind = error.validator
    value: Any = error.validator_value
    instance: Any = error.instance
    schema: Any = error.schema
    if kind == "additionalProperties":
        extras = sorted(set(instance) - set(schema.get("properties", {})))
        allowed = ", ".join(sorted(schema.get("properties", {})))
        key = extras[0] if extras else "?"
        return _join(path, key), f"unknown key (allowed here: {allowed})"
    if kind == "required":
        missing = [k for k in value if k not in instance]
        return _join(path, missing[0] if missing else "?"), "required field is missing"
    if kind == "type":
        expected = " or ".join(value) if isinstance(value, list) else value
        return path, f"expected {expected}, got {type(error.instance).__name__} {error.instance!r}"
    if kind == "enum":
        return path, f"expected one of {', '.join(map(repr, value))}, got {error.instance!r}"
    if kind == "pattern":
        return path, f"{error.instance!r} does not match the expected form {value}"
    if kind in ("minItems", "minLength"):
        return path, "must not be empty"
    if kind == "uniqueItems":
        return path, "lists the same item twice"
    if kind in ("minimum", "maximum"):
        return path, f"{error.instance!r} is out of range ({kind} {value})"
    return path, error.message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def read_yaml(path: Path, shown: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(shown, "", f"cannot read: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise SpecError(shown, exc.key, f"duplicate key {exc.key!r} (line {line}); YAML keeps only one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(shown, "", f"YAML does not parse: {where}{problem}") from None


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(path_text)
    return path if path.is_absolute() else (base / path)


def _check_source(file: Path, source: Mapping[str, Any], base: Path) -> Source:
    devices = source.get("devices", [])
    images = source.get("images", [])
    live_disks = source.get("disks", [])
    if sum(bool(kind) for kind in (devices, images, live_disks)) != 1:
        raise SpecError(file, "source", "expected exactly one of source.devices (disks this machine sees), "
                        "source.images (offline) or source.disks (PXE live path)")
    if live_disks:
        names = ("auto",) if live_disks == "auto" else tuple(live_disks)
        # In the live system, its runner has resolved the names to this boot's
        # device nodes (tasks/lib/livehost.py); elsewhere they stay names.
        nodes = tuple(filter(None, os.environ.get(LIVE_DISKS_ENV, "").split(",")))
        for node in nodes:
            if not os.path.exists(node) or not stat.S_ISBLK(os.stat(node).st_mode):
                raise SpecError(file, "source.disks", f"{node} ({LIVE_DISKS_ENV}) is not a block device")
        return Source(live_disks=names, devices=nodes, root=source.get("root"))
    for index, device in enumerate(devices):
        try:
            mode = os.stat(device).st_mode
        except FileNotFoundError:
            raise SpecError(file, f"source.devices[{index}]", f"{device} does not exist") from None
        if not stat.S_ISBLK(mode):
            raise SpecError(file, f"source.devices[{index}]", f"{device} is not a block device")
    resolved: list[Path] = []
    for index, image in enumerate(images):
        image_path = _resolve(image, base)
        if not image_path.exists():
            raise SpecError(file, f"source.images[{index}]", f"{image_path} does not exist")
        if not image_path.is_file():
            raise SpecError(file, f"source.images[{index}]", f"{image_path} is not a regular file")
        resolved.append(image_path.resolve())
    if len(set(resolved)) != len(resolved):
        raise SpecError(file, "source.images", "the same image file is listed twice")
    return Source(devices=tuple(devices), images=tuple(resolved), root=source.get("root"))


def parse_spec(path: Path, base: Path = PROJECT_DIR) -> Spec:
    """Load and validate one spec file; raise SpecError naming file and field."""
    host = path.name.rsplit(".", 1)[0]
    shown = shown_path(path, base)
    if not HOST_NAME.match(host):
        raise SpecError(
            shown, "(file name)",
            f"host name {host!r} must be one lower-case DNS label: a-z, 0-9 and '-', at most 63 characters",
        )
    data = read_yaml(path, shown)
    if data is None:
        data = {}
    validate(data, SCHEMA_PATH, shown)
    source = _check_source(Path(shown), data["source"], base)
    target = data.get("target", {})
    if target.get("compress") and target.get("format", "raw") != "qcow2":
        raise SpecError(shown, "target.compress", "compression needs target.format: qcow2")
    fix = data.get("fix", {})
    cloud_init = fix.get("cloud_init", {})
    glance = data.get("glance", {})
    workdir = _resolve(data.get("workdir", _default_workdir(host, source, base)), base)
    return Spec(
        host=host,
        path=path.resolve(),
        file=shown,
        source=source,
        workdir=workdir.absolute(),
        target=TargetPolicy(**target),
        fix=FixPolicy(
            network=fix.get("network", "keep"),
            cloud_init=CloudInitPolicy(
                install=cloud_init.get("install", True),
                source=_package_source(path, shown, cloud_init.get("source", "distro"), base),
                packages=tuple(cloud_init.get("packages", ())),
            ),
            remove_services=tuple(fix.get("remove_services", ())),
            skip=tuple(fix.get("skip", ())),
        ),
        glance=GlancePolicy(
            cloud=glance.get("cloud"),
            image_name=glance.get("image_name"),
            visibility=glance.get("visibility", "private"),
            properties=tuple(sorted((k, str(v)) for k, v in glance.get("properties", {}).items())),
            tags=tuple(glance.get("tags", ())),
        ),
        verify=data.get("verify", True),
        shutdown=data.get("live", {}).get("shutdown", True),
        description=data.get("description", ""),
        live=_check_live(shown, data.get("live", {}), source),
    )


def _default_workdir(host: str, source: Source, base: Path) -> str:
    """work/<host>; for a PXE-booted server, its directory in the site's NFS work area,
    which its live system mounts at the same path."""
    if not source.pxe:
        return f"work/{host}"
    from tasks.lib.site import load_site  # the site matters to PXE hosts alone

    return str(load_site(base=base).host_work_dir(host))


def _check_live(shown: str, live: Mapping[str, Any], source: Source) -> LivePolicy:
    if source.pxe:
        for key in ("mac", "address"):
            if key not in live:
                raise SpecError(shown, f"live.{key}", "required for a PXE-booted server (source.disks)")
    address = live.get("address")
    if address is not None:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise SpecError(shown, "live.address", f"{address!r} is not an IPv4 address") from None
    mac = live.get("mac")
    return LivePolicy(mac=mac.lower() if mac else None, address=address, debug=live.get("debug", False),
                      last_stage=live.get("last_stage", "upload"))


def _package_source(file: Path, shown: str, text: str, base: Path) -> str:
    """`distro`, a mirror URL, or a directory of packages (made absolute, and it must exist)."""
    if text == "distro" or text.startswith(("http://", "https://")):
        return text
    directory = _resolve(text, base)
    if not directory.is_dir():
        raise SpecError(shown, "fix.cloud_init.source",
                        f"{directory} is not a directory "
                        "(expected `distro`, an http(s) URL or a directory of packages)")
    return str(directory)


def shown_path(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def spec_files(spec_dir: Path) -> list[Path]:
    return sorted(p for p in spec_dir.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))


def load_specs(spec_dir: Path, base: Path | None = None) -> list[Spec]:
    """Every spec in a directory, validated; the first error stops the load.

    Relative paths in a spec are relative to `base`, by default the directory
    that holds the spec directory (the project, for `specs/`).
    """
    base = base or spec_dir.resolve().parent
    if not spec_dir.is_dir():
        raise SpecError(spec_dir, "", "spec directory does not exist")
    specs: dict[str, Spec] = {}
    for path in spec_files(spec_dir):
        spec = parse_spec(path, base)
        if spec.host in specs:
            other = shown_path(specs[spec.host].path, base)
            raise SpecError(shown_path(path, base), "(file name)",
                            f"duplicate host {spec.host!r}: also defined by {other}")
        specs[spec.host] = spec
    _check_shared_resources(list(specs.values()), base)
    return list(specs.values())


def _check_shared_resources(specs: list[Spec], base: Path) -> None:
    """Two hosts must never share a workdir or a source disk."""
    owners: dict[str, Spec] = {}
    for spec in specs:
        claims = [("workdir", str(spec.workdir))]
        # One server, one boot NIC and one reserved address: DHCP and the NFS
        # export would otherwise hand one host's work to another.
        claims += [("live.mac", f"mac {spec.live.mac}")] if spec.live.mac else []
        claims += [("live.address", f"address {spec.live.address}")] if spec.live.address else []
        claims += [(f"source.images[{i}]", str(p)) for i, p in enumerate(spec.source.images)]
        claims += [(f"source.devices[{i}]", os.path.realpath(d)) for i, d in enumerate(spec.source.devices)]
        for field_path, key in claims:
            if key in owners and owners[key] is not spec:
                raise SpecError(
                    shown_path(spec.path, base), field_path,
                    f"{key} is also used by host {owners[key].host!r} ({shown_path(owners[key].path, base)})",
                )
            owners[key] = spec
