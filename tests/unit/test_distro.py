"""Distro families (tasks.lib.distro): which family a source is, and what each answers (pure)."""

from __future__ import annotations

import copy
import pkgutil
from dataclasses import dataclass, replace
from typing import Any

import pytest

import tasks.lib.distro as distro
from tasks.lib.distro import EL6, EL7, FAMILIES, Debian, EL8Plus, Family, Other, Ubuntu, pick_family
from tasks.lib.fixes import bootloader_install_commands, describe, initrd_commands, service_commands
from tasks.lib.fixes.initrd import initrd_path
from tasks.lib.fixes.network import dhcp_style
from tasks.lib.packages import AptTooling, RpmTooling
from tasks.lib.source.model import NetStyle, OSIdentity
from tasks.lib.spec import FixPolicy
from tests.unit.fix_layouts import completed_plan
from tests.unit.layouts import layout


def os_identity(family: str, id: str, major: int | None, id_like: tuple[str, ...] = ()) -> OSIdentity:
    return OSIdentity(family=family, id=id, version=None if major is None else str(major),  # type: ignore[arg-type]
                      major=major, minor=None, pretty_name=None, codename=None, id_like=id_like, sources=())


@pytest.mark.parametrize(("family", "id", "major", "expected"), [
    ("debian", "debian", 12, "debian"),
    ("debian", "debian", None, "debian"),
    ("debian", "ubuntu", 22, "ubuntu"),
    ("debian", "ubuntu", 10, "ubuntu"),
    ("debian", "linuxmint", 21, "debian"),  # a derivative of Ubuntu's is judged as Debian's, as before families
    ("debian", "devuan", 4, "debian"),
    ("rhel", "centos", 6, "el6"),
    ("rhel", "rhel", 5, "el6"),
    ("rhel", "centos", None, "el6"),  # an EL of unknown version: the oldest
    ("rhel", "amzn", 2, "el6"),
    ("rhel", "centos", 7, "el7"),
    ("rhel", "rocky", 8, "el8+"),
    ("rhel", "rhel", 9, "el8+"),
    ("rhel", "almalinux", 10, "el8+"),
    ("rhel", "fedora", 40, "el8+"),
    ("unknown", "opensuse-leap", 15, "other"),
    ("unknown", "unknown", None, "other"),
])
def test_the_family_is_picked_from_the_os_identity(family: str, id: str, major: int | None, expected: str) -> None:
    picked = pick_family(os_identity(family, id, major))
    assert picked.name == expected
    assert picked.os.id == id


def test_a_recorded_layout_and_its_family() -> None:
    assert isinstance(pick_family(describe(layout("plain-bookworm")).os), Debian)


def test_every_family_module_is_registered_once_with_its_own_name() -> None:
    modules = {m.name for m in pkgutil.iter_modules(distro.__path__)} - {"base", "other"}
    registered = {family.__module__.rsplit(".", 1)[1] for family in FAMILIES}
    assert registered == modules
    everyone: list[type[Family]] = [*FAMILIES, Other]
    names = [family.name for family in everyone]
    assert len(names) == len(set(names))
    assert all(issubclass(family, Family) for family in FAMILIES)


KERNEL = "6.1.0-50-amd64"


@pytest.mark.parametrize(("family", "grub", "debconf", "image", "sysv"), [
    (Debian(os_identity("debian", "debian", 12)), "grub-install", True, f"/boot/initrd.img-{KERNEL}",
     ["update-rc.d", "hp-health", "disable"]),
    (Ubuntu(os_identity("debian", "ubuntu", 22)), "grub-install", True, f"/boot/initrd.img-{KERNEL}",
     ["update-rc.d", "hp-health", "disable"]),
    (EL6(os_identity("rhel", "centos", 6)), "grub2-install", False, f"/boot/initramfs-{KERNEL}.img",
     ["chkconfig", "hp-health", "off"]),
    (EL7(os_identity("rhel", "centos", 7)), "grub2-install", False, f"/boot/initramfs-{KERNEL}.img",
     ["chkconfig", "hp-health", "off"]),
    (EL8Plus(os_identity("rhel", "rhel", 9)), "grub2-install", False, f"/boot/initramfs-{KERNEL}.img",
     ["chkconfig", "hp-health", "off"]),
    (Other(os_identity("unknown", "arch", None)), "grub2-install", False, f"/boot/initrd.img-{KERNEL}",
     ["chkconfig", "hp-health", "off"]),
])
def test_each_familys_constant_answers(family: Family, grub: str, debconf: bool, image: str,
                                       sysv: list[str]) -> None:
    assert family.grub_tool("install") == grub
    assert family.grub_dir == "/boot/" + grub.removesuffix("-install")
    assert family.grub_pc_debconf is debconf
    kernel = describe(layout("plain-bookworm")).kernels[0]
    assert family.initrd_path(replace(kernel, version=KERNEL, initrd=None)) == image
    assert family.initrd_path(kernel) == kernel.initrd  # the kernel's own initrd wins
    assert family.disable_service("hp-health.service", systemd=False) == sysv
    assert family.disable_service("hp-health.service", systemd=True) == ["systemctl", "disable", "hp-health.service"]
    assert family.efi_vendor() == family.os.id
    assert family.dhcp_file("ifcfg", "web01")[0] == "/etc/sysconfig/network-scripts/ifcfg-eth0"
    assert family.interface_files(["/etc/network/interfaces", "/etc/sysconfig/network"]) == ["/etc/network/interfaces"]


