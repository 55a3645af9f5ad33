"""bin/openstack-services is safe to run again: a second `start` reuses services that are up
and answering, restarts them when they are not, and a failure is one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.lib.spec import PROJECT_DIR
from tests.services.openstack import _alive


def services_cli(state_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROJECT_DIR / "bin" / "openstack-services"), command, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, check=False, timeout=600)


def pids(state_dir: Path) -> dict[str, int]:
    return {name: int(pid) for name, pid in json.loads((state_dir / "state.json").read_text())["pids"].items()}


def test_start_twice_reuses_and_a_dead_service_is_restarted(tmp_path: Path) -> None:
    state_dir = tmp_path / "services"
    try:
        first = services_cli(state_dir, "start")
        assert first.returncode == 0, first.stderr
        clouds = first.stdout.strip()
        running = pids(state_dir)

        again = services_cli(state_dir, "start")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == clouds
        assert "already running, reused" in again.stderr
        assert pids(state_dir) == running

        # Glance killed behind our back: the next start brings both back and they answer.
        os.killpg(running["glance"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and services_cli(state_dir, "status").returncode == 0:
            time.sleep(0.2)
        restarted = services_cli(state_dir, "start")
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip() == clouds
        assert "reused" not in restarted.stderr
        assert pids(state_dir)["glance"] != running["glance"]
        assert services_cli(state_dir, "status").returncode == 0
    finally:
        services_cli(state_dir, "stop")
    assert services_cli(state_dir, "status").returncode == 3


def test_a_failure_is_one_line(tmp_path: Path) -> None:
    # A state dir that cannot be created (a file is in the way): one line, no traceback.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    result = subprocess.run([sys.executable, "-m", "tests.services.openstack", "stop", "--state-dir",
                             str(blocker / "services")], cwd=PROJECT_DIR, capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("openstack-services stop: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


CALLER = """
import sys
from pathlib import Path
from tests.services.openstack import OpenStackServices
services = OpenStackServices(Path(sys.argv[1]), end_with_caller=True)
services.start()
print(services.status(), flush=True)
import time
time.sleep(600)
"""


def test_services_started_for_tests_end_with_their_caller_even_on_sigkill(tmp_path: Path) -> None:
    """A test session killed outright runs no teardown: its Keystone and Glance must not outlive it."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path / "state")], cwd=PROJECT_DIR,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)}, stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        assert "running" in caller.stdout.readline()
        started = list(pids(tmp_path / "state").values())
        assert len(started) == 2 and all(_alive(pid) for pid in started)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if _alive(pid)]
