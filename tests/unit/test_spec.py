"""Spec validation: every bad spec is one line naming the file and the field."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.lib.spec import PROJECT_DIR, SpecError, load_specs

GOOD_SOURCE = "source:\n  images: [disks/a.img]\n"


@dataclass(frozen=True)
class BadSpec:
    case: str
    files: dict[str, str]  # spec file name -> content
    file: str  # the file the error must name
    field: str  # the field path the error must name
    says: str  # a phrase the message must contain


BAD_SPECS = [
    BadSpec("unknown top-level key", {"web1.yaml": GOOD_SOURCE + "colour: blue\n"},
            "web1.yaml", "colour", "unknown key"),
    BadSpec("unknown nested key", {"web1.yaml": GOOD_SOURCE + "target:\n  layot: keep\n"},
            "web1.yaml", "target.layot", "unknown key"),
    BadSpec("wrong type", {"web1.yaml": GOOD_SOURCE + "target:\n  headroom_percent: twenty\n"},
            "web1.yaml", "target.headroom_percent", "expected integer"),
    BadSpec("not one of the choices", {"web1.yaml": GOOD_SOURCE + "target:\n  layout: flat\n"},
            "web1.yaml", "target.layout", "expected one of 'flatten', 'keep'"),
    BadSpec("bad host name", {"Web_1.yaml": GOOD_SOURCE}, "Web_1.yaml", "(file name)", "lower-case DNS label"),
    BadSpec("host name with a dot", {"web1.example.yaml": GOOD_SOURCE}, "web1.example.yaml", "(file name)",
            "DNS label"),
    BadSpec("missing source", {"web1.yaml": "workdir: /tmp/x\n"}, "web1.yaml", "source", "required field is missing"),
    BadSpec("both live and offline", {"web1.yaml": GOOD_SOURCE + "  devices: [/dev/null]\n"},
            "web1.yaml", "source", "exactly one of"),
    BadSpec("image that does not exist", {"web1.yaml": "source:\n  images: [disks/missing.img]\n"},
            "web1.yaml", "source.images[0]", "does not exist"),
    BadSpec("device that does not exist", {"web1.yaml": "source:\n  devices: [/dev/p2v-no-such-disk]\n"},
            "web1.yaml", "source.devices[0]", "does not exist"),
    BadSpec("device that is not a block device", {"web1.yaml": "source:\n  devices: [/dev/null]\n"},
            "web1.yaml", "source.devices[0]", "not a block device"),
    BadSpec("device without /dev", {"web1.yaml": "source:\n  devices: [sda]\n"},
            "web1.yaml", "source.devices[0]", "does not match"),
    BadSpec("empty image list", {"web1.yaml": "source:\n  images: []\n"}, "web1.yaml", "source.images",
            "must not be empty"),
    BadSpec("duplicate host", {"web1.yaml": GOOD_SOURCE, "web1.yml": "source:\n  images: [disks/b.img]\n"},
            "web1.yml", "(file name)", "duplicate host 'web1'"),
    BadSpec("YAML that does not parse", {"web1.yaml": "source:\n  images: [disks/a.img\n"},
            "web1.yaml", "", "YAML does not parse"),
    BadSpec("duplicate YAML key", {"web1.yaml": GOOD_SOURCE + "verify: true\nverify: false\n"},
            "web1.yaml", "verify", "duplicate key 'verify'"),
    BadSpec("top level is not a mapping", {"web1.yaml": "- source\n"}, "web1.yaml", "", "expected object"),
    BadSpec("size with a bad unit", {"web1.yaml": GOOD_SOURCE + "target:\n  size: 20GB\n"},
            "web1.yaml", "target.size", "does not match"),
    BadSpec("compression without qcow2", {"web1.yaml": GOOD_SOURCE + "target:\n  compress: true\n"},
            "web1.yaml", "target.compress", "qcow2"),
    BadSpec("two hosts share a disk", {"web1.yaml": GOOD_SOURCE, "web2.yaml": GOOD_SOURCE},
            "web2.yaml", "source.images[0]", "also used by host 'web1'"),
    BadSpec("two hosts share a workdir",
            {"web1.yaml": GOOD_SOURCE + "workdir: w\n", "web2.yaml": "source:\n  images: [disks/b.img]\nworkdir: w\n"},
            "web2.yaml", "workdir", "also used by host 'web1'"),
    BadSpec("glance property of a wrong type",
            {"web1.yaml": GOOD_SOURCE + "glance:\n  properties:\n    owner: [a, b]\n"},
            "web1.yaml", "glance.properties.owner", "expected string or integer or boolean"),
]


def make_project(tmp_path: Path, files: dict[str, str]) -> Path:
    """A project folder with specs/ and two small disk image files."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "disks").mkdir()
    for name in ("a.img", "b.img"):
        with open(tmp_path / "disks" / name, "wb") as handle:
            handle.truncate(1 << 20)
    for name, content in files.items():
        (tmp_path / "specs" / name).write_text(content)
    return tmp_path / "specs"


