"""A real OpenStack image service on 127.0.0.1: Keystone and Glance from PyPI, under gunicorn.

    with OpenStackServices(state_dir) as services:   # builds the venv once, bootstraps, starts
        services.clouds_yaml                          # clouds: p2v-test, p2v-reader, p2v-norole, p2v-admin
        services.stop_glance(); services.start_glance()
        services.download_image(image_id, path)

What runs, and why so:

- One venv for both services, built once per content of `requirements-openstack.txt` in
  `${P2V_CACHE:-/var/cache/p2v}/openstack-venv-<hash12>`, under a lock (concurrent test runs wait
  for each other), completed by a marker file written last that records the venv's path: a build
  killed halfway, or a cache moved to another path (scripts carry absolute shebangs), is redone.
- Keystone (sqlite, fernet tokens) and Glance (sqlite, file store) each under gunicorn with the
  gthread worker, on free ports picked at first start. Glance's paste pipeline is the `keystone`
  flavor: keystonemiddleware's auth_token validates every token against the Keystone, so a client
  authenticates exactly as against a production cloud.
- Keystone parses `sys.argv` through oslo.config at import, and gunicorn's own arguments would
  kill every worker ("unrecognized arguments"; clients then hang): a small WSGI module in the
  state directory resets `sys.argv` first. Glance finds its configuration through
  `OS_GLANCE_CONFIG_DIR`; its paste file is copied from the sample the wheel ships in `etc/glance`.
- Bootstrapped: admin (admin role), project `p2v` with user `p2v` (member), `p2v-reader` (reader
  only) and `p2v-norole` (no role on the project), and a `glance` service user with the service
  role in project `service`. The image endpoint is registered without `/v2`. Passwords are random
  per state directory and kept in it (mode 600), with clouds.yaml.
- Everything lives in the state directory: configs, databases, images, keys, pid files and the
  logs of both services (`logs/`). A stopped service frees its port (checked).

Standard library plus keystoneauth1 (already a p2v requirement) for the bootstrap calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.resources import file_lock
from tests.fixtures.cache import cache_root

REQUIREMENTS = Path(__file__).resolve().with_name("requirements-openstack.txt")
SYSTEM_PYTHON = "/usr/bin/python3"
PROJECT = "p2v"
REGION = "RegionOne"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DOMAIN = "Default"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
SERVICES = ("keystone", "glance")

# clouds.yaml entry -> (user, project, role on the project or None)
USERS: dict[str, tuple[str, str, str | None]] = {
    "p2v-admin": ("admin", "admin", "admin"),
    "p2v-test": ("p2v", PROJECT, "member"),
    "p2v-demo": ("p2v", PROJECT, "member"),  # specs/demo.yaml
    "p2v-reader": ("p2v-reader", PROJECT, "reader"),
    "p2v-norole": ("p2v-norole", PROJECT, None),
}


class ServiceError(RuntimeError):
    """The test service could not be built, started or stopped; the message says where to look."""


# ---------------------------------------------------------------- the venv


def requirements_hash(path: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def venv_dir(path: Path = REQUIREMENTS) -> Path:
    return cache_root() / f"openstack-venv-{requirements_hash(path)}"


def ensure_venv(path: Path = REQUIREMENTS, log: Any = None) -> Path:
    """The services' venv, built once per requirements content; waits for a concurrent builder."""
    venv = venv_dir(path)
    marker = venv / ".p2v-complete"
    if _built_here(marker, venv):
        return venv
    with file_lock(venv.with_name(venv.name + ".lock")):
        if _built_here(marker, venv):
            return venv
        if venv.exists():
            shutil.rmtree(venv)  # an interrupted build, or one made at another path
        started = time.monotonic()
        _say(log, f"building the OpenStack venv {venv} (keystone, glance; about a minute)")
        _check_call([SYSTEM_PYTHON, "-m", "venv", str(venv)], venv.with_name(venv.name + ".build.log"))
        _check_call([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "--quiet",
                     "-r", str(path)], venv.with_name(venv.name + ".build.log"))
        marker.write_text(json.dumps({"path": str(venv), "seconds": round(time.monotonic() - started, 1)}) + "\n")
        _say(log, f"OpenStack venv built in {time.monotonic() - started:.0f} s")
    return venv


