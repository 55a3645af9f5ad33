"""Test tiers: unit (default, no root), integration (root, loop devices), e2e (qemu).

A test's tier comes from its folder; tests that need root skip, with the
reason, when not run as root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.plugin", "tests.services.fixture"]

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("integration", "e2e") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"{tier} tests need root (loop devices, mounts)"))