@pytest.mark.parametrize("bad", BAD_SPECS, ids=[b.case for b in BAD_SPECS])
def test_bad_spec_is_one_clear_line(tmp_path: Path, bad: BadSpec) -> None:
    spec_dir = make_project(tmp_path, bad.files)
    with pytest.raises(SpecError) as caught:
        load_specs(spec_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"specs/{bad.file}: "), message
    assert caught.value.field_path == bad.field, message
    assert bad.says in message


def run_doit(spec_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2V_SPECS": str(spec_dir)}
    return subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(PROJECT_DIR / "dodo.py"), *args],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, check=False, timeout=60,
    )


@pytest.mark.parametrize("bad", BAD_SPECS[:4] + BAD_SPECS[13:15], ids=lambda b: b.case)
def test_doit_refuses_bad_spec_before_any_task(tmp_path: Path, bad: BadSpec) -> None:
    spec_dir = make_project(tmp_path, bad.files)
    result = run_doit(spec_dir, "list")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("p2v: spec error: specs/" + bad.file)
    assert result.stdout == ""


def test_good_spec_fills_defaults(tmp_path: Path) -> None:
    spec_dir = make_project(tmp_path, {"web1.yaml": GOOD_SOURCE})
    (spec,) = load_specs(spec_dir)
    assert spec.host == "web1"
    assert spec.workdir == tmp_path / "work" / "web1"
    assert spec.source.images == ((tmp_path / "disks" / "a.img").resolve(),)
    assert not spec.source.live
    assert spec.target.layout == "flatten"
    assert spec.target.format == "raw"
    assert spec.fix.network == "keep"
    assert spec.verify is True


def test_shipped_live_example_is_valid(tmp_path: Path) -> None:
    """The documented live example validates once its disks exist (here: loop-free stand-ins)."""
    example = (PROJECT_DIR / "specs" / "examples" / "web01.yaml.example").read_text()
    offline = example.replace("devices: [/dev/sda, /dev/sdb]", "images: [disks/a.img, disks/b.img]")
    offline = offline.replace("workdir: /srv/p2v/web01", "workdir: work/web01")
    spec_dir = make_project(tmp_path, {"web01.yaml": offline})
    (spec,) = load_specs(spec_dir)
    assert spec.target.format == "qcow2"
    assert spec.fix.cloud_init.packages == ("qemu-guest-agent",)
    assert spec.glance.properties == (("owner_team", "web"),)


def test_every_swap_choice_and_fix_step_is_valid_and_old_specs_stay_valid(tmp_path: Path) -> None:
    import json

    from tasks.fix import STEP_NAMES

    schema = json.loads((PROJECT_DIR / "tasks" / "schemas" / "spec.schema.json").read_text())
    assert schema["properties"]["fix"]["properties"]["skip"]["items"]["enum"] == list(STEP_NAMES)
    for choice in ("source", "partition", "file", "none"):  # source, file and none are the old ones
        (tmp_path / choice).mkdir()
        spec_dir = make_project(tmp_path / choice, {"web1.yaml": GOOD_SOURCE + f"target:\n  swap: {choice}\n"
                                                    "fix:\n  skip: [swap-file, inode-flags]\n"})
        (spec,) = load_specs(spec_dir)
        assert spec.target.swap == choice
    (tmp_path / "default").mkdir()
    (spec,) = load_specs(make_project(tmp_path / "default", {"web1.yaml": GOOD_SOURCE}))
    assert spec.target.swap == "source"
