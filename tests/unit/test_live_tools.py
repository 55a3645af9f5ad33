"""Every command a stage runs is in the live system's tool list (live/tools.py).

The call sites are read from the code: each call of the runner (run, output,
which), of subprocess and of pexpect in tasks/. A command named by a literal
(`run(["losetup", ...])`, or `argv = ["mount"]; run([*argv, ...])` in the same
function) is checked directly. A command the code computes (mkfs.<type> from
the plan, the LVM report commands) comes from DYNAMIC below, each entry derived
from the code's own constants where it has them; a new computed call site
fails here until it is listed.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

from live.tools import LIVE_TOOLS, STAGE_TOOLS
from tasks.lib import plan

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tasks"

# tasks.lib.runner's functions, called by name (chroot_run is not among them:
# what it runs is the target's, only its `chroot` is ours) ...
RUNNER_FUNCTIONS = {"run", "output", "which"}
# ... and module functions that start processes (`subprocess.Popen(argv)`).
PROCESS_MODULES = {"subprocess": {"run", "Popen"}, "pexpect": {"spawn"}, "runner": RUNNER_FUNCTIONS}
# The runner's own plumbing: it runs what its callers pass, checked at their call sites.
SKIPPED = {"tasks/lib/runner.py:run", "tasks/lib/runner.py:output", "tasks/lib/runner.py:which"}


def _mkfs_commands() -> set[str]:
    commands = {f"mkfs.{fstype}" for fstype in plan.EXT_TYPES}
    commands |= {"mkfs.xfs", "mkfs.fat"}
    assert set(plan.SUPPORTED_TYPES) == {*plan.EXT_TYPES, "xfs", "vfat"}, "a new filesystem type: add its mkfs"
    return commands


# call site (file:function) -> the commands it can run
DYNAMIC: dict[str, Callable[[], set[str]]] = {
    "tasks/disk.py:make_filesystem": lambda: _mkfs_commands() | {"mkswap"},  # run([*part.filesystem.mkfs, node])
    "tasks/lib/storage.py:_lvm_report": lambda: {"pvs", "vgs", "lvs"},  # _lvm_report("pvs"|"vgs"|"lvs", ...)
    "tasks/lib/copy/commands.py:tool_versions": lambda: {"rsync", "tar"},  # for tool in ("rsync", "tar")
    "tasks/lib/copy/passes.py:_run_logged": lambda: {"tar", "rsync"},  # the tar pipeline and rsync passes
    "tasks/lib/bootcheck.py:_spawn": lambda: {"qemu-system-x86_64"},  # which(argv[0]): qemu_argv, kernel_qemu_argv
    "tasks/lib/bootcheck.py:_start": lambda: {"qemu-system-x86_64"},  # the same argv, spawned
    "tasks/lib/overlay.py:_start_daemon": lambda: {"qemu-storage-daemon"},  # fuse_export's argv
    "tasks/lib/manifest.py:_stream_apart": set,  # sys.executable: the venv's python, not a PATH command
    # _mtools(["mdir" | "mcopy" | ..., ...]): the ESP's tools, read from esp.py's call sites
    "tasks/lib/esp.py:_mtools": lambda: _literal_first_words(TASKS / "lib" / "esp.py", "_mtools"),
    # logged.run([...]): the block copy's tools, each written into the copy log
    "tasks/lib/copy/blocks.py:run": lambda: _literal_first_words(TASKS / "lib" / "copy" / "blocks.py", "run"),
}


def _literal_first_words(path: Path, function: str) -> set[str]:
    """The first word of every `function([...])` call with a literal list in a module."""
    words = set()
    for node in ast.walk(ast.parse(path.read_text())):
        name = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else \
            node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if isinstance(node, ast.Call) and name == function \
                and node.args and isinstance(node.args[0], ast.List) and node.args[0].elts \
                and isinstance(node.args[0].elts[0], ast.Constant):
            words.add(str(node.args[0].elts[0].value))
    return words


def _first_word(node: ast.expr, lists: dict[str, list[ast.expr]]) -> list[str] | None:
    """The command words an argv expression starts with, or None when the code computes it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Starred):
            return _first_word(first.value, lists)
        return _first_word(first, lists)
    if isinstance(node, ast.Name) and node.id in lists:
        words = [_first_word(value, lists) for value in lists[node.id]]
        if all(w is not None for w in words):
            return [word for found in words if found for word in found]
    return None


