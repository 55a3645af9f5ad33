"""tasks.lib.system: the parsers on text, describe_system on synthetic trees, and
that nothing outside the tree is ever read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tasks.lib import system
from tasks.lib.system import (
    BootEntry,
    Interface,
    Link,
    MacBinding,
    Route,
    SourceTree,
    SystemDescription,
    describe_system,
)
from tests.fixtures import synthetic
from tests.fixtures.synthetic import CENTOS6, CENTOS7, DEBIAN12, RHEL9, SYNTHETIC_TREES, UBUNTU, write_tree

# ---------------------------------------------------------------------------
# Synthetic trees: built and described once per module
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SystemDescription]:
    base = tmp_path_factory.mktemp("trees")
    out = {}
    for name in SYNTHETIC_TREES:
        write_tree(name, base / name)
        out[name] = describe_system(base / name)
    return out


def _iface(name: str, style: str, file: str, **values: object) -> Interface:
    defaults: dict[str, object] = {
        "kind": "ethernet",
        "method": "none",
        "addresses": (),
        "gateway": None,
        "routes": (),
        "dns": (),
        "onboot": None,
        "master": None,
        "members": (),
        "bond_mode": None,
        "bond_options": (),
        "vlan_id": None,
        "vlan_parent": None,
        "profile": None,
    }
    return Interface(name=name, style=style, file=file, **{**defaults, **values})  # type: ignore[arg-type]


def _virtio(state: str) -> dict[str, str]:
    return {name: state for name in ("virtio_blk", "virtio_net", "virtio_pci", "virtio_scsi")}


def test_every_tree_describes_without_warnings(described):
    assert set(described) == set(SYNTHETIC_TREES)
    for name, description in described.items():
        assert description.warnings == (), name


def test_unknown_tree_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic tree"):
        write_tree("slackware", tmp_path)


# --- centos6 ------------------------------------------------------------------

SCRIPTS = "/etc/sysconfig/network-scripts"


def test_centos6_identity_and_basics(described):
    d = described["centos6"]
    assert d.to_json()["os"] == {
        "family": "rhel",
        "id": "centos",
        "version": "6.10",
        "major": 6,
        "minor": 10,
        "pretty_name": "CentOS release 6.10 (Final)",
        "codename": None,
        "id_like": [],
        "sources": ["/etc/centos-release"],
    }
    assert d.hostname == CENTOS6.hostname  # from /etc/sysconfig/network
    assert (d.selinux, d.selinux_type) == ("enforcing", "targeted")
    assert d.package_manager == "yum"
    assert d.machine_id == "missing"
    assert d.merged_usr is False
    assert d.cloud_init.installed is False
    assert d.qemu_guest_agent is False


def test_centos6_kernels_and_initrd(described):
    d = described["centos6"]
    kernels = d.to_json()["kernels"]
    assert [k["version"] for k in kernels] == list(CENTOS6.kernels)
    assert kernels[0] == {
        "version": "2.6.32-754.el6.x86_64",
        "vmlinuz": "/boot/vmlinuz-2.6.32-754.el6.x86_64",
        "initrd": "/boot/initramfs-2.6.32-754.el6.x86_64.img",
        "config": "/boot/config-2.6.32-754.el6.x86_64",
        "modules_dir": "/lib/modules/2.6.32-754.el6.x86_64",
        "debug": False,
        "rescue": False,
        "virtio": _virtio("module"),
    }
    assert d.to_json()["initrd"] == {
        "tool": "dracut",
        "tools": ["dracut", "mkinitrd"],
        "paths": ["/sbin/dracut", "/sbin/mkinitrd"],
        "version": "004-411.el6",
        "dracut_hostonly": None,
        "initramfs_modules": None,
    }


def test_centos6_grub_legacy(described):
    boot = described["centos6"].bootloader
    assert boot.kind == "grub-legacy"
    assert boot.firmware == "bios"
    assert boot.config_path == "/boot/grub/grub.conf"
    assert boot.esp_mountpoint is None
    assert boot.configs == ("/boot/grub/grub.conf",)
    assert boot.links == (
        Link("/etc/grub.conf", "/boot/grub/grub.conf"),
        Link("/boot/grub/menu.lst", "/boot/grub/grub.conf"),
    )
    assert boot.defaults_file is None  # /etc/sysconfig/grub here is anaconda's, not grub2's defaults
    assert (boot.default, boot.default_index, boot.default_kernel) == ("0", 0, "2.6.32-754.el6.x86_64")
    args = tuple(synthetic.CENTOS6_CMDLINE.split())
    assert args[:2] == ("ro", "root=/dev/mapper/VolGroup-lv_root")
    assert "rd_LVM_LV=VolGroup/lv_root" in args
    assert boot.entries == tuple(
        BootEntry(
            title=f"CentOS 6 ({kver})",
            id=None,
            kernel=f"/vmlinuz-{kver}",
            kernel_version=kver,
            initrd=f"/initramfs-{kver}.img",
            args=args,
            grub_root="(hd0,0)",
            source="/boot/grub/grub.conf",
        )
        for kver in CENTOS6.kernels
    )


def test_centos6_network(described):
    net = described["centos6"].network
    assert net.styles == ("ifcfg",)
    assert net.gateway == "192.0.2.1"
    assert net.interfaces == (
        _iface(
            "bond0",
            "ifcfg",
            f"{SCRIPTS}/ifcfg-bond0",
            kind="bond",
            method="static",
            addresses=("192.0.2.10/24",),
            dns=("192.0.2.53", "192.0.2.54"),
            onboot=True,
            members=("eth0", "eth1"),
            bond_mode="active-backup",
            bond_options=("mode=active-backup", "miimon=100"),
        ),
        _iface(
            "bond0.100",
            "ifcfg",
            f"{SCRIPTS}/ifcfg-bond0.100",
            kind="vlan",
            method="static",
            addresses=("10.100.0.10/24",),
            routes=(Route("10.200.0.0/16", "10.100.0.1", None),),
            onboot=True,
            vlan_id=100,
            vlan_parent="bond0",
        ),
        _iface("eth0", "ifcfg", f"{SCRIPTS}/ifcfg-eth0", onboot=True, master="bond0"),
        _iface("eth1", "ifcfg", f"{SCRIPTS}/ifcfg-eth1", onboot=True, master="bond0"),
        _iface("eth2", "ifcfg", f"{SCRIPTS}/ifcfg-eth2", method="dhcp", onboot=False),
    )
    rules = "/etc/udev/rules.d/70-persistent-net.rules"
    macs = {name: mac.lower() for name, mac in CENTOS6.macs.items()}
    assert net.mac_bindings == (
        MacBinding(f"{SCRIPTS}/ifcfg-eth0", macs["eth0"], "eth0", "HWADDR", "match"),
        MacBinding(f"{SCRIPTS}/ifcfg-eth1", macs["eth1"], "eth1", "HWADDR", "match"),
        MacBinding(f"{SCRIPTS}/ifcfg-eth2", macs["eth2"], "eth2", "HWADDR", "match"),
        MacBinding(rules, macs["eth0"], "eth0", "udev-rule", "match"),
        MacBinding(rules, macs["eth1"], "eth1", "udev-rule", "match"),
        MacBinding(rules, macs["eth2"], "eth2", "udev-rule", "match"),
    )
    # ifcfg-eth0.bak is ignored, as initscripts ignore it
    assert f"{SCRIPTS}/ifcfg-eth0.bak" not in net.files
    assert "/etc/sysconfig/network" in net.files


# --- centos7 ------------------------------------------------------------------


def test_centos7_identity_and_basics(described):
    d = described["centos7"]
    assert (d.os.family, d.os.id, d.os.version, d.os.major, d.os.minor) == ("rhel", "centos", "7.9", 7, 9)
    assert d.os.pretty_name == "CentOS Linux 7 (Core)"
    assert d.os.id_like == ("rhel", "fedora")
    assert d.os.sources == ("/etc/os-release", "/etc/centos-release")
    assert d.hostname == CENTOS7.hostname
    assert d.machine_id == "present"
    assert d.merged_usr is True
    assert d.qemu_guest_agent is True
    assert (d.selinux, d.package_manager) == ("enforcing", "yum")


def test_centos7_kernels(described):
    d = described["centos7"]
    kver = CENTOS7.kernels[0]
    rescue = f"0-rescue-{CENTOS7.machine_id}"
    assert [k.version for k in d.kernels] == [*CENTOS7.kernels, rescue]
    newest = d.to_json()["kernels"][0]
    assert newest == {
        "version": kver,
        "vmlinuz": f"/boot/vmlinuz-{kver}",
        "initrd": f"/boot/initramfs-{kver}.img",
        "config": f"/boot/config-{kver}",
        "modules_dir": f"/usr/lib/modules/{kver}",  # /lib -> usr/lib, resolved inside the tree
        "debug": False,
        "rescue": False,
        "virtio": _virtio("module"),  # .ko.xz files
    }
    last = d.kernels[-1]
    assert (last.rescue, last.modules_dir, last.config) == (True, None, None)
    assert last.virtio == system.VirtioSupport("unknown", "unknown", "unknown", "unknown")
    assert system.preferred_kernel(d.kernels) == d.kernels[0]
    assert d.initrd.tool == "dracut"
    assert d.initrd.tools == ("dracut", "mkinitrd")
    assert d.initrd.paths == ("/usr/sbin/dracut", "/usr/sbin/mkinitrd")
    assert (d.initrd.version, d.initrd.dracut_hostonly) == ("033-572.el7", True)


def test_centos7_grub2(described):
    boot = described["centos7"].bootloader
    assert (boot.kind, boot.firmware, boot.bls) == ("grub2", "bios", False)
    assert boot.config_path == "/boot/grub2/grub.cfg"
    assert boot.configs == ("/boot/grub2/grub.cfg",)
    assert boot.defaults_file == "/etc/default/grub"
    assert boot.links == (
        Link("/etc/grub2.cfg", "/boot/grub2/grub.cfg"),
        Link("/etc/sysconfig/grub", "/etc/default/grub"),
    )
    assert boot.cmdline_linux == tuple(synthetic.CENTOS7_ARGS.split())
    assert boot.cmdline_linux_default == ()
    assert boot.defaults["GRUB_DEFAULT"] == "saved"
    assert boot.defaults["GRUB_DISTRIBUTOR"] == "$(sed 's, release .*$,,g' /etc/system-release)"
    assert boot.grubenv_file == "/boot/grub2/grubenv"
    assert boot.grubenv == {"saved_entry": f"CentOS Linux ({CENTOS7.kernels[0]}) 7 (Core)"}
    assert boot.default == f"CentOS Linux ({CENTOS7.kernels[0]}) 7 (Core)"
    assert (boot.default_index, boot.default_kernel) == (0, CENTOS7.kernels[0])
    rescue = f"0-rescue-{CENTOS7.machine_id}"
    args = ("root=/dev/mapper/centos-root", "ro", *synthetic.CENTOS7_ARGS.split())
    assert boot.entries == tuple(
        BootEntry(
            title=f"CentOS Linux ({kver}) 7 (Core)",
            id=f"gnulinux-{kver}-advanced-6d2a9b0c-1e3f-4a5b-8c7d-9e0f1a2b3c4d",
            kernel=f"/vmlinuz-{kver}",
            kernel_version=kver,
            initrd=f"/initramfs-{kver}.img",
            args=args,
            grub_root="hd0,msdos1",
            source="/boot/grub2/grub.cfg",
        )
        for kver in (*CENTOS7.kernels, rescue)
    )


def test_centos7_network(described):
    net = described["centos7"].network
    assert net.styles == ("ifcfg",)
    assert net.gateway is None
    assert net.interfaces == (
        _iface(
            "eth0",
            "ifcfg",
            f"{SCRIPTS}/ifcfg-eth0",
            method="static",
            addresses=("198.51.100.20/24",),
            gateway="198.51.100.1",
            routes=(
                Route("10.10.0.0/16", "198.51.100.254", None),
                Route("172.16.5.0/24", "198.51.100.253", 200),
            ),
            dns=("198.51.100.53", "198.51.100.54"),
            onboot=True,
            profile="eth0",
        ),
        _iface("eth1", "ifcfg", f"{SCRIPTS}/ifcfg-eth1", method="dhcp", onboot=False, profile="eth1"),
    )
    rules = "/etc/udev/rules.d/70-persistent-net.rules"
    assert net.mac_bindings == (
        MacBinding(f"{SCRIPTS}/ifcfg-eth0", "ac:1f:6b:01:02:03", "eth0", "HWADDR", "match"),
        MacBinding(f"{SCRIPTS}/ifcfg-eth1", "ac:1f:6b:01:02:04", "eth1", "HWADDR", "match"),
        MacBinding(rules, "ac:1f:6b:01:02:03", "eth0", "udev-rule", "match"),
        MacBinding(rules, "ac:1f:6b:01:02:04", "eth1", "udev-rule", "match"),
    )
    assert f"{SCRIPTS}/route-eth0" in net.files


# --- rhel9-nm -----------------------------------------------------------------


def test_rhel9_identity_kernels_initrd(described):
    d = described["rhel9-nm"]
    assert (d.os.family, d.os.id, d.os.version, d.os.id_like) == ("rhel", "rhel", "9.3", ("fedora",))
    assert d.os.pretty_name == "Red Hat Enterprise Linux 9.3 (Plow)"
    assert (d.hostname, d.selinux, d.package_manager) == (RHEL9.hostname, "enforcing", "dnf")
    rescue = f"0-rescue-{RHEL9.machine_id}"
    assert [k.version for k in d.kernels] == [*RHEL9.kernels, rescue]
    assert [k.debug for k in d.kernels] == [True, False, False, False]
    mixed = {"virtio_blk": "builtin", "virtio_pci": "builtin", "virtio_net": "module", "virtio_scsi": "module"}
    for kernel in d.to_json()["kernels"][:3]:
        assert kernel["virtio"] == mixed
        assert kernel["modules_dir"] == f"/usr/lib/modules/{kernel['version']}"
    # the debug kernel sorts newest, the preferred one is not debug
    assert system.preferred_kernel(d.kernels).version == "5.14.0-362.8.1.el9_3.x86_64"  # type: ignore[union-attr]
    assert d.initrd == system.InitrdTooling(
        tool="dracut",
        tools=("dracut",),
        paths=("/usr/bin/dracut",),
        version="057-44.git20230822.el9",
        dracut_hostonly=True,
        initramfs_modules=None,
    )


def test_rhel9_bls_on_uefi(described):
    boot = described["rhel9-nm"].bootloader
    mid = RHEL9.machine_id
    assert (boot.kind, boot.firmware, boot.bls) == ("grub2", "uefi", True)
    assert boot.config_path == "/boot/grub2/grub.cfg"  # the ESP's grub.cfg is a stub that loads it
    assert boot.esp_mountpoint == "/boot/efi"
    assert boot.configs == ("/boot/efi/EFI/redhat/grub.cfg", "/boot/grub2/grub.cfg")
    assert boot.efi_binaries == (
        "/boot/efi/EFI/BOOT/BOOTX64.EFI",
        "/boot/efi/EFI/redhat/grubx64.efi",
        "/boot/efi/EFI/redhat/shim.efi",
        "/boot/efi/EFI/redhat/shimx64.efi",
    )
    assert boot.links == (
        Link("/etc/grub2.cfg", "/boot/grub2/grub.cfg"),
        Link("/etc/grub2-efi.cfg", "/boot/grub2/grub.cfg"),
    )
    options = tuple(synthetic.RHEL9_OPTIONS.split())
    assert boot.kernel_cmdline == options
    assert boot.cmdline_linux == options[2:]  # root= and ro come from grub2-mkconfig
    assert boot.defaults["GRUB_ENABLE_BLSCFG"] == "true"
    assert boot.grubenv == {
        "saved_entry": f"{mid}-5.14.0-362.8.1.el9_3.x86_64",
        "menu_auto_hide": "1",
        "boot_success": "0",
    }
    assert [e.id for e in boot.entries] == [
        f"{mid}-5.14.0-362.8.1.el9_3.x86_64+debug",
        f"{mid}-5.14.0-362.8.1.el9_3.x86_64",
        f"{mid}-5.14.0-284.11.1.el9_2.x86_64",
        f"{mid}-0-rescue",
        "uefi-firmware",  # after blscfg in grub.cfg, so after the BLS entries
    ]
    kver = "5.14.0-362.8.1.el9_3.x86_64"
    assert boot.entries[1] == BootEntry(
        title=f"Red Hat Enterprise Linux ({kver}) 9.3 (Plow)",
        id=f"{mid}-{kver}",
        kernel=f"/vmlinuz-{kver}",
        kernel_version=kver,
        initrd=f"/initramfs-{kver}.img",
        args=(*options, "$tuned_params"),
        grub_root=None,
        source=f"/boot/loader/entries/{mid}-{kver}.conf",
    )
    assert system.expand_grub_vars(boot.entries[1].args, boot.grubenv) == options
    assert (boot.default, boot.default_index, boot.default_kernel) == (f"{mid}-{kver}", 1, kver)


def test_rhel9_network_manager(described):
    net = described["rhel9-nm"].network
    nm = "/etc/NetworkManager/system-connections"
    assert net.styles == ("NetworkManager",)
    assert net.interfaces == (
        _iface(
            "bond0",
            "NetworkManager",
            f"{nm}/bond0.nmconnection",
            kind="bond",
            method="static",
            addresses=("198.18.0.30/24",),
            onboot=True,
            members=("ens4f0", "ens4f1"),
            bond_mode="802.3ad",
            bond_options=("miimon=100", "mode=802.3ad", "xmit_hash_policy=layer3+4"),
            profile="bond0",
        ),
        _iface(
            "bond0.200",
            "NetworkManager",
            f"{nm}/vlan-bond0.200.nmconnection",
            kind="vlan",
            method="static",
            addresses=("10.200.0.30/24",),
            onboot=True,
            vlan_id=200,
            vlan_parent="bond0",  # the keyfile names the parent by UUID
            profile="vlan-bond0.200",
        ),
        _iface(
            "ens3f0",
            "NetworkManager",
            f"{nm}/ens3f0.nmconnection",
            method="static",
            addresses=("203.0.113.30/24",),
            gateway="203.0.113.1",
            routes=(Route("10.30.0.0/16", "203.0.113.254", None), Route("10.31.0.0/16", "203.0.113.253", 100)),
            dns=("203.0.113.53", "203.0.113.54"),
            onboot=True,
            profile="ens3f0",
        ),
        _iface(
            "ens4f0",
            "NetworkManager",
            f"{nm}/bond0-port-ens4f0.nmconnection",
            onboot=True,
            master="bond0",
            profile="bond0-port-ens4f0",
        ),
        _iface(
            "ens4f1",
            "NetworkManager",
            f"{nm}/bond0-port-ens4f1.nmconnection",
            onboot=True,
            master="bond0",
            profile="bond0-port-ens4f1",
        ),
    )
    assert net.mac_bindings == (
        MacBinding(f"{nm}/bond0-port-ens4f0.nmconnection", "b4:96:91:1a:1b:1c", "ens4f0", "nm-mac-address", "match"),
        MacBinding(f"{nm}/bond0-port-ens4f1.nmconnection", "b4:96:91:1a:1b:1d", "ens4f1", "nm-mac-address", "match"),
        MacBinding(f"{nm}/bond0.nmconnection", "b4:96:91:1a:1b:1c", "bond0", "nm-cloned-mac-address", "set"),
        MacBinding(f"{nm}/ens3f0.nmconnection", "b4:96:91:0a:0b:0c", "ens3f0", "nm-mac-address", "match"),
    )


# --- ubuntu-netplan -----------------------------------------------------------


def test_ubuntu_identity_kernels_initrd(described):
    d = described["ubuntu-netplan"]
    assert d.to_json()["os"] == {
        "family": "debian",
        "id": "ubuntu",
        "version": "22.04",
        "major": 22,
        "minor": 4,
        "pretty_name": "Ubuntu 22.04.3 LTS",
        "codename": "jammy",
        "id_like": ["debian"],
        "sources": ["/etc/os-release", "/etc/debian_version", "/etc/lsb-release"],
    }
    assert (d.hostname, d.selinux, d.selinux_type, d.package_manager) == (UBUNTU.hostname, "disabled", None, "apt")
    # 105 is newer than 91: versions compare as numbers
    assert [k.version for k in d.kernels] == ["5.15.0-105-generic", "5.15.0-91-generic"]
    assert d.to_json()["kernels"][0]["virtio"] == _virtio("builtin")
    assert d.kernels[0].initrd == "/boot/initrd.img-5.15.0-105-generic"
    assert (d.initrd.tool, d.initrd.tools, d.initrd.initramfs_modules) == (
        "initramfs-tools",
        ("initramfs-tools",),
        "most",
    )
    assert d.cloud_init == system.CloudInit(installed=True, network_disabled=True, datasources=("None",))


def test_ubuntu_grub2_with_submenu(described):
    boot = described["ubuntu-netplan"].bootloader
    assert (boot.kind, boot.firmware, boot.config_path, boot.bls) == ("grub2", "bios", "/boot/grub/grub.cfg", False)
    assert (boot.cmdline_linux, boot.cmdline_linux_default) == ((), ())
    assert boot.defaults["GRUB_DISTRIBUTOR"] == "`lsb_release -i -s 2> /dev/null || echo Debian`"
    root = f"root={synthetic.UBUNTU_ROOT}"
    new, old = UBUNTU.kernels
    assert [(e.title, e.kernel_version, e.args) for e in boot.entries] == [
        ("Ubuntu", new, (root, "ro")),
        (f"Advanced options for Ubuntu>Ubuntu, with Linux {new}", new, (root, "ro")),
        (
            f"Advanced options for Ubuntu>Ubuntu, with Linux {new} (recovery mode)",
            new,
            (root, "ro", "recovery", "nomodeset", "dis_ucode_ldr"),
        ),
        (f"Advanced options for Ubuntu>Ubuntu, with Linux {old}", old, (root, "ro")),
        (
            f"Advanced options for Ubuntu>Ubuntu, with Linux {old} (recovery mode)",
            old,
            (root, "ro", "recovery", "nomodeset", "dis_ucode_ldr"),
        ),
    ]
    assert boot.entries[0].kernel == f"/vmlinuz-{new}"  # /boot is its own filesystem
    assert boot.entries[0].initrd == f"/initrd.img-{new}"
    assert (boot.default, boot.default_index) == ("0", 0)


def test_ubuntu_netplan(described):
    net = described["ubuntu-netplan"].network
    plan = "/etc/netplan/00-installer-config.yaml"
    assert net.styles == ("netplan",)
    assert net.interfaces == (
        _iface(
            "bond0",
            "netplan",
            plan,
            kind="bond",
            method="static",
            addresses=("198.51.100.40/24",),
            members=("eno2", "eno3"),
            bond_mode="802.3ad",
            bond_options=(
                "lacp-rate=fast",
                "mii-monitor-interval=100",
                "mode=802.3ad",
                "transmit-hash-policy=layer3+4",
            ),
            profile="bond0",
        ),
        _iface(
            "bond0.300",
            "netplan",
            plan,
            kind="vlan",
            method="static",
            addresses=("10.30.0.40/24",),
            routes=(Route("10.31.0.0/16", "10.30.0.1", 50),),
            vlan_id=300,
            vlan_parent="bond0",
            profile="bond0.300",
        ),
        _iface("eno2", "netplan", plan, master="bond0", profile="eno2"),
        _iface("eno3", "netplan", plan, master="bond0", profile="eno3"),
        _iface(
            "eth0",  # set-name; the netplan id is lan0
            "netplan",
            plan,
            method="static",
            addresses=("192.0.2.40/24", "2001:db8:40::40/64"),
            gateway="192.0.2.1",
            routes=(Route("0.0.0.0/0", "192.0.2.1", None),),
            dns=("192.0.2.53", "2001:db8:40::53"),
            profile="lan0",
        ),
    )
    assert net.mac_bindings == (
        MacBinding(plan, UBUNTU.macs["eno2"], "eno2", "netplan-match", "match"),
        # unquoted 18:31:42:05:17:29 is an integer to a YAML 1.1 loader; netplan reads a MAC
        MacBinding(plan, UBUNTU.macs["eth0"], "eth0", "netplan-match", "match"),
    )


# --- debian12-ifupdown ----------------------------------------------------------


def test_debian12_basics(described):
    d = described["debian12-ifupdown"]
    assert (d.os.family, d.os.id, d.os.version, d.os.codename) == ("debian", "debian", "12.5", "bookworm")
    assert d.hostname == DEBIAN12.hostname
    assert d.initrd.initramfs_modules == "dep"  # conf.d overrides initramfs.conf
    assert d.to_json()["kernels"][1]["virtio"] == _virtio("module")
    boot = d.bootloader
    assert boot.cmdline_linux == ("net.ifnames=0",)
    assert boot.cmdline_linux_default == ("quiet",)
    assert boot.entries[0].args == ("root=UUID=2f7c9e1a-3b5d-4f6a-8c9e-0a1b2c3d4e5f", "ro", "quiet", "net.ifnames=0")
    assert boot.entries[0].kernel == "/boot/vmlinuz-6.1.0-18-amd64"
    # GRUB_DEFAULT=0 makes grub.cfg say default="0": grubenv's saved_entry is not used
    assert (boot.default, boot.default_kernel) == ("0", "6.1.0-18-amd64")


def test_debian12_ifupdown(described):
    net = described["debian12-ifupdown"].network
    d = "/etc/network/interfaces.d"
    assert net.styles == ("ifupdown",)  # a .link file is udev's, not networkd's
    assert net.interfaces == (
        _iface(
            "bond0",
            "ifupdown",
            f"{d}/bond0",
            kind="bond",
            method="static",
            addresses=("198.51.100.60/24",),
            onboot=True,
            members=("eth1", "eth2"),
            bond_mode="802.3ad",
            bond_options=("mode=802.3ad", "miimon=100", "lacp-rate=fast"),
        ),
        _iface("eth1", "ifupdown", f"{d}/bond0", onboot=True, master="bond0"),
        _iface("eth2", "ifupdown", f"{d}/bond0", onboot=True, master="bond0"),
        # 'source interfaces.d/*' includes every file, backups too (ifupdown does the same)
        _iface("eth9", "ifupdown", f"{d}/old.dpkg-old", method="dhcp", onboot=False),
        _iface(
            "lan0",
            "ifupdown",
            "/etc/network/interfaces",
            method="static",
            addresses=("192.0.2.60/24", "2001:db8:60::60/64"),
            gateway="192.0.2.1",
            routes=(Route("10.60.0.0/16", "192.0.2.254", None),),
            dns=("192.0.2.53", "192.0.2.54"),
            onboot=True,
        ),
        _iface(
            "vlan400",
            "ifupdown",
            f"{d}/vlan400",
            kind="vlan",
            method="static",
            addresses=("10.40.0.60/24",),
            onboot=True,
            vlan_id=400,
            vlan_parent="bond0",
        ),
    )
    assert net.mac_bindings == (
        MacBinding(f"{d}/bond0", DEBIAN12.macs["bond0"], "bond0", "hwaddress", "set"),
        MacBinding("/etc/systemd/network/10-lan0.link", DEBIAN12.macs["lan0"], "lan0", "networkd-link-match", "match"),
    )


# --- output -------------------------------------------------------------------


def test_json_is_deterministic_and_round_trips(described):
    for name, description in described.items():
        data = description.to_json()
        text = json.dumps(data, sort_keys=True)
        assert json.dumps(data) == text, name  # keys already sorted
        assert system.from_json(SystemDescription, json.loads(text)) == description, name


def test_from_json_reports_the_bad_field(described):
    data = described["centos7"].to_json()
    data["bootloader"]["kind"] = "lilo"
    with pytest.raises(ValueError, match=r"\$\.bootloader\.kind"):
        system.from_json(SystemDescription, data)


def test_describe_writes_nothing(tmp_path):
    write_tree("rhel9-nm", tmp_path)

    def snapshot() -> dict[str, tuple[int, str]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(tmp_path):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                digest = ""
                if os.path.isfile(path) and not os.path.islink(path):
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                out[path] = (st.st_mode, digest)
        return out

    before = snapshot()
    describe_system(tmp_path)
    assert snapshot() == before


# ---------------------------------------------------------------------------
# Symlinks never leave the tree
# ---------------------------------------------------------------------------


def test_absolute_symlinks_are_read_inside_the_tree(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    secret = host / "secret"
    secret.write_text("HOST-SECRET\nDEVICE=eth7\nHWADDR=66:66:66:66:66:66\n")
    root = tmp_path / "tree"
    (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
    # a shadow-like file inside the tree, and links that point at it by absolute path
    (root / "etc/shadow").write_text("DEVICE=eth0\nHWADDR=02:00:00:00:00:01\nBOOTPROTO=dhcp\n")
    os.symlink("/etc/shadow", root / "etc/sysconfig/network-scripts/ifcfg-eth0")
    # links whose target exists only on the host
    os.symlink(str(secret), root / "etc/hostname")
    os.symlink(str(secret), root / "etc/sysconfig/network-scripts/ifcfg-eth7")
    os.symlink("../" * 12 + str(secret).lstrip("/"), root / "etc/os-release")
    os.symlink(str(host), root / "etc/selinux")
    os.symlink("/etc/shadow", root / "etc/fstab")

    d = describe_system(root)

    assert d.hostname is None
    assert d.os.id == "unknown"
    assert d.selinux == "disabled"
    assert d.network.interfaces == (
        _iface(
            "eth0",
            "ifcfg",
            "/etc/sysconfig/network-scripts/ifcfg-eth0",
            method="dhcp",
        ),
    )
    assert d.network.mac_bindings == (
        MacBinding("/etc/sysconfig/network-scripts/ifcfg-eth0", "02:00:00:00:00:01", "eth0", "HWADDR", "match"),
    )
    assert "HOST-SECRET" not in json.dumps(d.to_json())
    assert "66:66:66" not in json.dumps(d.to_json())


def test_resolve_clamps_at_root_and_handles_loops(tmp_path):
    root = tmp_path / "tree"
    (root / "usr/lib/modules/1.0").mkdir(parents=True)
    (root / "etc").mkdir()
    os.symlink("/usr/lib", root / "lib")  # absolute, as some merged-usr systems have it
    os.symlink("../../../../../../etc", root / "etc/up")
    os.symlink("loop-b", root / "etc/loop-a")
    os.symlink("loop-a", root / "etc/loop-b")
    tree = SourceTree(root)
    assert tree.resolve("/lib/modules/1.0") == "/usr/lib/modules/1.0"
    assert tree.resolve("/etc/up/up/up") == "/etc"
    assert tree.resolve("/../../etc") == "/etc"
    assert tree.resolve("/etc/missing") is None
    assert tree.resolve("/etc/loop-a") is None
    assert any("too many levels of symbolic links" in w for w in tree.warnings)
    assert tree.is_symlink("/lib") and not tree.is_symlink("/usr/lib")
    assert tree.read_text("/etc/loop-a") is None


# ---------------------------------------------------------------------------
# Robustness: broken files are warnings
# ---------------------------------------------------------------------------


def test_malformed_files_become_warnings(tmp_path):
    root = tmp_path
    write_tree("centos7", root)
    (root / "boot/grub2/grub.cfg").write_text("menuentry 'x' {\n\tlinux /vmlinuz-1 ro\n")  # never closed
    (root / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX="unterminated\nthis is not an assignment\n')
    (root / "etc/sysconfig/network-scripts/ifcfg-eth0").write_bytes(b"DEVICE=eth0\nHWADDR=zz:zz\n\xff\xfe\x00")
    (root / "etc/netplan").mkdir()
    (root / "etc/netplan/01-bad.yaml").write_text("network: [unclosed\n")
    (root / "etc/NetworkManager/system-connections").mkdir(parents=True)
    (root / "etc/NetworkManager/system-connections/broken.nmconnection").write_text("garbage\nid=x\n")
    os.remove(root / "etc/machine-id")
    (root / "etc/machine-id").mkdir()  # a directory where a file should be
    os.remove(root / "etc/hostname")
    os.mkfifo(root / "etc/hostname.fifo")
    os.symlink("hostname.fifo", root / "etc/HOSTNAME")

    d = describe_system(root)

    text = "\n".join(d.warnings)
    assert "/boot/grub2/grub.cfg: unbalanced braces" in text
    assert "/etc/default/grub: line 1: GRUB_CMDLINE_LINUX: No closing quotation" in text
    assert "/etc/sysconfig/network-scripts/ifcfg-eth0: HWADDR=zz:zz: not a MAC address" in text
    assert "/etc/netplan/01-bad.yaml: not valid YAML" in text
    assert "broken.nmconnection: line 1: not key=value: 'garbage'" in text
    assert "broken.nmconnection: line 2: key outside a section" in text
    assert "broken.nmconnection: no [connection] section" in text
    assert "/etc/HOSTNAME: not a regular file (ignored)" in text
    assert d.machine_id == "missing"
    assert d.hostname is None
    assert d.bootloader.entries[0].kernel_version == "1"
    assert d.os.id == "centos"


def test_uefi_from_fstab_alone(tmp_path):
    # The ESP is vfat: when it could not be mounted, fstab still tells.
    write_tree("centos7", tmp_path)
    with open(tmp_path / "etc/fstab", "a") as fstab:
        fstab.write("UUID=7A3C-1F2E /boot/efi vfat umask=0077,shortname=winnt 0 0\n")
    boot = describe_system(tmp_path).bootloader
    assert (boot.firmware, boot.esp_mountpoint, boot.efi_binaries) == ("uefi", "/boot/efi", ())


def test_empty_tree(tmp_path):
    d = describe_system(tmp_path)
    assert d.os.family == "unknown"
    assert d.kernels == ()
    assert d.bootloader.kind == "unknown"
    assert d.initrd.tool is None
    assert d.network.styles == ()
    assert len(d.warnings) == 5


# ---------------------------------------------------------------------------
# Parsers on text
# ---------------------------------------------------------------------------


def test_parse_shell_vars():
    values, problems = system.parse_shell_vars(
        "# comment\n"
        'A="quoted value"  # trailing comment\n'
        "B='single'\n"
        "export C=plain\n"
        "D=$(sed 's, release .*$,,g' /etc/system-release)\n"
        'E="x"\nE+=" y"\n'
        "not an assignment\n"
        'F="open\n'
    )
    assert values["A"] == "quoted value"
    assert values["B"] == "single"
    assert values["C"] == "plain"
    assert values["E"] == "x y"
    assert values["F"] == "open"
    assert "D" in values
    assert problems == ["line 8: not a KEY=value line: 'not an assignment'", "line 9: F: No closing quotation"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CentOS release 6.10 (Final)\n", ("centos", "6.10")),
        ("CentOS Linux release 7.9.2009 (Core)\n", ("centos", "7.9.2009")),
        ("CentOS Stream release 9\n", ("centos", "9")),
        ("Red Hat Enterprise Linux Server release 6.10 (Santiago)\n", ("rhel", "6.10")),
        ("Rocky Linux release 8.9 (Green Obsidian)\n", ("rocky", "8.9")),
        ("Oracle Linux Server release 7.9\n", ("ol", "7.9")),
        ("Scientific Linux release 6.10 (Carbon)\n", ("scientific", "6.10")),
        ("something odd\n", ("rhel", None)),
    ],
)
def test_parse_redhat_release(text, expected):
    distro, version, pretty = system.parse_redhat_release(text)
    assert (distro, version) == expected
    assert pretty == text.strip()


def test_major_minor_and_version_key():
    assert system.major_minor("7.9.2009") == ("7.9", 7, 9)
    assert system.major_minor("22.04") == ("22.04", 22, 4)
    assert system.major_minor("9") == ("9", 9, None)
    assert system.major_minor("trixie/sid") == ("trixie/sid", None, None)
    assert system.major_minor(None) == (None, None, None)
    versions = ["5.15.0-91-generic", "5.15.0-105-generic", "5.4.0-1-generic", "5.15.0-91-lowlatency"]
    assert sorted(versions, key=system.version_key) == [
        "5.4.0-1-generic",
        "5.15.0-91-generic",
        "5.15.0-91-lowlatency",
        "5.15.0-105-generic",
    ]


def test_os_identity_without_os_release(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/lsb-release").write_text(
        'DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=10.04\nDISTRIB_CODENAME=lucid\nDISTRIB_DESCRIPTION="Ubuntu 10.04.4 LTS"\n'
    )
    (tmp_path / "etc/debian_version").write_text("squeeze/sid\n")
    ident = system.describe_os(SourceTree(tmp_path))
    assert (ident.family, ident.id, ident.version, ident.codename) == ("debian", "ubuntu", "10.04", "lucid")
    (tmp_path / "etc/lsb-release").unlink()
    (tmp_path / "etc/debian_version").write_text("6.0.10\n")
    ident = system.describe_os(SourceTree(tmp_path))
    assert (ident.family, ident.id, ident.version, ident.pretty_name) == (
        "debian",
        "debian",
        "6.0",
        "Debian GNU/Linux 6.0.10",
    )


def test_family_of():
    assert system.family_of("almalinux", ()) == "rhel"
    assert system.family_of("linuxmint", ("ubuntu", "debian")) == "debian"
    assert system.family_of("myos", ("rhel", "fedora")) == "rhel"
    assert system.family_of("opensuse-leap", ("suse", "opensuse")) == "unknown"


def test_modules_and_kernel_config():
    assert system.parse_modules_builtin("kernel/drivers/block/virtio_blk.ko\nkernel/drivers/hid/hid-generic.ko\n") == {
        "virtio_blk",
        "hid_generic",
    }
    assert system.parse_modules_dep(
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz\nextra/virtio_scsi.ko.zst:\n"
    ) == {"virtio_net": "kernel/drivers/net/virtio_net.ko.xz", "virtio_scsi": "extra/virtio_scsi.ko.zst"}
    config = system.parse_kernel_config(
        'CONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_NET=m\n# CONFIG_SCSI_VIRTIO is not set\nCONFIG_LOCALVERSION=""\n'
    )
    assert config == {
        "CONFIG_VIRTIO_BLK": "y",
        "CONFIG_VIRTIO_NET": "m",
        "CONFIG_SCSI_VIRTIO": "n",
        "CONFIG_LOCALVERSION": "",
    }


def test_virtio_state():
    state = system.virtio_state
    assert state("virtio_blk", builtin={"virtio_blk"}, module_files=set(), config=None) == "builtin"
    assert state("virtio_blk", builtin=set(), module_files={"virtio_blk"}, config=None) == "module"
    # old kernels without modules.builtin: the config decides
    assert state("virtio_blk", builtin=None, module_files=set(), config={"CONFIG_VIRTIO_BLK": "y"}) == "builtin"
    assert state("virtio_blk", builtin=None, module_files=set(), config={"CONFIG_VIRTIO_BLK": "m"}) == "missing"
    assert state("virtio_scsi", builtin=set(), module_files=set(), config={"CONFIG_SCSI_VIRTIO": "n"}) == "missing"
    assert state("virtio_net", builtin=None, module_files=set(), config=None) == "unknown"


def test_module_found_through_modules_dep_and_missing_module_warns(tmp_path):
    kver = "4.18.0-513.el8.x86_64"
    mods = tmp_path / "lib/modules" / kver
    (mods / "extra").mkdir(parents=True)
    (mods / "extra/virtio_blk.ko.zst").write_bytes(b"x")
    (mods / "modules.dep").write_text("extra/virtio_blk.ko.zst:\nkernel/drivers/net/virtio_net.ko.xz:\n")
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    (tmp_path / "boot").mkdir()
    (tmp_path / f"boot/vmlinuz-{kver}").write_bytes(b"MZ")
    (tmp_path / f"boot/config-{kver}").write_text("CONFIG_VIRTIO_NET=m\nCONFIG_VIRTIO_BLK=m\n")
    tree = SourceTree(tmp_path)
    kernel = system.describe_kernel(tree, kver)
    assert kernel.virtio == system.VirtioSupport(
        virtio_blk="module", virtio_scsi="missing", virtio_net="missing", virtio_pci="builtin"
    )
    assert kernel.virtio.disk_ready
    assert tree.warnings == [f"kernel {kver}: virtio_net is configured as a module but its file is missing"]


def test_is_debug_kernel():
    assert system.is_debug_kernel("2.6.32-754.el6.x86_64.debug")
    assert system.is_debug_kernel("4.18.0-513.el8.x86_64+debug")
    assert not system.is_debug_kernel("5.15.0-91-generic")


def test_preferred_kernel_prefers_virtio_over_newer():
    def kernel(version: str, blk: str, debug: bool = False) -> system.Kernel:
        return system.Kernel(
            version=version,
            vmlinuz=f"/boot/vmlinuz-{version}",
            initrd=None,
            config=None,
            modules_dir=None,
            debug=debug,
            rescue=False,
            virtio=system.VirtioSupport(blk, "module", "module", "module"),  # type: ignore[arg-type]
        )

    kernels = [kernel("3.0-new-no-virtio", "missing"), kernel("2.0-old", "module"), kernel("2.1-dbg", "module", True)]
    assert system.preferred_kernel(kernels) == kernels[1]
    assert system.preferred_kernel([]) is None


def test_parse_selinux_config():
    assert system.parse_selinux_config("SELINUX=Permissive\nSELINUXTYPE=mls\n") == ("permissive", "mls")
    assert system.parse_selinux_config("SELINUX=bogus\n") == ("disabled", None)


def test_parse_grub_legacy():
    text = (
        "default=1\ntimeout=5\n"
        "title Windows\n\trootnoverify (hd0,0)\n\tchainloader +1\n"
        "title Linux\n\troot (hd0,1)\n\tkernel --no-mem-option /vmlinuz-2.6.18 ro root=LABEL=/\n"
        "\tinitrd /initrd-2.6.18.img\n"
    )
    config, problems = system.parse_grub_legacy(text, "/boot/grub/menu.lst")
    assert problems == []
    assert config.default == "1"
    assert config.entries[0] == BootEntry("Windows", None, None, None, None, (), "(hd0,0)", "/boot/grub/menu.lst")
    assert config.entries[1].kernel == "/vmlinuz-2.6.18"
    assert config.entries[1].args == ("ro", "root=LABEL=/")
    assert config.entries[1].initrd == "/initrd-2.6.18.img"
    assert system.resolve_default(config.default, config.entries, range(2)) == 1


GRUB2_SNIPPET = """\
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
else
   set default="1"
