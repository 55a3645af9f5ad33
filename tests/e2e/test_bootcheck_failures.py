"""The boot checker's failure path: a disk that never boots is a clear error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.lib.bootcheck import BootCheckError, boot_check


def test_timeout_names_what_it_waited_for_and_shows_the_serial_tail(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as handle:
        handle.truncate(16 << 20)
    before = blank.read_bytes()
    with pytest.raises(BootCheckError) as caught:
        boot_check([blank], ["true"], timeout=15, serial_log=tmp_path / "serial.log")
    message = str(caught.value)
    assert "timed out after 15 s waiting for the login: prompt" in message
    assert f"serial log tail ({tmp_path / 'serial.log'})" in message
    assert blank.read_bytes() == before  # -snapshot: never written
    leftovers = subprocess.run(["pgrep", "-f", str(blank)], capture_output=True, text=True, check=False)
    assert leftovers.stdout == ""  # qemu is gone
