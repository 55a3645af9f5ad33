"""The doit wiring: task names, partial targets, per-host state in the workdir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.lib.spec import PROJECT_DIR

TOY_DODO = Path(__file__).parent / "data" / "dodo_pipeline.py"


def make_project(root: Path, hosts: list[str], *, demo: bool = False) -> Path:
    specs = root / "specs"
    specs.mkdir(parents=True)
    (root / "disks").mkdir()
    for host in hosts:
        image = root / "disks" / f"{host}.img"
        with open(image, "wb") as handle:
            handle.truncate(1 << 20)
        (specs / f"{host}.yaml").write_text(f"source:\n  images: [disks/{host}.img]\n")
    if demo:
        shutil.copy(PROJECT_DIR / "specs" / "demo.yaml", specs / "demo.yaml")
        (root / "work" / "demo-server").mkdir(parents=True)
        (root / "work" / "demo-packages").mkdir()
        for name in ("disk1.img", "disk2.img"):
            with open(root / "work" / "demo-server" / name, "wb") as handle:
                handle.truncate(1 << 20)
    return specs


def doit(cwd: Path, spec_dir: Path, *args: str, dodo: Path = PROJECT_DIR / "dodo.py",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # doit reads doit.cfg (our state backend) from the current directory.
    if cwd != PROJECT_DIR:
        shutil.copy(PROJECT_DIR / "doit.cfg", cwd / "doit.cfg")
    full_env = {**os.environ, "P2V_SPECS": str(spec_dir), "PYTHONPATH": str(PROJECT_DIR),
                "P2V_TEST_GLOBAL_DEP": str(cwd / "global-dep.json"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(dodo), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, check=False, timeout=120)


def test_list_all_shows_every_stage_and_host(tmp_path: Path) -> None:
    spec_dir = make_project(tmp_path, ["web1", "db2"], demo=True)
    result = doit(PROJECT_DIR, spec_dir, "list", "--all")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    from tasks import STAGES

    for host in ("demo", "web1", "db2"):
        assert f"convert:{host}" in names
        for stage in STAGES:
            assert f"{stage.name}:{host}" in names
    groups = doit(PROJECT_DIR, spec_dir, "list")
    group_names = {line.split()[0] for line in groups.stdout.splitlines() if line.strip()}
    assert group_names == {"convert", "plan", "pxe", *(s.name for s in STAGES)}


def test_state_lives_in_each_workdir_and_reruns_do_nothing(tmp_path: Path) -> None:
    spec_dir = make_project(tmp_path / "project", ["web1", "db2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = doit(run_dir, spec_dir, "convert:web1", "convert:db2", dodo=TOY_DODO)
    assert first.returncode == 0, first.stdout + first.stderr
    for host in ("web1", "db2"):
        workdir = tmp_path / "project" / "work" / host
        assert (workdir / "second.txt").read_text() == f"FIRST FOR {host.upper()}\n"
        state = json.loads((workdir / ".p2v" / "doit-state.json").read_text())
        assert {f"first:{host}", f"second:{host}"} <= set(state)
        assert not any(name.endswith(":db2" if host == "web1" else ":web1") for name in state)
    again = doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO)
    assert "-- first:web1" in again.stdout and "-- second:web1" in again.stdout, again.stdout
    assert (tmp_path / "project" / "work" / "web1" / "first.runs").read_text() == "x"

    # Another machine mounting the same workdirs, with no global state at all.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = doit(elsewhere, spec_dir, "convert:web1", dodo=TOY_DODO)
    assert resumed.returncode == 0
    assert "-- first:web1" in resumed.stdout and "-- second:web1" in resumed.stdout, resumed.stdout


def test_failed_stage_leaves_no_target_and_rerun_resumes_there(tmp_path: Path) -> None:
    spec_dir = make_project(tmp_path / "project", ["web1"])
    workdir = tmp_path / "project" / "work" / "web1"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    failed = doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO, env={"P2V_TEST_FAIL": "second"})
    assert failed.returncode != 0
    assert "second:web1: injected failure in second" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    assert (workdir / "first.txt").exists()
    assert not (workdir / "second.txt").exists()
    assert (workdir / "second.txt.partial").exists()  # kept for the post-mortem, never renamed
    assert "injected failure" in (workdir / "logs" / "second.log").read_text()

    rerun = doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "-- first:web1" in rerun.stdout  # not run again
    assert (workdir / "first.runs").read_text() == "x"
    assert (workdir / "second.txt").exists()


def test_spec_change_reruns_only_the_stage_that_depends_on_it(tmp_path: Path) -> None:
    spec_dir = make_project(tmp_path / "project", ["web1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO).returncode == 0
    spec = spec_dir / "web1.yaml"
    spec.write_text(spec.read_text() + "target:\n  layout: keep\n")
    rerun = doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO)
    assert "-- first:web1" in rerun.stdout
    assert ".  second:web1" in rerun.stdout, rerun.stdout


def test_a_second_run_on_the_same_host_is_refused(tmp_path: Path) -> None:
    import fcntl

    spec_dir = make_project(tmp_path / "project", ["web1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = tmp_path / "project" / "work" / "web1" / ".p2v"
    state.mkdir(parents=True)
    with open(state / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run holds the host
        refused = doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO)
    assert refused.returncode != 0
    assert "first:web1: another p2v run is working on host web1" in refused.stdout
    assert not (tmp_path / "project" / "work" / "web1" / "first.txt").exists()
    assert doit(run_dir, spec_dir, "convert:web1", dodo=TOY_DODO).returncode == 0


OVERLAP_DODO = Path(__file__).parent / "data" / "dodo_overlap.py"


def _events(workdir: Path) -> list[tuple[float, str, str]]:
    events = []
    for line in (workdir / "events.txt").read_text().splitlines():
        stamp, what, stage = line.split()
        events.append((float(stamp), what, stage))
    return events


def test_stages_of_one_host_never_meet_on_its_lock_in_a_parallel_batch(tmp_path: Path) -> None:
    """doit -n 2 --continue, as an operator's batch runs: a slow report beside a fast upload."""
    spec_dir = make_project(tmp_path / "project", ["web1"])
    workdir = tmp_path / "project" / "work" / "web1"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    batch = doit(run_dir, spec_dir, "-n", "2", "--continue", "convert:web1", dodo=OVERLAP_DODO)
    assert batch.returncode == 0, batch.stdout + batch.stderr
    assert "another p2v run" not in batch.stdout + batch.stderr
    events = _events(workdir)
    report_end = next(t for t, what, stage in events if (what, stage) == ("end", "report"))
    upload_start = next(t for t, what, stage in events if (what, stage) == ("start", "upload"))
    assert upload_start >= report_end, events
    assert (workdir / "report.txt").exists() and (workdir / "uploaded.txt").exists()


def test_the_overlap_test_does_force_an_overlap(tmp_path: Path) -> None:
    """Without the ordering, the same batch fails on the lock: the test above proves something."""
    spec_dir = make_project(tmp_path / "project", ["web1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    batch = doit(run_dir, spec_dir, "-n", "2", "--continue", "convert:web1", dodo=OVERLAP_DODO,
                 env={"P2V_TEST_UNORDERED": "1"})
    assert batch.returncode != 0
    # Whichever of the two starts second fails (the seed's CI saw report fail).
    assert re.search(r"(report|upload):web1: another p2v run is working on host web1", batch.stdout), batch.stdout