fi
function load_video {
  insmod vbe
}
menuentry 'Debian' --class debian $menuentry_id_option 'gnulinux-simple-X' {
\tlinux\t/boot/vmlinuz-6.1.0-18-amd64 root=UUID=X ro quiet
\tinitrd\t/boot/initrd.img-6.1.0-18-amd64
}
submenu 'Advanced' $menuentry_id_option 'gnulinux-advanced-X' {
\tmenuentry 'Debian, with Linux 6.1.0-13-amd64' $menuentry_id_option 'gnulinux-6.1.0-13-amd64-advanced-X' {
\t\tlinux\t/boot/vmlinuz-6.1.0-13-amd64 root=UUID=X ro single
\t}
\tmenuentry 'Debian, with Linux 6.1.0-12-amd64' {
\t\tlinux\t/boot/vmlinuz-6.1.0-12-amd64 root=UUID=X ro
\t}
}
menuentry "Memory test (memtest86+x64.bin)" {
\tlinux16\t/boot/memtest86+x64.bin
}
"""


def test_parse_grub2_cfg_menu_structure():
    config, problems = system.parse_grub2_cfg(GRUB2_SNIPPET, "/boot/grub/grub.cfg")
    assert problems == []
    assert [e.title for e in config.entries] == [
        "Debian",
        "Advanced>Debian, with Linux 6.1.0-13-amd64",
        "Advanced>Debian, with Linux 6.1.0-12-amd64",
        "Memory test (memtest86+x64.bin)",
    ]
    assert config.top_level == (0, 1, 3)
    assert config.defaults == ("${next_entry}", "1")
    assert config.entries[1].id == "gnulinux-6.1.0-13-amd64-advanced-X"
    assert config.entries[1].args == ("root=UUID=X", "ro", "single")
    assert config.entries[3].kernel_version is None
    assert not config.stub and not config.uses_blscfg
    resolve = system.resolve_default
    assert resolve("1", config.entries, config.top_level) == 1  # a submenu counts as one item
    assert resolve("2", config.entries, config.top_level) == 3
    assert resolve("9", config.entries, config.top_level) is None
    assert resolve("gnulinux-6.1.0-13-amd64-advanced-X", config.entries, config.top_level) == 1
    assert resolve("gnulinux-advanced-X>gnulinux-6.1.0-13-amd64-advanced-X", config.entries, config.top_level) == 1
    assert resolve("Advanced>Debian, with Linux 6.1.0-12-amd64", config.entries, config.top_level) == 2
    assert resolve(None, config.entries, config.top_level) == 0


def test_parse_grub2_stub_and_unbalanced():
    stub, problems = system.parse_grub2_cfg(
        "search --no-floppy --fs-uuid --set=dev X\nset prefix=($dev)/grub2\n"
        "export $prefix\nconfigfile $prefix/grub.cfg\n",
        "/boot/efi/EFI/redhat/grub.cfg",
    )
    assert stub.stub and problems == []
    _, problems = system.parse_grub2_cfg("}\nmenuentry 'a' {\n", "x")
    assert problems == ["line 1: unbalanced '}'", "unbalanced braces: a block is never closed"]


def test_bls_entry_and_grub_vars():
    entry = system.bls_entry(
        "title Rocky Linux (4.18.0-513.el8.x86_64) 8.9\nversion 4.18.0-513.el8.x86_64\n"
        "linux /vmlinuz-4.18.0-513.el8.x86_64\ninitrd $tuned_initrd /initramfs-4.18.0-513.el8.x86_64.img\n"
        "options $kernelopts $tuned_params\nid rocky-20231113-4.18.0-513.el8.x86_64\n",
        "/boot/loader/entries/abc-4.18.0-513.el8.x86_64.conf",
    )
    assert entry.id == "abc-4.18.0-513.el8.x86_64"
    assert entry.kernel_version == "4.18.0-513.el8.x86_64"
    assert entry.initrd == "/initramfs-4.18.0-513.el8.x86_64.img"
    assert entry.args == ("$kernelopts", "$tuned_params")
    env = system.parse_grubenv(
        "# GRUB Environment Block\nsaved_entry=abc\nkernelopts=root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root\n"
        + "#" * 900
    )
    assert env == {"saved_entry": "abc", "kernelopts": "root=/dev/mapper/rl-root ro rd.lvm.lv=rl/root"}
    assert system.expand_grub_vars(entry.args, env) == ("root=/dev/mapper/rl-root", "ro", "rd.lvm.lv=rl/root")
    assert system.expand_grub_vars(["a=${x}b"], {"x": "1"}) == ("a=1b",)


@pytest.mark.parametrize(
    ("text", "mac"),
    [
        ("52:54:00:AB:CD:EF", "52:54:00:ab:cd:ef"),
        ('"52-54-00-ab-cd-ef"', "52:54:00:ab:cd:ef"),
        ("82;84;0;171;205;239;", "52:54:00:ab:cd:ef"),  # old NetworkManager keyfiles
        ("0:1b:21:4c:5d:6e", "00:1b:21:4c:5d:6e"),
        ("zz:zz", None),
        ("preserve", None),
        ("52;84;300;1;1;1", None),
    ],
)
def test_normalize_mac(text, mac):
    assert system.normalize_mac(text) == mac


def test_netmask_and_destinations():
    assert system.netmask_to_prefix("255.255.252.0") == 22
    assert system.netmask_to_prefix("255.0.255.0") is None
    assert system.normalize_destination("default") == "0.0.0.0/0"
    assert system.normalize_destination("default", "2001:db8::1") == "::/0"
    assert system.normalize_destination("10.1.2.3/255.255.0.0") == "10.1.0.0/16"
    assert system.normalize_destination("192.0.2.7") == "192.0.2.7/32"
    assert system.normalize_destination("nonsense") == "nonsense"


def test_parse_ifcfg_variants():
    iface, bindings, problems = system.parse_ifcfg(
        "DEVICE=em1\nIPADDR0=10.0.0.5\nPREFIX0=16\nIPADDR1=10.1.0.5\nNETMASK1=255.255.255.0\nIPADDR2=172.16.0.1\n"
        'IPV6ADDR="2001:db8::5/64"\nMACADDR=02:11:22:33:44:55\nHWADDR=00:11:22:33:44:55\nGATEWAY0=10.0.0.1\n',
        "/etc/sysconfig/network-scripts/ifcfg-em1",
    )
    assert problems == []
    assert iface is not None
    assert iface.addresses == ("10.0.0.5/16", "10.1.0.5/24", "172.16.0.1/16", "2001:db8::5/64")
    assert (iface.method, iface.gateway) == ("static", "10.0.0.1")
    assert [(b.kind, b.mac, b.action) for b in bindings] == [
        ("HWADDR", "00:11:22:33:44:55", "match"),
        ("MACADDR", "02:11:22:33:44:55", "set"),
    ]
    vlan, _, _ = system.parse_ifcfg("TYPE=Vlan\nPHYSDEV=em1\nVLAN_ID=42\nDEVICE=vlan42\n", "/x/ifcfg-vlan42")
    assert vlan is not None and (vlan.kind, vlan.vlan_id, vlan.vlan_parent) == ("vlan", 42, "em1")
    loopback, _, _ = system.parse_ifcfg("DEVICE=lo\n", "/x/ifcfg-lo")
    assert loopback is None
    noname, _, _ = system.parse_ifcfg("BOOTPROTO=dhcp\n", "/x/ifcfg-System_eth0")
    assert noname is not None and noname.name == "System_eth0"


def test_parse_route_file_both_formats():
    routes, problems = system.parse_route_file(
        "# comment\ndefault via 192.0.2.1 dev eth0\n10.0.0.0/8 via 192.0.2.254 dev eth0 metric 10\n"
        "192.0.2.128/25 dev eth0 scope link\nthis is junk\n"
    )
    assert routes == [
        Route("0.0.0.0/0", "192.0.2.1", None),
        Route("10.0.0.0/8", "192.0.2.254", 10),
        Route("192.0.2.128/25", None, None),
    ]
    assert problems == ["line 5: not a route: 'this is junk'"]


def test_parse_udev_net_rules():
    rules = (
        "# comment\n"
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="00:1B:21:4C:5D:6E", \\\n'
        '  ATTR{type}=="1", KERNEL=="eth*", NAME="eth1"\n'
        'SUBSYSTEM=="block", ATTR{address}=="00:11:22:33:44:55", NAME="nope"\n'
        'ACTION=="add", ATTRS{address}=="00:aa:bb:cc:dd:ee", NAME:="lan9"\n'
    )
    assert system.parse_udev_net_rules(rules, "/etc/udev/rules.d/70-persistent-net.rules") == [
        MacBinding("/etc/udev/rules.d/70-persistent-net.rules", "00:1b:21:4c:5d:6e", "eth1", "udev-rule", "match"),
        MacBinding("/etc/udev/rules.d/70-persistent-net.rules", "00:aa:bb:cc:dd:ee", "lan9", "udev-rule", "match"),
    ]


def test_parse_nm_keyfile_old_forms():
    profile, problems = system.parse_nm_keyfile(
        "[connection]\nid=Wired connection 1\nuuid=u1\ntype=802-3-ethernet\n\n"
        "[802-3-ethernet]\nmac-address=0;27;33;76;93;110;\ncloned-mac-address=preserve\n\n"
        "[ipv4]\nmethod=manual\naddresses1=192.168.1.5;24;192.168.1.1;\ndns=8.8.8.8;\n",
        "/etc/NetworkManager/system-connections/Wired connection 1",
    )
    assert problems == []
    assert profile is not None
    iface = profile.draft.freeze()
    assert (iface.name, iface.addresses, iface.gateway, iface.dns) == (
        "Wired connection 1",  # no interface-name: the profile id stands in
        ("192.168.1.5/24",),
        "192.168.1.1",
        ("8.8.8.8",),
    )
    assert profile.bindings == (
        MacBinding(
            "/etc/NetworkManager/system-connections/Wired connection 1",
            "00:1b:21:4c:5d:6e",
            "Wired connection 1",
            "nm-mac-address",
            "match",
        ),
    )


def test_netplan_reads_macs_as_strings():
    text = (
        "network:\n  ethernets:\n    id0:\n      match:\n        macaddress: 52:54:00:12:34:56\n      set-name: eth0\n"
    )
    assert isinstance(yaml.safe_load(text)["network"]["ethernets"]["id0"]["match"]["macaddress"], int)
    document, problems = system.parse_netplan_yaml(text)
    assert problems == [] and document is not None
    assert system.netplan_bindings(document, "/etc/netplan/a.yaml") == [
        MacBinding("/etc/netplan/a.yaml", "52:54:00:12:34:56", "eth0", "netplan-match", "match")
    ]
    assert system.parse_netplan_yaml("") == ({}, [])
    assert system.parse_netplan_yaml("- a\n") == (None, ["top level is not a mapping"])


def test_netplan_merge_and_dhcp():
    merged = system.merge_netplan(
        [
            {"network": {"ethernets": {"eth0": {"dhcp4": "true", "addresses": ["10.0.0.1/8"]}}}},
            {"network": {"ethernets": {"eth0": {"addresses": ["10.0.0.2/8"]}, "eth1": {"dhcp4": "yes"}}}},
        ]
    )
    interfaces, problems = system.netplan_interfaces(merged, {"eth0": "/a.yaml", "eth1": "/b.yaml"})
    assert problems == []
    assert [(i.name, i.method, i.addresses, i.file) for i in interfaces] == [
        ("eth0", "dhcp", ("10.0.0.2/8",), "/a.yaml"),
        ("eth1", "dhcp", (), "/b.yaml"),
    ]


def test_networkd_files(tmp_path):
    net = tmp_path / "etc/systemd/network"
    net.mkdir(parents=True)
    (net / "10-uplink.network").write_text(
        "[Match]\nMACAddress=00:11:22:33:44:55 00:11:22:33:44:56\n\n[Network]\nAddress=192.0.2.9/24\n"
        "Gateway=192.0.2.1\nDNS=192.0.2.53\nVLAN=vlan7\n\n"
        "[Route]\nDestination=10.0.0.0/8\nGateway=192.0.2.254\n\n[Route]\nDestination=10.9.0.0/16\n"
        "Gateway=192.0.2.253\nMetric=5\n"
    )
    (net / "20-vlan7.netdev").write_text(
        "[NetDev]\nName=vlan7\nKind=vlan\nMACAddress=02:00:00:00:00:07\n[VLAN]\nId=7\n"
    )
    (net / "20-vlan7.network").write_text("[Match]\nName=vlan7\n[Network]\nDHCP=ipv4\n")
    (net / "99-name.link").write_text("[Match]\nMACAddress=00:11:22:33:44:57\n[Link]\nName=san0\n")
    network = system.describe_network(SourceTree(tmp_path))
    assert network.styles == ("systemd-networkd",)
    uplink, vlan = network.interfaces
    assert (uplink.name, uplink.addresses, uplink.gateway, uplink.routes) == (
        "10-uplink",  # matched by MAC only: the file name stands in
        ("192.0.2.9/24",),
        "192.0.2.1",
        (Route("10.0.0.0/8", "192.0.2.254", None), Route("10.9.0.0/16", "192.0.2.253", 5)),
    )
    assert (vlan.name, vlan.kind, vlan.vlan_id, vlan.vlan_parent, vlan.method) == (
        "vlan7",
        "vlan",
        7,
        "10-uplink",
        "dhcp",
    )
    assert [(b.file.rsplit("/", 1)[-1], b.mac, b.interface, b.kind, b.action) for b in network.mac_bindings] == [
        ("10-uplink.network", "00:11:22:33:44:55", None, "networkd-match", "match"),
        ("10-uplink.network", "00:11:22:33:44:56", None, "networkd-match", "match"),
        ("20-vlan7.netdev", "02:00:00:00:00:07", "vlan7", "networkd-macaddress", "set"),
        ("99-name.link", "00:11:22:33:44:57", "san0", "networkd-link-match", "match"),
    ]


def test_parse_interfaces_stanzas():
    stanzas = system.parse_interfaces(
        "auto lo eth0\niface lo inet loopback\n\niface eth0 inet static\n"
        "    address 192.0.2.5\n    netmask 24\n    up ip route add 10.0.0.0/8 \\\n      via 192.0.2.254\n"
        "source-directory interfaces.d\nallow-hotplug eth1\niface eth1 inet dhcp\n  hwaddress 00:11:22:33:44:55\n"
    )
    assert [(s.keyword, s.args) for s in stanzas] == [
        ("auto", ("lo", "eth0")),
        ("iface", ("lo", "inet", "loopback")),
        ("iface", ("eth0", "inet", "static")),
        ("source-directory", ("interfaces.d",)),
        ("allow-hotplug", ("eth1",)),
        ("iface", ("eth1", "inet", "dhcp")),
    ]
    interfaces, bindings, problems = system.ifupdown_interfaces([("/etc/network/interfaces", s) for s in stanzas])
    assert problems == []
    eth0, eth1 = interfaces
    assert (eth0.addresses, eth0.routes, eth0.onboot) == (
        ("192.0.2.5/24",),
        (Route("10.0.0.0/8", "192.0.2.254", None),),
        True,
    )
    assert (eth1.method, eth1.onboot) == ("dhcp", True)
    assert bindings == [MacBinding("/etc/network/interfaces", "00:11:22:33:44:55", "eth1", "hwaddress", "set")]


def test_ifupdown_source_directory_skips_dotted_names(tmp_path):
    d = tmp_path / "etc/network"
    (d / "interfaces.d").mkdir(parents=True)
    (d / "interfaces").write_text("source-directory interfaces.d\n")
    (d / "interfaces.d/eth0").write_text("iface eth0 inet dhcp\n")
    (d / "interfaces.d/eth1.bak").write_text("iface eth1 inet dhcp\n")  # run-parts names only
    network = system.describe_network(SourceTree(tmp_path))
    assert [i.name for i in network.interfaces] == ["eth0"]


def test_boot_sector_guess_and_combination(described):
    grub_mbr = b"\xeb\x63\x90" + b"\x00" * 0x17D + b"GRUB \x00Geom\x00Hard Disk\x00Read\x00 Error\x00"
    assert system.guess_boot_sector(grub_mbr) == "grub"
    assert system.guess_boot_sector(b"\x00" * 6 + b"LILO" + b"\x00" * 500) == "lilo"
    assert system.guess_boot_sector(b"\x00" * 512) is None
    assert system.guess_boot_sector(b"\x00" * 4096 + b"GRUB") is None  # only the first 2 KiB count
    legacy = described["centos6"].bootloader
    uefi = described["rhel9-nm"].bootloader
    assert system.combine_bootloader(legacy, "grub") == ("grub-legacy", [])
    assert system.combine_bootloader(uefi, None) == ("grub2", [])
    kind, warnings = system.combine_bootloader(legacy, None)
    assert kind == "grub-legacy" and "no GRUB boot code" in warnings[0]
    kind, warnings = system.combine_bootloader(legacy, "lilo")
    assert kind == "lilo" and "LILO" in warnings[0]
