"""The virtual machine Nova boots an image on, decided from the image's properties (pure).

Nova's libvirt driver on x86_64 starts an instance on the i440fx machine
(`pc`) with SeaBIOS, unless the image's properties say otherwise:
`hw_machine_type` names the machine (`q35`, or a versioned `pc-i440fx-*` /
`pc-q35-*`), `hw_firmware_type=uefi` asks for UEFI (OVMF). A UEFI image gets
`hw_machine_type=q35` as well: Nova refuses secure boot and OVMF's SMM builds
on i440fx, and q35 is what every UEFI guest is tested on.

The upload stage sends these properties (`machine_properties`) and the verify
stage boots on what they imply (`boot_machine`): one decision, so the image is
proven on the machine it will run on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from tasks.lib.runner import P2VError

MachineType = Literal["pc", "q35"]
Firmware = Literal["bios", "uefi"]

NOVA_DEFAULT_MACHINE: MachineType = "pc"
MACHINE_PROPERTY = "hw_machine_type"
FIRMWARE_PROPERTY = "hw_firmware_type"


@dataclass(frozen=True)
class BootMachine:
    """The qemu machine family and firmware an image boots with, and the property that chose the machine."""

    machine: MachineType
    firmware: Firmware
    hw_machine_type: str | None  # the image property as sent to Glance; None: Nova's default (pc)

    def to_json(self) -> dict[str, Any]:
        return {"machine_type": self.machine, "firmware": self.firmware,
                "hw_machine_type": self.hw_machine_type or f"(unset: Nova's default, {NOVA_DEFAULT_MACHINE})"}


def machine_properties(firmware: str, spec_properties: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """`hw_firmware_type` and `hw_machine_type` as the image will carry them.

    p2v's own choice for the plan's firmware, then whatever the spec's
    glance.properties set (they win, as they do in the upload). Values that
    p2v could not boot the way Nova would are refused here, before any work.
    """
    props: dict[str, str] = {FIRMWARE_PROPERTY: "uefi", MACHINE_PROPERTY: "q35"} if firmware == "uefi" else {}
    for key, value in spec_properties:
        if key in (FIRMWARE_PROPERTY, MACHINE_PROPERTY):
            props[key] = value
    if props.get(FIRMWARE_PROPERTY, "bios") not in ("bios", "uefi"):
        raise P2VError(f"glance.properties.{FIRMWARE_PROPERTY}: expected bios or uefi, got "
                       f"{props[FIRMWARE_PROPERTY]!r}")
    if MACHINE_PROPERTY in props:
        _machine_family(props[MACHINE_PROPERTY])
    return props


def _machine_family(value: str) -> MachineType:
    if value == "q35" or re.fullmatch(r"pc-q35-[0-9.]+", value):
        return "q35"
    if value == "pc" or re.fullmatch(r"pc-i440fx-[0-9.]+", value):
        return "pc"
    raise P2VError(f"glance.properties.{MACHINE_PROPERTY}: {value!r} is not a machine p2v can boot the image on "
                   "to verify it", hint="use pc or q35 (or a versioned pc-i440fx-* / pc-q35-*)")


def boot_machine(firmware: str, spec_properties: Iterable[tuple[str, str]] = ()) -> BootMachine:
    """The machine Nova will start the image on: what the verify stage boots."""
    props = machine_properties(firmware, spec_properties)
    chosen = props.get(MACHINE_PROPERTY)
    machine = _machine_family(chosen) if chosen else NOVA_DEFAULT_MACHINE
    boots: Firmware = "uefi" if props.get(FIRMWARE_PROPERTY) == "uefi" else "bios"
    return BootMachine(machine=machine, firmware=boots, hw_machine_type=chosen)
