"""The resource journal's pure parts: records and their schema, what is still held, the undo order, names."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tasks.lib import journal, machine_names, unwind
from tasks.lib.machine_names import lv_dm_name, lv_dm_uuids, md_node
from tasks.lib.resources import host_device_tag, host_run_dir
from tasks.lib.runner import P2VError

LOOP = {"device": "/dev/loop7", "backing": "/srv/disk1.img", "offset": 0}
MOUNT = {"source": "/dev/loop7p1", "target": "/run/p2v/web01-0123abcd/tree-x"}


def records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("kind,resource", [
    ("loop", LOOP),
    ("mount", MOUNT),
    ("lvm", {"vgs": ["vg00"], "devices": ["/dev/md/p2v-web01-a1b2c3-0"], "dm_uuids": ["LVM-abc"]}),
    ("md", {"node": "/dev/md/p2v-web01-a1b2c3-0", "uuid": "1:2:3:4", "members": ["/dev/sda1", "/dev/sdb1"]}),
    ("fuse-export", {"export": "/run/p2v/web01-0123abcd/replay-x.export"}),
    ("process", {"pid": 4711, "start_time": 123456, "command": "qemu-storage-daemon"}),
])
def test_every_kind_of_record_passes_its_schema(kind: str, resource: Mapping[str, Any]) -> None:
    assert set(resource) == set(journal.KINDS[kind])
    journal.check_record(journal.made_record(1, kind, resource, 99), "here")
    journal.check_record(journal.released_record(2, 1, "undone", 99), "here")


@pytest.mark.parametrize("record,field", [
    (journal.made_record(1, "loop", {**LOOP, "device": "/dev/sda"}, 1), "resource.device"),
    (journal.made_record(1, "loop", {"device": "/dev/loop1", "backing": "/x"}, 1), "resource"),
    (journal.made_record(1, "tape", LOOP, 1), "kind"),
    (journal.made_record(1, "mount", {**MOUNT, "target": "relative/dir"}, 1), "resource.target"),
    ({**journal.released_record(2, 1, "undone", 1), "how": "forgotten"}, "how"),
    ({**journal.released_record(2, 1, "undone", 1), "version": 2}, "version"),
])
def test_a_record_the_schema_refuses_is_one_line_naming_the_field(record: dict[str, Any], field: str) -> None:
    with pytest.raises(journal.JournalError) as caught:
        journal.check_record(record, "run/resources.journal:3")
    assert str(caught.value).startswith("run/resources.journal:3: ")
    assert "\n" not in str(caught.value)


def test_held_is_what_was_made_and_not_released_newest_first() -> None:
    records = [
        journal.made_record(1, "loop", LOOP, 5),
        journal.made_record(2, "mount", MOUNT, 5),
        journal.made_record(3, "mount", {**MOUNT, "target": "/run/p2v/a/b"}, 5),
        journal.released_record(4, 3, "undone", 5),
        journal.made_record(5, "fuse-export", {"export": "/run/p2v/a/e"}, 5),
        journal.released_record(6, 5, "never-made", 5),
    ]
    assert [(h.seq, h.kind) for h in journal.held(records)] == [(2, "mount"), (1, "loop")]
    assert [h.describe() for h in journal.held(records)] == [f"mount {MOUNT['target']}",
                                                            "loop /dev/loop7 on /srv/disk1.img"]


def test_a_line_cut_short_is_left_out_and_said() -> None:
    good = json.dumps(journal.made_record(1, "loop", LOOP, 5))
    records, problems = journal.parse(good + "\n" + good[:30] + "\n", "j")
    assert [r["seq"] for r in records] == [1]
    assert len(problems) == 1 and problems[0].startswith("j:2: not JSON")


# ---------------------------------------------------------------- writing


def test_without_a_journal_nothing_is_recorded(tmp_path: Path) -> None:
    undone: list[str] = []
    assert journal.current() is None
    with journal.resource("loop", lambda: "/dev/loop3", undone.append,
                          lambda path: {**LOOP, "device": path}) as made:
        assert made == "/dev/loop3"
    assert undone == ["/dev/loop3"]
    assert list(tmp_path.iterdir()) == []


def test_resources_are_recorded_as_made_and_released_as_undone(tmp_path: Path) -> None:
    order = []
    with journal.journaling(tmp_path) as writer:
        path = writer.path
        with journal.resource("loop", lambda: "/dev/loop3", lambda d: order.append(f"detach {d}"),
                              lambda dev: {**LOOP, "device": dev}), \
                journal.resource("mount", lambda: order.append("mount"), lambda _: order.append("umount"), MOUNT):
            assert [(r["event"], r["seq"], r.get("kind")) for r in records_of(path)] == [
                ("made", 1, "loop"), ("made", 2, "mount")]
            assert records_of(path)[0]["resource"]["device"] == "/dev/loop3"
        assert [(r["event"], r.get("of"), r.get("how")) for r in records_of(path)][2:] == [
            ("released", 2, "undone"), ("released", 1, "undone")]
        assert journal.held(records_of(path)) == []
    assert order == ["mount", "umount", "detach /dev/loop3"]
    assert not path.exists()  # nothing held: removed
    assert journal.current() is None


def test_a_run_that_holds_nothing_at_its_end_leaves_no_run_dir(tmp_path: Path) -> None:
    """/run/p2v gains no empty directory per host and project; one that still holds something stays."""
    empty, busy = tmp_path / "web01-0123abcd", tmp_path / "db01-4567ef01"
    (busy / "tree-left").mkdir(parents=True)  # a mount point whose rmdir failed
    empty.mkdir()
    for run_dir in (empty, busy):
        with journal.journaling(run_dir):
            with journal.resource("mount", lambda: None, lambda _: None, MOUNT):
                pass
    assert not empty.exists()
    assert sorted(p.name for p in busy.iterdir()) == ["tree-left"]


def test_a_killed_run_leaves_its_resources_held_in_reverse_order(tmp_path: Path) -> None:
    """What a SIGKILL leaves: made records, no releases (the process never reaches its finally blocks)."""
    with journal.journaling(tmp_path) as writer:
        stack = contextlib.ExitStack()
        stack.enter_context(journal.resource("loop", lambda: "/dev/loop3", lambda _: None,
                                             lambda dev: {**LOOP, "device": dev}))
        stack.enter_context(journal.resource("mount", lambda: None, lambda _: None, MOUNT))
        never_unwound = stack.pop_all()
        held = journal.held(records_of(writer.path))
    assert [h.kind for h in held] == ["mount", "loop"]
    assert writer.path.exists()  # held: kept for the next run
    never_unwound.close()  # (a garbage-collected generator would unwind anyway, later)


def test_a_resource_recorded_before_it_is_made_and_not_made_is_released(tmp_path: Path) -> None:
    def fail() -> None:
        raise OSError("mount failed")

    with journal.journaling(tmp_path) as writer:
        with pytest.raises(OSError), journal.resource("mount", fail, lambda _: None, MOUNT):
            pass
        assert [(r["event"], r.get("how")) for r in records_of(writer.path)] == [
            ("made", None), ("released", "never-made")]


def test_a_make_that_fails_halfway_is_undone(tmp_path: Path) -> None:
    """vgchange -ay that fails after some LVs: the deactivation runs, as before the journal."""
    def fail() -> None:
        raise OSError("vgchange failed on the second LV")

    undone: list[str] = []
    with journal.journaling(tmp_path) as writer:
        with pytest.raises(OSError), journal.resource("mount", fail, lambda _: undone.append("undo"), MOUNT,
                                                      halfway=lambda: undone.append("halfway")):
            pass
        assert [(r["event"], r.get("how")) for r in records_of(writer.path)] == [("made", None), ("released", "undone")]
    assert undone == ["halfway"]


def test_an_undo_that_fails_stays_held(tmp_path: Path) -> None:
    def fail(_: object) -> None:
        raise OSError("device busy")

    with journal.journaling(tmp_path) as writer:
        with pytest.raises(OSError), journal.resource("mount", lambda: None, fail, MOUNT):
            pass
        assert [h.kind for h in journal.held(records_of(writer.path))] == ["mount"]
    assert writer.path.exists()


def test_a_new_writer_continues_the_sequence(tmp_path: Path) -> None:
    first = journal.Journal(tmp_path / "j")
    first.made("loop", LOOP)
    second = journal.Journal(tmp_path / "j")
    assert second.made("mount", MOUNT) == 2
    assert not second.holds_nothing()


# ---------------------------------------------------------------- the next run's undo


def fake_undo(calls: list[str], results: Mapping[str, bool | Exception]) -> dict[str, Any]:
    def undo(kind: str) -> Any:
        def run(resource: Mapping[str, Any]) -> bool:
            calls.append(f"{kind} {resource.get('device') or resource.get('target')}")
            result = results[kind]
            if isinstance(result, Exception):
                raise result
            return result
        return run
    return {kind: undo(kind) for kind in journal.KINDS}


def test_the_next_run_undoes_what_is_held_newest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = journal.Journal(journal.journal_path(tmp_path))
    writer.made("loop", LOOP)
    writer.released(writer.made("mount", {**MOUNT, "target": "/run/p2v/a/done"}))
    writer.made("mount", MOUNT)
    calls: list[str] = []
    monkeypatch.setattr(unwind, "UNDO", fake_undo(calls, {"loop": False, "mount": True}))
    assert unwind.undo_journal(tmp_path) == [f"mount {MOUNT['target']}"]
    assert calls == [f"mount {MOUNT['target']}", "loop /dev/loop7"]
    assert not journal.journal_path(tmp_path).exists()
    assert unwind.undo_journal(tmp_path) == []


def test_an_undo_that_fails_stops_with_one_line_and_keeps_the_rest(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = journal.journal_path(tmp_path)
    writer = journal.Journal(path)
    writer.made("loop", LOOP)
    writer.made("mount", MOUNT)
    calls: list[str] = []
    monkeypatch.setattr(unwind, "UNDO", fake_undo(calls, {"loop": P2VError("losetup: busy"), "mount": True}))
    with pytest.raises(P2VError) as caught:
        unwind.undo_journal(tmp_path)
    assert str(caught.value).startswith("cannot undo what an interrupted run left (loop /dev/loop7 on "
                                        "/srv/disk1.img): losetup: busy (hint: release it by hand")
    held = journal.held(journal.read(path)[0])
    assert [h.kind for h in held] == ["loop"]  # the mount's undo was journaled
    assert records_of(path)[-1]["how"] == "undone-by-next-run"


def test_a_recycled_pid_is_never_killed() -> None:
    me = os.getpid()
    start = journal.process_start_time(me)
    assert start is not None
    assert unwind._undo_process({"pid": me, "start_time": start + 1, "command": "qemu"}) is False
    assert journal.process_record(me, "python")["start_time"] == start


# ---------------------------------------------------------------- names global on the machine


def test_md_names_carry_the_host_and_fit_mdadm() -> None:
    long_host = "a" * 63  # the longest DNS label
    tags = {host_device_tag(host, Path(f"/work/{workdir}")) for host in ("web01", long_host)
            for workdir in ("one", "two")}
    assert len(tags) == 4
    for tag in tags:
        name = md_node(tag, 127).removeprefix("/dev/md/")
        assert len(name) <= 28, name  # mdadm(8): 32; a kernel-named array md_<name>: 31 with the prefix
    assert md_node(host_device_tag("web01", Path("/w")), 0).startswith("/dev/md/p2v-web01-")
    key = host_run_dir("web01", Path("/w")).name.removeprefix("web01-")
    assert host_device_tag("web01", Path("/w")) == f"web01-{key[:6]}"


def test_lvm_device_mapper_names_and_uuids() -> None:
    assert lv_dm_name("vg-a", "root-fs") == "vg--a-root--fs"
    lvm = {"vgs": [{"name": "vg00", "uuid": "AAAA-BB"}], "lvs": [{"vg": "vg00", "name": "root", "uuid": "CC-DD"}]}
    assert lv_dm_uuids(lvm) == ["LVM-AAAABBCCDD"]


def test_hosts_whose_vgs_share_a_name_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two activations of VGs named alike would take the same device-mapper names: the second waits."""
    monkeypatch.setattr(machine_names, "LVM_LOCK_DIR", tmp_path)
    events: list[str] = []
    with machine_names.vg_names_locked(["vg00", "data"]):
        other = threading.Thread(target=lambda: _activate_and_note(["vg00"], events))
        other.start()
        time.sleep(0.3)
        events.append("first released")
    other.join(timeout=10)
    assert events == ["first released", "second active"]
    with machine_names.vg_names_locked(["data"]):  # a name nobody holds: at once
        pass


def _activate_and_note(vg_names: list[str], events: list[str]) -> None:
    with machine_names.vg_names_locked(vg_names):
        events.append("second active")


def test_a_device_mapper_name_the_machine_holds_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "lexists", lambda path: path == "/dev/mapper/centos-root")
    machine_names.refuse_taken_dm_names([{"vg": "vg00", "name": "root"}])
    with pytest.raises(P2VError) as caught:
        machine_names.refuse_taken_dm_names([{"vg": "vg00", "name": "swap"}, {"vg": "centos", "name": "root"}])
    assert str(caught.value) == (
        "LVM: /dev/mapper/centos-root exists already: a volume group named centos is active on this machine, and "
        "LVM cannot activate a second one of the same name (hint: deactivate it (vgchange -an) or convert this "
        "server from its live system)")
