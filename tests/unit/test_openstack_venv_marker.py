"""The test services' venv counts as built only at the path it was built at (its scripts' shebangs)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.services.openstack import _built_here


def test_a_venv_completed_at_this_path_is_reused(tmp_path: Path) -> None:
    venv = tmp_path / "openstack-venv-abc"
    venv.mkdir()
    (venv / ".p2v-complete").write_text(json.dumps({"path": str(venv), "seconds": 40.0}))
    assert _built_here(venv / ".p2v-complete", venv)


def test_a_venv_moved_from_another_cache_is_rebuilt(tmp_path: Path) -> None:
    venv = tmp_path / "openstack-venv-abc"
    venv.mkdir()
    (venv / ".p2v-complete").write_text(json.dumps({"path": "/var/tmp/elsewhere/openstack-venv-abc"}))
    assert not _built_here(venv / ".p2v-complete", venv)


def test_an_old_marker_without_a_path_or_none_at_all_means_not_built(tmp_path: Path) -> None:
    venv = tmp_path / "openstack-venv-abc"
    venv.mkdir()
    assert not _built_here(venv / ".p2v-complete", venv)
    (venv / ".p2v-complete").write_text("43.1\n")
    assert not _built_here(venv / ".p2v-complete", venv)
