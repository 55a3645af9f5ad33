"""The source model's old home: every public name, re-exported from where it lives now.

The source model was one 2,500-line module; it is now split by concern (issue 12):

- `tasks.lib.source.model`: the description's dataclasses (`SystemDescription` and its parts);
- `tasks.lib.source.tree`: `SourceTree`, reading a tree without leaving it;
- `tasks.lib.source.os`, `.kernels`, `.boot`, `.network`, `.describe`: the describers
  (`describe_system` is in `.describe`);
- `tasks.lib.source.codec`: `to_json` / `from_json`;
- `tasks.lib.formats.*`: one parser module per on-disk format (shell variables, grub.cfg,
  grub legacy, grubenv, BLS entries, ifcfg, NetworkManager keyfiles, netplan, networkd,
  ifupdown, udev rules), working on text.

New code imports from those modules; this one keeps old imports working.
"""

from __future__ import annotations

from tasks.lib.formats.bls import (
    bls_entry,
    parse_bls_entry,
)
from tasks.lib.formats.grub2 import (
    Grub2Config,
    expand_grub_vars,
    parse_grub2_cfg,
)
from tasks.lib.formats.grub_legacy import (
    GrubLegacyConfig,
    parse_grub_legacy,
)
from tasks.lib.formats.grubenv import (
    parse_grubenv,
)
from tasks.lib.formats.ifcfg import (
    parse_ifcfg,
    parse_route_file,
)
from tasks.lib.formats.ifupdown import (
    IfupdownStanza,
    ifupdown_interfaces,
    parse_interfaces,
)
from tasks.lib.formats.ini import (
    parse_ini,
)
from tasks.lib.formats.netfields import (
    netmask_to_prefix,
    normalize_destination,
    normalize_mac,
    parse_ip_route_words,
)
from tasks.lib.formats.netplan import (
    merge_netplan,
    netplan_bindings,
    netplan_interfaces,
    netplan_names,
    parse_netplan_yaml,
)
from tasks.lib.formats.networkd import (
    parse_networkd,
)
from tasks.lib.formats.nm_keyfile import (
    parse_nm_keyfile,
)
from tasks.lib.formats.shellvars import (
    parse_shell_vars,
)
from tasks.lib.formats.udev import (
    parse_udev_net_rules,
)
from tasks.lib.source.boot import (
    combine_bootloader,
    describe_bootloader,
    guess_boot_sector,
    resolve_default,
)
from tasks.lib.source.codec import (
    from_json,
    to_json,
)
from tasks.lib.source.describe import (
    describe_cloud_init,
    describe_hostname,
    describe_machine_id,
    describe_package_manager,
    describe_system,
    parse_hostname,
    parse_selinux_config,
)
from tasks.lib.source.kernels import (
    describe_initrd_tooling,
    describe_kernel,
    describe_kernels,
    is_debug_kernel,
    parse_kernel_config,
    parse_modules_builtin,
    parse_modules_dep,
    preferred_kernel,
    version_key,
    virtio_state,
)
from tasks.lib.source.model import (
    MODULE_SUFFIXES,
    VIRTIO_DRIVERS,
    BindingAction,
    BindingKind,
    BootEntry,
    Bootloader,
    BootloaderKind,
    CloudInit,
    Family,
    Firmware,
    InitrdTooling,
    InitrdToolName,
    Interface,
    InterfaceKind,
    IPMethod,
    Kernel,
    Link,
    MacBinding,
    MachineIdState,
    NetStyle,
    NetworkConfig,
    OSIdentity,
    PackageManager,
    Route,
    SELinuxMode,
    SystemDescription,
    VirtioState,
    VirtioSupport,
)
from tasks.lib.source.network import (
    describe_network,
)
from tasks.lib.source.os import (
    describe_os,
    family_of,
    major_minor,
    parse_os_release,
    parse_redhat_release,
)
from tasks.lib.source.tree import (
    MAX_READ,
    SourceTree,
)

__all__ = [
    "MAX_READ",
    "MODULE_SUFFIXES",
    "VIRTIO_DRIVERS",
    "BindingAction",
    "BindingKind",
    "BootEntry",
    "Bootloader",
    "BootloaderKind",
    "CloudInit",
    "Family",
    "Firmware",
    "Grub2Config",
    "GrubLegacyConfig",
    "IPMethod",
    "IfupdownStanza",
    "InitrdToolName",
    "InitrdTooling",
    "Interface",
    "InterfaceKind",
    "Kernel",
    "Link",
    "MacBinding",
    "MachineIdState",
    "NetStyle",
    "NetworkConfig",
    "OSIdentity",
    "PackageManager",
    "Route",
    "SELinuxMode",
    "SourceTree",
    "SystemDescription",
    "VirtioState",
    "VirtioSupport",
    "bls_entry",
    "combine_bootloader",
    "describe_bootloader",
    "describe_cloud_init",
    "describe_hostname",
    "describe_initrd_tooling",
    "describe_kernel",
    "describe_kernels",
    "describe_machine_id",
    "describe_network",
    "describe_os",
    "describe_package_manager",
    "describe_system",
    "expand_grub_vars",
    "family_of",
    "from_json",
    "guess_boot_sector",
    "ifupdown_interfaces",
    "is_debug_kernel",
    "major_minor",
    "merge_netplan",
    "netmask_to_prefix",
    "netplan_bindings",
    "netplan_interfaces",
    "netplan_names",
    "normalize_destination",
    "normalize_mac",
    "parse_bls_entry",
    "parse_grub2_cfg",
    "parse_grub_legacy",
    "parse_grubenv",
    "parse_hostname",
    "parse_ifcfg",
    "parse_ini",
    "parse_interfaces",
    "parse_ip_route_words",
    "parse_kernel_config",
    "parse_modules_builtin",
    "parse_modules_dep",
    "parse_netplan_yaml",
    "parse_networkd",
    "parse_nm_keyfile",
    "parse_os_release",
    "parse_redhat_release",
    "parse_route_file",
    "parse_selinux_config",
    "parse_shell_vars",
    "parse_udev_net_rules",
    "preferred_kernel",
    "resolve_default",
    "to_json",
    "version_key",
    "virtio_state",
]