def _local_lists(function: ast.FunctionDef) -> dict[str, list[ast.expr]]:
    """name -> the list displays assigned to it in this function (`argv = ["mount"]`)."""
    lists: dict[str, list[ast.expr]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    lists.setdefault(target.id, []).append(node.value)
    return lists


def _starts_a_process(call: ast.Call) -> bool:
    """`run(...)`, `subprocess.Popen(...)`; not `guest.run(...)` (a command typed into a guest's console)."""
    if isinstance(call.func, ast.Name):
        return call.func.id in RUNNER_FUNCTIONS
    if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
        return call.func.attr in PROCESS_MODULES.get(call.func.value.id, set())
    return False


class _Scanner(ast.NodeVisitor):
    """Each runner call, attributed to the innermost function around it."""

    def __init__(self, relative: str):
        self.relative = relative
        self.stack: list[tuple[str, dict[str, list[ast.expr]]]] = []
        self.found: dict[str, set[str]] = {}
        self.computed: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append((f"{self.relative}:{node.name}", _local_lists(node)))
        self.generic_visit(node)
        self.stack.pop()

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if not _starts_a_process(node) or not node.args or not self.stack:
            return
        site, lists = self.stack[-1]
        if site in SKIPPED:
            return
        words = _first_word(node.args[0], lists)
        if words is None:
            self.computed.add(site)
            return
        for word in words:
            self.found.setdefault(word, set()).add(site)


def scan() -> tuple[dict[str, set[str]], set[str]]:
    """(command -> where it is called, the call sites that compute their command)."""
    found: dict[str, set[str]] = {}
    computed: set[str] = set()
    for path in sorted(TASKS.rglob("*.py")):
        scanner = _Scanner(path.relative_to(ROOT).as_posix())
        scanner.visit(ast.parse(path.read_text()))
        for command, sites in scanner.found.items():
            found.setdefault(command, set()).update(sites)
        computed |= scanner.computed
    return found, computed


def test_the_scan_finds_the_commands_it_should() -> None:
    found, computed = scan()
    # A few known call sites, so that a broken scan cannot pass by finding nothing.
    assert "tasks/lib/resources.py:loop_device" in found["losetup"]
    assert "tasks/lib/resources.py:mounted" in found["mount"]
    assert "tasks/lib/overlay.py:fuse_export" in found["qemu-storage-daemon"]
    assert "tasks/lib/storage.py:_lvm_report" in computed


def test_every_command_a_stage_runs_is_in_the_live_system() -> None:
    found, computed = scan()
    missing = {command: sorted(sites) for command, sites in found.items() if command not in STAGE_TOOLS}
    assert not missing, f"commands the stages run but live/tools.py does not list: {missing}"
    unknown = sorted(computed - set(DYNAMIC))
    assert not unknown, f"call sites that compute their command; list what they run in DYNAMIC: {unknown}"
    stale = sorted(set(DYNAMIC) - computed)
    assert not stale, f"DYNAMIC lists call sites that no longer compute a command: {stale}"
    for site, commands in DYNAMIC.items():
        assert commands() <= set(STAGE_TOOLS), f"{site} runs {sorted(commands() - set(STAGE_TOOLS))}"


def test_the_list_has_nothing_the_stages_do_not_run() -> None:
    found, _ = scan()
    called = set(found) | {command for commands in DYNAMIC.values() for command in commands()}
    assert sorted(set(STAGE_TOOLS) - called) == []
    assert set(STAGE_TOOLS) <= set(LIVE_TOOLS)
