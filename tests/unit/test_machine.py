"""Which machine Nova boots an image on, and so what verify boots (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from tasks import upload
from tasks.lib.machine import BootMachine, boot_machine, machine_properties
from tasks.lib.plan import plan_disk
from tasks.lib.runner import P2VError
from tasks.lib.spec import GlancePolicy
from tests.unit.layouts import layout
from tests.unit.test_upload_planning import PROVENANCE, make_spec


def test_bios_boots_on_novas_default_i440fx() -> None:
    assert machine_properties("bios") == {}
    assert boot_machine("bios") == BootMachine(machine="pc", firmware="bios", hw_machine_type=None)
    assert boot_machine("bios").to_json() == {"machine_type": "pc", "firmware": "bios",
                                              "hw_machine_type": "(unset: Nova's default, pc)"}


def test_uefi_asks_for_q35_and_boots_ovmf_on_it() -> None:
    assert machine_properties("uefi") == {"hw_firmware_type": "uefi", "hw_machine_type": "q35"}
    assert boot_machine("uefi") == BootMachine(machine="q35", firmware="uefi", hw_machine_type="q35")


@pytest.mark.parametrize(("firmware", "properties", "expected"), [
    ("bios", [("hw_machine_type", "q35")], ("q35", "bios")),
    ("bios", [("hw_machine_type", "pc-q35-7.2")], ("q35", "bios")),
    ("uefi", [("hw_machine_type", "pc-i440fx-7.2")], ("pc", "uefi")),
    ("bios", [("hw_firmware_type", "uefi")], ("pc", "uefi")),
    ("bios", [("owner_team", "web")], ("pc", "bios")),
])
def test_the_specs_properties_decide_as_they_do_in_glance(firmware: str, properties: list[tuple[str, str]],
                                                          expected: tuple[str, str]) -> None:
    chosen = boot_machine(firmware, properties)
    assert (chosen.machine, chosen.firmware) == expected


@pytest.mark.parametrize("properties", [[("hw_machine_type", "microvm")], [("hw_firmware_type", "efi")]])
def test_a_machine_p2v_cannot_boot_is_refused(properties: list[tuple[str, str]]) -> None:
    with pytest.raises(P2VError, match=r"glance\.properties\.hw_"):
        boot_machine("bios", properties)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
@pytest.mark.parametrize("properties", [(), (("hw_machine_type", "pc-q35-7.2"),), (("hw_firmware_type", "uefi"),)])
def test_upload_sends_the_properties_verify_booted_on(firmware: str, properties: tuple[tuple[str, str], ...]) -> None:
    lay = layout("plain-bookworm")
    plan = dataclasses.replace(plan_disk(lay, make_spec()), firmware=firmware)
    sent = dict(upload.image_request(lay, plan, GlancePolicy(properties=properties), "web01", "raw",
                                     PROVENANCE).properties)
    booted = boot_machine(firmware, properties)
    assert sent.get("hw_machine_type") == booted.hw_machine_type
    assert sent.get("hw_firmware_type", "bios") == booted.firmware
