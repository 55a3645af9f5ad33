"""README's "What a changed spec reruns" table, checked against what each stage keeps in doit's state.

Each row names spec fields and the first stage a change of one of them reruns. For every field the
test changes it on a loaded spec and finds the first stage (in pipeline order) whose configuration,
as doit compares it (`Stage.config`), differs. Every field of the spec schema is in the table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks import disk, fix, inspect, report, sync, upload, verify
from tasks.lib.spec import PROJECT_DIR, Spec, load_specs

STAGES = [inspect.STAGE, disk.STAGE, sync.STAGE, fix.STAGE, verify.STAGE, report.STAGE, upload.STAGE]
README = PROJECT_DIR / "README.md"
SCHEMA = PROJECT_DIR / "tasks" / "schemas" / "spec.schema.json"
HEADING = "#### What a changed spec reruns"

Change = Callable[[Spec], Spec]


def _source(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, source=dataclasses.replace(spec.source, **fields))


def _target(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, target=dataclasses.replace(spec.target, **fields))


def _fix(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, fix=dataclasses.replace(spec.fix, **fields))


def _cloud_init(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, fix=dataclasses.replace(
        spec.fix, cloud_init=dataclasses.replace(spec.fix.cloud_init, **fields)))


def _glance(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, glance=dataclasses.replace(spec.glance, **fields))


def _live(**fields: Any) -> Change:
    return lambda spec: dataclasses.replace(spec, live=dataclasses.replace(spec.live, **fields))


def _property(key: str, value: str) -> Change:
    return lambda spec: dataclasses.replace(spec, glance=dataclasses.replace(
        spec.glance, properties=(*spec.glance.properties, (key, value))))


# README's name of a field -> a change of it (to a valid value other than the base spec's).
CHANGES: dict[str, Change] = {
    "source.images": _source(images=(Path("/srv/disks/other.img"),)),
    "source.devices": _source(images=(), devices=("/dev/sdb",)),
    "source.disks": _source(images=(), devices=(), live_disks=("serial:ABC123",)),
    "source.root": _source(root="disk1p2"),
    "target.layout": _target(layout="keep"),
    "target.root_fs": _target(root_fs="xfs"),
    "target.label": _target(label="gpt"),
    "target.swap": _target(swap="file"),
    "target.size": _target(size="40G"),
    "target.headroom_percent": _target(headroom_percent=35),
    "target.min_headroom": _target(min_headroom="4G"),
    "target.keep_uuids": _target(keep_uuids=True),
    "target.copy": _target(copy="files"),
    "target.format": _target(format="qcow2"),
    "target.compress": _target(compress=True),
    "fix.network": _fix(network="dhcp"),
    "fix.cloud_init.install": _cloud_init(install=False),
    "fix.cloud_init.source": _cloud_init(source="/srv/debs"),
    "fix.cloud_init.packages": _cloud_init(packages=("qemu-guest-agent",)),
    "fix.remove_services": _fix(remove_services=("hpasmd",)),
    "fix.skip": _fix(skip=("network",)),
    "verify": lambda spec: dataclasses.replace(spec, verify=False),
    "glance.properties hw_machine_type": _property("hw_machine_type", "q35"),
    "glance.properties hw_firmware_type": _property("hw_firmware_type", "uefi"),
    "glance.properties": _property("os_distro", "debian"),
    "glance.cloud": _glance(cloud="other-cloud"),
    "glance.image_name": _glance(image_name="web01-p2v"),
    "glance.visibility": _glance(visibility="shared"),
    "glance.tags": _glance(tags=("p2v",)),
    "description": lambda spec: dataclasses.replace(spec, description="another description"),
    "live.mac": _live(mac="52:54:00:00:00:99"),
    "live.address": _live(address="192.0.2.99"),
    "live.debug": _live(debug=True),
    "live.shutdown": lambda spec: dataclasses.replace(spec, shutdown=False),
    "live.last_stage": _live(last_stage="fix"),
}


def readme_table() -> dict[str, str]:
    """README field name -> first stage it reruns (or "none"), from the section's table."""
    text = README.read_text()
    section = text[text.index(HEADING):]
    section = section[:section.index("\n#", len(HEADING))]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        stage = cells[1]
        fields = re.sub(r"\([^)]*\)", "", cells[0])  # the parenthesised remarks name no field
        for clause in fields.split(";"):
            names = re.findall(r"`([^`]+)`", clause)
            if names[0] == "glance.properties" and len(names) > 1:  # glance.properties `a` and `b`
                rows.update({f"glance.properties {key}": stage for key in names[1:]})
                continue
            for name in names:
                rows[name] = stage
    return rows


def schema_fields() -> set[str]:
    fields: set[str] = set()

    def walk(node: dict[str, object], path: list[str]) -> None:
        properties = node.get("properties")
        if node.get("type") == "object" and isinstance(properties, dict):
            for key, child in properties.items():
                walk(child, [*path, key])
        else:
            fields.add(".".join(path))

    walk(json.loads(SCHEMA.read_text()), [])
    return fields


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory: pytest.TempPathFactory) -> Spec:
    project = tmp_path_factory.mktemp("project")
    (project / "disks").mkdir()
    (project / "disks" / "a.img").write_bytes(b"")
    (project / "specs").mkdir()
    (project / "specs" / "web01.yaml").write_text("source:\n  images: [disks/a.img]\n")
    return load_specs(project / "specs")[0]


def first_rerun(before: Spec, after: Spec) -> str:
    for stage in STAGES:
        if json.dumps(stage.config(before), sort_keys=True, default=str) != \
                json.dumps(stage.config(after), sort_keys=True, default=str):
            return stage.name
    return "none"


def test_the_table_names_every_field_of_the_spec_schema() -> None:
    named = {name.split(" ")[0] for name in readme_table()}
    assert schema_fields() - {"workdir"} == named
    assert set(readme_table()) == set(CHANGES)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_changed_field_reruns_the_stage_the_readme_names(field: str, base_spec: Spec) -> None:
    assert first_rerun(base_spec, CHANGES[field](base_spec)) == readme_table()[field]
