"""The KVM probe, for real: on this kind of machine /dev/kvm exists but hangs guests, and
the probe must say TCG (and why) instead of hanging; a forced choice is said as such."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib.accel import Accel, choose_accel
from tasks.lib.runner import run
from tests.fixtures.description import BASE_PACKAGES
from tests.fixtures.rootfs import ensure_rootfs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Debian kernel to boot: the fixture servers' bookworm one."""
    tmp = tmp_path_factory.mktemp("accel")
    tarball = ensure_rootfs("bookworm", [*BASE_PACKAGES, "initramfs-tools"])
    run(["tar", "--zstd", "-xf", str(tarball), "-C", str(tmp), "--wildcards", "./boot/vmlinuz-*"])
    yield sorted((tmp / "boot").glob("vmlinuz-*"))[-1]


def test_the_probe_answers_within_its_timeout(kernel: Path, tmp_path: Path) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm on this machine: the probe is not run (TCG, said so)")
    cache = tmp_path / "accel.json"
    chosen = choose_accel(kernel, cache=cache)
    # Either KVM really runs guests (a real server), or the reason says why not.
    if chosen.name == "kvm":
        assert "booted its kernel" in chosen.reason
    else:
        assert chosen.reason.startswith(("a KVM guest did not get", "KVM does not run guests here")), chosen
    assert cache.is_file()
    again = choose_accel(kernel, cache=cache)
    assert again.name == chosen.name and again.reason.endswith("(probed earlier in this boot)")


def test_a_forced_choice_is_said_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2V_ACCEL", "tcg")
    assert choose_accel(cache=tmp_path / "none.json") == Accel("tcg", "P2V_ACCEL=tcg")
    assert not (tmp_path / "none.json").exists()
    assert Accel("tcg", "").qemu_args() == ["-accel", "tcg,thread=multi", "-cpu", "max"]
