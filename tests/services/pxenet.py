"""A PXE network in network namespaces, for tests: a bridge with the infra server's
address, and the real services `doit pxe` renders configuration for: dnsmasq
(DHCP, TFTP), an HTTP server, and nfs-ganesha (userspace NFS, VFS backend).

Clients are further namespaces joined to the bridge by a veth pair, each with
the MAC of a server (or a qemu guest's tap, see `add_tap`). Nothing here talks
to anything outside the namespaces it made; everything is undone on exit,
processes first, then the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.runner import run
from tasks.lib.site import Site

BRIDGE = "br-p2v"


@dataclass
class PxeNetwork:
    site: Site
    namespace: str
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)

    def exec(self, argv: Sequence[str], namespace: str | None = None, *, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the server's (or a client's) namespace."""
        return subprocess.run(["ip", "netns", "exec", namespace or self.namespace, *argv], capture_output=True,
                              text=True, check=False, timeout=timeout, input=input)

    def start(self, name: str, argv: Sequence[str], ready_port: int | None = None, timeout: float = 30) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = proc
        if ready_port is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); see {self.log_dir / f'{name}.log'}")
            listening = self.exec(["ss", "-Htln", f"sport = :{ready_port}"]).stdout
            if listening.strip():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} does not listen on port {ready_port} after {timeout:.0f} s")

    def add_client(self, name: str, mac: str) -> str:
        """A namespace joined to the PXE bridge whose eth0 has `mac`; returns the namespace."""
        namespace = f"{self.namespace}-{name}"[:40]
        host_end = f"v{uuid.uuid4().hex[:10]}"
        run(["ip", "netns", "add", namespace])
        self.clients.append(namespace)
        run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", namespace])
        run(["ip", "link", "set", host_end, "netns", self.namespace])
        run(["ip", "-n", self.namespace, "link", "set", host_end, "master", BRIDGE, "up"])
        run(["ip", "-n", namespace, "link", "set", "eth0", "address", mac])
        run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        return namespace

    def add_tap(self, name: str) -> str:
        """A tap on the PXE bridge for a qemu guest (-netdev tap,ifname=<name>); qemu must run in the namespace."""
        run(["ip", "-n", self.namespace, "tuntap", "add", "dev", name, "mode", "tap"])
        run(["ip", "-n", self.namespace, "link", "set", name, "master", BRIDGE, "up"])
        return name

    def stop_process(self, name: str) -> None:
        """Stop one started process (and its children), if it still runs."""
        proc = self.processes.pop(name, None)
        if proc is not None:
            _stop_groups([proc])

    def stop(self) -> None:
        _stop_groups(list(reversed(self.processes.values())))
        self.processes.clear()


def _stop_groups(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each process group, then SIGKILL to whichever is still there after 10 s."""
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def pxe_network(site: Site, log_dir: Path) -> Iterator[PxeNetwork]:
    """The server's namespace with the bridge at site.server; services started by the caller."""
    namespace = f"p2v-pxe-{uuid.uuid4().hex[:8]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    run(["ip", "netns", "add", namespace])
    net = PxeNetwork(site=site, namespace=namespace, log_dir=log_dir)
    try:
        run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        run(["ip", "-n", namespace, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", namespace, "addr", "add", f"{site.server}/{site.network.prefixlen}", "dev", BRIDGE])
        run(["ip", "-n", namespace, "link", "set", BRIDGE, "up"])
        yield net
    finally:
        net.stop()
        for client in net.clients:
            run(["ip", "netns", "del", client], check=False)
        run(["ip", "netns", "del", namespace], check=False)


def start_services(net: PxeNetwork, deploy_dir: Path) -> None:
    """dnsmasq, the HTTP server and nfs-ganesha, each with the deploy tree's configuration."""
    site = net.site
    net.start("dnsmasq", ["dnsmasq", "--keep-in-foreground", f"--conf-file={deploy_dir / 'dnsmasq.conf'}",
                          f"--pid-file={net.log_dir / 'dnsmasq.pid'}", f"--dhcp-leasefile={net.log_dir / 'leases'}",
                          "--log-facility=-", "--user=root", "--group=root"])
    net.start("http", ["python3", "-m", "http.server", "--bind", str(site.server), str(site.http_port),
                       "--directory", str(deploy_dir / "http")], ready_port=site.http_port)
    net.start("ganesha", ["ganesha.nfsd", "-F", "-f", str(deploy_dir / "ganesha.conf"),
                          "-L", str(net.log_dir / "ganesha.log"), "-p", str(net.log_dir / "ganesha.pid")],
              ready_port=2049)
    _wait_udp(net, 67)


def _wait_udp(net: PxeNetwork, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if net.exec(["ss", "-Huln", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on UDP port {port} after {timeout:.0f} s; see {net.log_dir}")


