"""The OpenStack image service as a session-scoped pytest fixture.

Use it from a test module with `from tests.services.fixture import openstack  # noqa: F401`, or
list `tests.services.fixture` in the root conftest's `pytest_plugins` to offer it everywhere. The
first use in a session starts Keystone and Glance (building their venv on a fresh machine, about
a minute); the session's end stops both and frees their ports. State and service logs stay in
pytest's temporary directory (`.../openstack0/logs/`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.services.openstack import OpenStackServices


@pytest.fixture(scope="session")
def openstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStackServices]:
    services = OpenStackServices(tmp_path_factory.mktemp("openstack"),
                                 log=lambda text: print(text, file=sys.stderr), end_with_caller=True)
    timing = services.start()
    print(f"openstack services up: venv {timing.venv:.1f} s, bootstrap {timing.bootstrap:.1f} s, "
          f"start {timing.start:.1f} s ({services.state_dir})", file=sys.stderr)
    try:
        yield services
    finally:
        try:  # the store holds full-size copies of uploaded disks: free them first
            services.delete_all_images()
        finally:
            services.stop()