@pytest.mark.parametrize(("os", "systemd", "style"), [
    (os_identity("debian", "debian", 7), False, "ifupdown"),
    (os_identity("debian", "debian", 8), True, "ifupdown"),
    (os_identity("debian", "devuan", 12), False, "ifupdown"),  # its numbers are not Debian's: the tree tells
    (os_identity("debian", "ubuntu", 14), False, "ifupdown"),
    (os_identity("debian", "ubuntu", 16), True, "ifupdown"),
    (os_identity("rhel", "centos", 6), False, "ifcfg"),
    (os_identity("rhel", "centos", 7), True, "ifcfg"),
    (os_identity("rhel", "rocky", 8), True, "ifcfg"),
    (os_identity("rhel", "rhel", 9), True, "NetworkManager"),
    (os_identity("unknown", "arch", 2024), False, "ifupdown"),
])
def test_answers_that_depend_on_the_release(os: OSIdentity, systemd: bool, style: NetStyle) -> None:
    family = pick_family(os)
    assert family.systemd_by_release() is systemd
    assert family.default_network_style() == style


def _system(**changes: Any) -> Any:
    lay = copy.deepcopy(layout("plain-bookworm"))
    for key, value in changes.items():
        lay["system"][key] = value
    return lay, describe(lay)


def test_packages_selinux_and_initrd_tools_follow_what_inspect_found() -> None:
    _, apt = _system()
    assert pick_family(apt.os).packaging(apt) == AptTooling()
    _, dnf = _system(package_manager="dnf")
    assert pick_family(dnf.os).packaging(dnf) == RpmTooling("dnf")
    assert RpmTooling("dnf").installed_query("cloud-init") == ("rpm", "-q", "cloud-init")
    assert AptTooling().is_installed(0, "installed") and not AptTooling().is_installed(0, "config-files")
    family = pick_family(apt.os)
    assert apt.selinux == "disabled" and family.relabel_marker(apt) is None
    _, enforcing = _system(selinux="enforcing")
    assert family.relabel_marker(enforcing) == "/.autorelabel"
    assert family.initrd_lister(apt) == "lsinitramfs"
    _, old_dracut = _system(initrd={**apt.to_json()["initrd"], "tool": "dracut", "version": "004"})
    (argv,) = family.initrd_commands(old_dracut, old_dracut.kernels[0], ("virtio_blk",))
    assert argv[:2] == ["dracut", "-f"] and "--no-hostonly" not in argv  # dracut 004 knows no such flag
    assert family.initrd_lister(old_dracut) == "lsinitrd"


@dataclass(frozen=True)
class Suse(Family):
    """A family defined in one place, as a new module would: the planners take its answers."""

    name = "suse"
    grub_prefix = "grub2"
    grub_pc_debconf = False
    initrd_image = "/boot/initrd-{kernel}"

    @classmethod
    def matches(cls, os: OSIdentity) -> bool:
        return os.id in ("sles", "opensuse-leap") or "suse" in os.id_like

    def systemd_by_release(self) -> bool:
        return True

    def default_network_style(self) -> NetStyle:
        return "NetworkManager"

    def sysv_disable(self, service: str) -> list[str]:
        return ["insserv", "-r", service]


def test_a_new_family_is_one_class_and_its_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    lay = copy.deepcopy(layout("plain-bookworm"))
    lay["system"]["os"].update(family="unknown", id="opensuse-leap", id_like=["suse", "opensuse"], major=15)
    lay["system"]["kernels"][0]["initrd"] = None
    lay["system"]["initrd"]["tool"] = "dracut"
    lay["system"]["network"]["styles"] = []
    system = describe(lay)
    assert pick_family(system.os).name == "other"
    monkeypatch.setattr(distro, "FAMILIES", (Suse, *FAMILIES))
    assert pick_family(system.os).name == "suse"
    kernel = system.kernels[0].version
    assert initrd_path(system, kernel) == f"/boot/initrd-{kernel}"
    assert initrd_commands(lay, kernel) == [["dracut", "-f", "--no-hostonly", "--no-hostonly-cmdline", "--add-drivers",
                                             "virtio_blk virtio_scsi virtio_pci virtio_net", f"/boot/initrd-{kernel}",
                                             kernel]]
    assert bootloader_install_commands(lay, completed_plan(lay), "/dev/loop7")[0].argv[0] == "grub2-install"
    assert dhcp_style(system) == "NetworkManager"
    policy = FixPolicy(remove_services=("hp-health.service",))
    assert service_commands(lay, policy, has_systemd=False)[0][0] == ["insserv", "-r", "hp-health"]