def _built_here(marker: Path, venv: Path) -> bool:
    """True when the venv was completed at this very path.

    A venv is not relocatable: pip writes the interpreter's absolute path into the shebang of every
    script, so a cache directory moved or copied elsewhere keeps a marker whose scripts fail to
    start with ENOENT (their interpreter is gone). Such a venv counts as not built.
    """
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("path") == str(venv)


def _say(log: Any, text: str) -> None:
    if log is not None:
        log(text)


def _check_call(argv: list[str], log_file: Path, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as handle:
        handle.write(f"+ {' '.join(argv)}\n".encode())
        handle.flush()
        proc = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise ServiceError(f"{argv[0]} failed (exit code {proc.returncode}); log {log_file}:\n{tail}")


# ---------------------------------------------------------------- ports and processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # a zombie child of ours counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the services


@dataclass(frozen=True)
class Timing:
    venv: float
    bootstrap: float
    start: float

    @property
    def total(self) -> float:
        return self.venv + self.bootstrap + self.start


class OpenStackServices:
    """Keystone + Glance on 127.0.0.1, everything in `state_dir`. A context manager: start .. stop."""

    def __init__(self, state_dir: Path, requirements: Path = REQUIREMENTS, log: Any = None,
                 end_with_caller: bool = False):
        self.state_dir = state_dir.resolve()
        # Tests: the services die with the process that started them, however it ends (even
        # SIGKILL, when no teardown runs). bin/openstack-services leaves them running on purpose.
        self.end_with_caller = end_with_caller
        self.requirements = requirements
        self.log = log
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.timing: Timing | None = None
        self.reused = False  # start() found both services up and answering

    # -- paths and state

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def clouds_yaml(self) -> Path:
        return self.state_dir / "clouds.yaml"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def _state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        return data

    def _save(self, state: Mapping[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_name("state.json.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(partial, self.state_file)

    @property
    def keystone_port(self) -> int:
        return int(self._state()["ports"]["keystone"])

    @property
    def glance_port(self) -> int:
        return int(self._state()["ports"]["glance"])

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.keystone_port}/v3"

    @property
    def glance_url(self) -> str:
        return f"http://127.0.0.1:{self.glance_port}"

    def password(self, cloud: str) -> str:
        return str(self._state()["passwords"][USERS[cloud][0]])

    def secrets(self) -> list[str]:
        """Every password of the service's users: what must never appear in a log."""
        return sorted(self._state().get("passwords", {}).values())

    # -- start and stop

    def __enter__(self) -> OpenStackServices:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Timing:
        started = time.monotonic()
        venv = ensure_venv(self.requirements, log=self.log)
        self.venv = venv
        after_venv = time.monotonic()
        state = self._state()
        fresh = not state.get("bootstrapped") or state.get("venv") != str(venv)
        if not fresh and self.healthy():
            # A second `bin/demo`, or a second clone sharing the cache: the
            # services this state dir started are up and answer, so use them.
            self.reused = True
            self.timing = Timing(venv=after_venv - started, bootstrap=0.0, start=time.monotonic() - after_venv)
            return self.timing
        self.reused = False
        if not fresh:
            # Half up, or up but not answering: start both again from their state.
            for name in reversed(SERVICES):
                self.stop_service(name, kill=True)
        if fresh:
            self._wipe()
            self._configure(venv)
            self._keystone_database(venv)
            self._manage(venv, "glance-manage", "db_sync")
        else:
            state = self._recheck_ports(state)
        after_setup = time.monotonic()
        self._start_service("keystone")
        self._wait_ready("keystone")
        if fresh:
            self._identities()
        elif state.get("moved"):
            self._move_endpoints()
        self._start_service("glance")
        self._wait_ready("glance")
        after_start = time.monotonic()
        self.timing = Timing(venv=after_venv - started, bootstrap=after_setup - after_venv,
                             start=after_start - after_setup)
        return self.timing

    def healthy(self) -> bool:
        """Both services of this state dir are running and answer their health URLs."""
        state = self._state()
        for name in SERVICES:
            pid = state.get("pids", {}).get(name)
            if not pid or not _alive(int(pid)) or _http_status(self._health_url(name)) != 200:
                return False
        return True

    def _health_url(self, name: str) -> str:
        port = int(self._state()["ports"][name])
        return f"http://127.0.0.1:{port}/v3" if name == "keystone" else f"http://127.0.0.1:{port}/healthcheck"

    def stop(self) -> None:
        for name in reversed(SERVICES):
            self.stop_service(name)

    def start_glance(self) -> None:
        self._start_service("glance")
        self._wait_ready("glance")

    def stop_glance(self, kill: bool = False) -> None:
        self.stop_service("glance", kill=kill)

    @contextlib.contextmanager
    def glance_option(self, section: str, key: str, value: str) -> Iterator[None]:
        """Glance restarted with one more setting in glance-api.conf; restored and restarted after."""
        conf = self.state_dir / "glance" / "glance-api.conf"
        original = conf.read_text()
        header = f"[{section}]\n"
        if header not in original:
            raise ServiceError(f"glance-api.conf has no {header.strip()} section")
        conf.write_text(original.replace(header, f"{header}{key} = {value}\n", 1))
        self.stop_glance()
        self.start_glance()
        try:
            yield
        finally:
            conf.write_text(original)
            self.stop_glance()
            self.start_glance()

    def status(self) -> dict[str, str]:
        state = self._state()
        result = {}
        for name in SERVICES:
            pid = state.get("pids", {}).get(name)
            port = state.get("ports", {}).get(name)
            if pid and _alive(int(pid)):
                result[name] = f"running (pid {pid}, http://127.0.0.1:{port})"
            else:
                result[name] = "stopped"
        return result

    def wipe(self) -> None:
        """Stop and forget everything: databases, keys and the image store."""
        self._wipe()

    def _wipe(self) -> None:
        for name in SERVICES:
            self.stop_service(name)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    def _recheck_ports(self, state: dict[str, Any]) -> dict[str, Any]:
        """A restart keeps its ports when they are free; otherwise new ones, and the catalog follows."""
        moved = False
        for name in SERVICES:
            pid = state.get("pids", {}).get(name)
            if pid and _alive(int(pid)):
                raise ServiceError(f"{name} of {self.state_dir} is already running (pid {pid}); stop it first")
            if not port_is_free(int(state["ports"][name])):
                state["ports"][name] = free_port()
                moved = True
        if moved:
            state["moved"] = True
            self._save(state)
            self._write_configs(Path(state["venv"]), state)
        return state

    def _start_service(self, name: str) -> None:
        state = self._state()
        pid = state.get("pids", {}).get(name)
        if pid and _alive(int(pid)):
            return
        port = int(state["ports"][name])
        if not port_is_free(port):
            raise ServiceError(f"port {port} for {name} is in use by another process")
        venv = Path(state["venv"])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(venv / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{port}",
                "--workers", "1", "--worker-class", "gthread", "--threads", "4", "--timeout", "600",
                "--graceful-timeout", "5",
                "--error-logfile", str(self.log_dir / f"{name}-gunicorn.log"),
                "--access-logfile", str(self.log_dir / f"{name}-access.log"),
                "--chdir", str(self.state_dir / "wsgi"), "--name", f"p2v-test-{name}"]
        if name == "keystone":
            argv.append("keystone_wsgi:application")
            env = {"OS_KEYSTONE_CONFIG_DIR": str(self.state_dir / "keystone")}
        else:
            argv.append("glance.wsgi.api:application")
            env = {"OS_GLANCE_CONFIG_DIR": str(self.state_dir / "glance")}
        with (self.log_dir / f"{name}-console.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                    preexec_fn=_terminate_with_parent if self.end_with_caller else None)
        self._procs[name] = proc
        state.setdefault("pids", {})[name] = proc.pid
        self._save(state)

    def _wait_ready(self, name: str) -> None:
        state = self._state()
        pid = int(state["pids"][name])
        url = self._health_url(name)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise ServiceError(f"{name} exited while starting; logs: {self._log_tail(name)}")
            if _http_status(url) == 200:
                return
            time.sleep(0.2)
        self.stop_service(name, kill=True)
        raise ServiceError(f"{name} did not answer on {url} within {START_TIMEOUT:.0f} s; {self._log_tail(name)}")

    def _log_tail(self, name: str) -> str:
        lines: list[str] = []
        for suffix in ("console", "gunicorn", "app"):
            path = self.log_dir / f"{name}-{suffix}.log"
            if path.is_file():
                lines += [f"--- {path}", *path.read_text(errors="replace").splitlines()[-10:]]
        return "\n".join(lines)

    def stop_service(self, name: str, kill: bool = False) -> None:
        """Stop one service (SIGQUIT: gunicorn's quick shutdown; SIGKILL with kill=True or on a
        timeout), and wait until its port is free again."""
        state = self._state()
        pid = state.get("pids", {}).get(name)
        if not pid:
            return
        pid = int(pid)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL if kill else signal.SIGQUIT)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _alive(pid) and time.monotonic() < deadline:
                self._reap(name)
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                while _alive(pid):
                    self._reap(name)
                    time.sleep(0.1)
        # workers of the group, if any outlived their master
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self._reap(name)
        port = state.get("ports", {}).get(name)
        deadline = time.monotonic() + STOP_TIMEOUT
        while port and not port_is_free(int(port)):
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} stopped, but port {port} is still in use")
            time.sleep(0.1)
        state.get("pids", {}).pop(name, None)
        self._save(state)

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            self._procs.pop(name, None)

    # -- configuration and bootstrap

    def _configure(self, venv: Path) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        state: dict[str, Any] = {
            "venv": str(venv),
            "ports": {"keystone": free_port(), "glance": free_port()},
            # Hex, not token_urlsafe: one password in 64 began with "-", and keystone-manage's
            # argparse took it for an option ("--bootstrap-password: expected one argument").
            "passwords": {user: secrets.token_hex(16) for user, _, _ in USERS.values()} | {
                "glance": secrets.token_hex(16)},
            "bootstrapped": False,
        }
        while state["ports"]["glance"] == state["ports"]["keystone"]:
            state["ports"]["glance"] = free_port()
        self._save(state)
        for sub in ("keystone", "glance", "wsgi", "logs", "images", "staging", "tasks"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("fernet-keys", "credential-keys"):
            (self.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_configs(venv, state)
        (self.state_dir / "wsgi" / "keystone_wsgi.py").write_text(
            '"""Keystone under gunicorn: oslo.config must not see gunicorn\'s arguments."""\n'
            "import sys\n\nsys.argv = sys.argv[:1]\n\n"
            "from keystone.wsgi.api import application  # noqa: E402,F401\n")
        return state

    def _write_configs(self, venv: Path, state: Mapping[str, Any]) -> None:
        s = self.state_dir
        keystone_port = state["ports"]["keystone"]
        glance_port = state["ports"]["glance"]
        (s / "keystone" / "keystone.conf").write_text(f"""\
[DEFAULT]
log_file = {s}/logs/keystone-app.log
debug = false

[database]
connection = sqlite:///{s}/keystone.db

[token]
provider = fernet
expiration = 7200

[fernet_tokens]
key_repository = {s}/fernet-keys

[fernet_receipts]
key_repository = {s}/fernet-keys

[credential]
key_repository = {s}/credential-keys

[identity]
password_hash_rounds = 4
""")
        samples = venv / "etc" / "glance"
        shutil.copy(samples / "glance-api-paste.ini", s / "glance" / "glance-api-paste.ini")
        (s / "glance" / "glance-api.conf").write_text(f"""\
[DEFAULT]
log_file = {s}/logs/glance-app.log
debug = false
enabled_backends = local:file
worker_self_reference_url = http://127.0.0.1:{glance_port}
image_cache_dir = {s}/image-cache

[database]
connection = sqlite:///{s}/glance.db

[paste_deploy]
flavor = keystone
config_file = {s}/glance/glance-api-paste.ini

[glance_store]
default_backend = local

[local]
filesystem_store_datadir = {s}/images/

[os_glance_staging_store]
filesystem_store_datadir = {s}/staging/

[os_glance_tasks_store]
filesystem_store_datadir = {s}/tasks/

[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:{keystone_port}/v3
auth_url = http://127.0.0.1:{keystone_port}/v3
auth_type = password
username = glance
password = {state["passwords"]["glance"]}
project_name = service
user_domain_name = {DOMAIN}
project_domain_name = {DOMAIN}
region_name = {REGION}

[oslo_policy]
enforce_new_defaults = true
enforce_scope = true

[healthcheck]
disable_by_file_path = {s}/glance/healthcheck_disable
""")
        os.chmod(s / "glance" / "glance-api.conf", 0o600)
        self._write_clouds_yaml(state)

    def _write_clouds_yaml(self, state: Mapping[str, Any]) -> None:
        auth_url = f"http://127.0.0.1:{state['ports']['keystone']}/v3"
        clouds = {}
        for cloud, (user, project, _) in USERS.items():
            clouds[cloud] = {
                "auth": {"auth_url": auth_url, "username": user, "password": state["passwords"][user],
                         "project_name": project, "user_domain_name": DOMAIN, "project_domain_name": DOMAIN},
                "region_name": REGION,
                "interface": "public",
                "identity_api_version": 3,
            }
        fd = os.open(self.clouds_yaml, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("# written by tests/services/openstack.py for the local Keystone + Glance\n")
            yaml.safe_dump({"clouds": clouds}, handle, sort_keys=True)

    def _manage(self, venv: Path, tool: str, *args: str) -> None:
        s = self.state_dir
        if tool == "keystone-manage":
            argv = [str(venv / "bin" / tool), "--config-file", str(s / "keystone" / "keystone.conf"), *args]
        else:
            argv = [str(venv / "bin" / tool), "--config-dir", str(s / "glance"), *args]
        _check_call(argv, self.log_dir / "bootstrap.log")

    def _keystone_database(self, venv: Path) -> None:
        """Keystone's database, keys and bootstrap (admin, roles, region, identity endpoint)."""
        password = self._state()["passwords"]["admin"]
        self._manage(venv, "keystone-manage", "db_sync")
        for keys in ("fernet_setup", "credential_setup"):
            self._manage(venv, "keystone-manage", keys, "--keystone-user", "root", "--keystone-group", "root")
        self._manage(venv, "keystone-manage", "bootstrap", f"--bootstrap-password={password}",
                     "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
                     "--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone",
                     "--bootstrap-region-id", REGION,
                     "--bootstrap-admin-url", self.auth_url, "--bootstrap-public-url", self.auth_url,
                     "--bootstrap-internal-url", self.auth_url)

    def _identities(self) -> None:
        """Projects, users, roles and the image service, through Keystone's API as admin."""
        state = self._state()
        session = self.admin_session()
        api = _Identity(session, self.auth_url)
        service_project = api.ensure("projects", "service", {"domain_id": "default"})
        project = api.ensure("projects", PROJECT, {"domain_id": "default"})
        roles = {role["name"]: role["id"] for role in api.list("roles")}
        for user, _, role in USERS.values():
            if user == "admin":
                continue
            user_id = api.ensure("users", user, {"domain_id": "default", "password": state["passwords"][user],
                                                 "default_project_id": project})
            if role:
                api.grant(project, user_id, roles[role])
        glance_user = api.ensure("users", "glance", {"domain_id": "default", "password": state["passwords"]["glance"]})
        api.grant(service_project, glance_user, roles["service"])
        service = api.ensure("services", "glance", {"type": "image"})
        for interface in ("public", "internal", "admin"):
            api.endpoint(service, interface, self.glance_url, REGION)
        state["bootstrapped"] = True
        self._save(state)

    def _move_endpoints(self) -> None:
        api = _Identity(self.admin_session(), self.auth_url)
        services = {svc["type"]: svc["id"] for svc in api.list("services")}
        for endpoint in api.list("endpoints"):
            url = self.auth_url if endpoint["service_id"] == services.get("identity") else self.glance_url
            api.patch("endpoints", endpoint["id"], {"url": url})
        state = self._state()
        state.pop("moved", None)
        self._save(state)

    # -- clients

    def admin_session(self, cloud: str = "p2v-admin") -> Any:
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        user, project, _ = USERS[cloud]
        auth = v3.Password(auth_url=self.auth_url, username=user, password=self._state()["passwords"][user],
                           project_name=project, user_domain_name=DOMAIN, project_domain_name=DOMAIN)
        return ks_session.Session(auth=auth)

    def application_credential(self, cloud: str, name: str, role: str = "member") -> dict[str, str]:
        """A Keystone application credential of the cloud's user, limited to `role` on its project,
        as an operator makes one for a live upload. Returns id, secret and the auth URL."""
        session = self.admin_session(cloud)
        user_id = session.get_user_id()
        response = session.post(f"{self.auth_url}/users/{user_id}/application_credentials",
                                json={"application_credential": {"name": name, "roles": [{"name": role}],
                                                                 "description": "p2v live upload (tests)"}})
        created = response.json()["application_credential"]
        return {"id": created["id"], "secret": created["secret"], "auth_url": self.auth_url}

    def glance(self, cloud: str = "p2v-admin") -> Any:
        """A glanceclient v2 client for one of the clouds (admin by default: sees every image)."""
        from glanceclient import client as glance_client

        return glance_client.Client("2", session=self.admin_session(cloud), region_name=REGION,
                                    interface="public")

    def images(self, cloud: str = "p2v-admin", **filters: Any) -> list[dict[str, Any]]:
        return [dict(image) for image in self.glance(cloud).images.list(filters=filters)]

    def delete_all_images(self) -> None:
        client = self.glance()
        for image in client.images.list():
            client.images.delete(image["id"])

    def download_image(self, image_id: str, dest: Path, cloud: str = "p2v-admin") -> Path:
        """Download an image's data to `dest` (written as dest.partial, then renamed), checking
        Glance's sha512 (os_hash_value) on the way. Returns dest."""
        client = self.glance(cloud)
        image = client.images.get(image_id)
        digest = hashlib.sha512()
        partial = dest.with_name(dest.name + ".partial")
        with partial.open("wb") as out:
            for chunk in client.images.data(image_id):
                digest.update(chunk)
                out.write(chunk)
        if image.get("os_hash_value") and digest.hexdigest() != image["os_hash_value"]:
            partial.unlink()
            raise ServiceError(f"image {image_id}: downloaded data does not match os_hash_value")
        os.replace(partial, dest)
        return dest


class _Identity:
    """Just enough of Keystone's v3 API for the bootstrap, by name, idempotent."""

    def __init__(self, session: Any, auth_url: str):
        self.session = session
        self.base = auth_url.rstrip("/")

    def list(self, kind: str, **query: str) -> list[dict[str, Any]]:
        response = self.session.get(f"{self.base}/{kind}", params=query, endpoint_filter=None)
        items: list[dict[str, Any]] = response.json()[kind]
        return items

    def ensure(self, kind: str, name: str, body: Mapping[str, Any]) -> str:
        for item in self.list(kind, name=name):
            if item["name"] == name:
                return str(item["id"])
        singular = kind[:-1]
        response = self.session.post(f"{self.base}/{kind}", json={singular: {"name": name, **body}})
        return str(response.json()[singular]["id"])

    def grant(self, project: str, user: str, role: str) -> None:
        self.session.put(f"{self.base}/projects/{project}/users/{user}/roles/{role}")

    def patch(self, kind: str, item: str, body: Mapping[str, Any]) -> None:
        self.session.patch(f"{self.base}/{kind}/{item}", json={kind[:-1]: dict(body)})

    def endpoint(self, service: str, interface: str, url: str, region: str) -> None:
        for item in self.list("endpoints", service_id=service, interface=interface):
            self.patch("endpoints", item["id"], {"url": url})
            return
        self.session.post(f"{self.base}/endpoints", json={"endpoint": {
            "service_id": service, "interface": interface, "url": url, "region_id": region}})


def sqlite_tables(path: Path) -> list[str]:
    """Tables of an sqlite database (a cheap check that db_sync ran)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - bin/openstack-services
    import argparse

    parser = argparse.ArgumentParser(prog="openstack-services", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status", "clouds-yaml", "wipe"))
    parser.add_argument("--state-dir", type=Path, default=cache_root() / "openstack-services",
                        help="where configs, databases, images and logs live (default: %(default)s)")
    args = parser.parse_args(argv)
    services = OpenStackServices(args.state_dir, log=lambda text: print(text, file=sys.stderr))
    try:
        return _command(services, args.command)
    except (ServiceError, OSError) as error:
        # One line for the operator; the logs named in it have the rest.
        print(f"openstack-services {args.command}: {error}", file=sys.stderr)
        return 1


def _command(services: OpenStackServices, command: str) -> int:  # pragma: no cover - bin/openstack-services
    if command == "start":
        started = time.monotonic()
        services.start()
        how = "already running, reused" if services.reused else f"ready in {time.monotonic() - started:.1f} s"
        print(f"keystone {services.auth_url}  glance {services.glance_url}  ({how}; logs {services.log_dir})",
              file=sys.stderr)
        print(services.clouds_yaml)
    elif command == "stop":
        services.stop()
        print("stopped", file=sys.stderr)
    elif command == "wipe":
        services.stop()
        services.wipe()
        print(f"stopped; removed {services.state_dir} (databases, keys and every image)", file=sys.stderr)
    elif command == "status":
        for name, text in services.status().items():
            print(f"{name}: {text}")
        return 0 if all(t.startswith("running") for t in services.status().values()) else 3
    else:
        print(services.clouds_yaml)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
