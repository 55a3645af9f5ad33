"""The installed kernels (virtio support read from their module files and config) and the initrd tooling."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from tasks.lib.formats.netfields import parse_bool
from tasks.lib.formats.shellvars import parse_shell_vars
from tasks.lib.source.model import (
    MODULE_SUFFIXES,
    VIRTIO_DRIVERS,
    InitrdTooling,
    InitrdToolName,
    Kernel,
    VirtioState,
    VirtioSupport,
)
from tasks.lib.source.tree import SourceTree


def version_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders 5.15.0-105 after 5.15.0-91 (numbers compare as numbers)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", text))


def parse_modules_builtin(text: str) -> set[str]:
    """modules.builtin lines ('kernel/drivers/block/virtio_blk.ko') -> module names."""
    names: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if line:
            names.add(_module_name(line))
    return names


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, str]:
    """modules.dep -> {module name: path relative to the modules directory}."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        path, sep, _ = line.partition(":")
        if sep and path.strip():
            found.setdefault(_module_name(path.strip()), path.strip())
    return found


def parse_kernel_config(text: str) -> dict[str, str]:
    """/boot/config-<kver> -> {'CONFIG_VIRTIO_BLK': 'm', ...}; '# CONFIG_X is not set' -> 'n'."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip('"')
            continue
        match = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if match:
            values[match.group(1)] = "n"
    return values


def virtio_state(
    module: str,
    *,
    builtin: set[str] | None,
    module_files: set[str],
    config: Mapping[str, str] | None,
) -> VirtioState:
    """Decide one driver from what the kernel's files say.

    `builtin` is modules.builtin (None when the file is missing), `module_files`
    the module names that have a .ko* file, `config` the kernel config (None
    when missing).
    """
    if builtin is not None and module in builtin:
        return "builtin"
    if module in module_files:
        return "module"
    symbol = VIRTIO_DRIVERS[module][0]
    setting = config.get(symbol) if config is not None else None
    if setting == "y" and builtin is None:
        return "builtin"  # old kernels have no modules.builtin
    if builtin is None and not module_files and config is None:
        return "unknown"
    return "missing"


def is_debug_kernel(kver: str) -> bool:
    """RHEL 6/7 '...x86_64.debug', RHEL 8+ '...x86_64+debug', kernel-debug style '-debug'."""
    return kver.endswith((".debug", "+debug")) or "-debug" in kver


def _module_files(tree: SourceTree, modules_dir: str, names: Iterable[str]) -> set[str]:
    """Which of `names` have a module file (known path first, then modules.dep)."""
    found: set[str] = set()
    missing = []
    for name in names:
        directory = VIRTIO_DRIVERS[name][1]
        if any(tree.is_file(f"{modules_dir}/kernel/{directory}/{name}{ext}") for ext in MODULE_SUFFIXES):
            found.add(name)
        else:
            missing.append(name)
    if missing:
        dep = tree.read_text(f"{modules_dir}/modules.dep")
        if dep:
            listed = parse_modules_dep(dep)
            for name in missing:
                if name in listed and tree.is_file(f"{modules_dir}/{listed[name]}"):
                    found.add(name)
    return found


def describe_kernel(tree: SourceTree, kver: str) -> Kernel:
    modules_dir = tree.resolve(f"/lib/modules/{kver}")
    if modules_dir is not None and not tree.is_dir(modules_dir):
        modules_dir = None
    config_path = tree.first_file([f"/boot/config-{kver}"] + ([f"{modules_dir}/config"] if modules_dir else []))
    config: dict[str, str] | None = None
    if config_path:
        config = parse_kernel_config(tree.read_text(config_path) or "")
    builtin: set[str] | None = None
    module_files: set[str] = set()
    if modules_dir:
        text = tree.read_text(f"{modules_dir}/modules.builtin")
        builtin = parse_modules_builtin(text) if text is not None else None
        module_files = _module_files(tree, modules_dir, VIRTIO_DRIVERS)
    states = {
        name: virtio_state(name, builtin=builtin, module_files=module_files, config=config) for name in VIRTIO_DRIVERS
    }
    if config is not None:
        for name, state in states.items():
            if config.get(VIRTIO_DRIVERS[name][0]) == "m" and state == "missing" and modules_dir:
                tree.warn(f"kernel {kver}: {name} is configured as a module but its file is missing")
    initrd = tree.first_file(
        [f"/boot/initramfs-{kver}.img", f"/boot/initrd.img-{kver}", f"/boot/initrd-{kver}.img", f"/boot/initrd-{kver}"]
    )
    return Kernel(
        version=kver,
        vmlinuz=f"/boot/vmlinuz-{kver}",
        initrd=initrd,
        config=config_path,
        modules_dir=modules_dir,
        debug=is_debug_kernel(kver),
        rescue=kver.startswith("0-rescue-"),
        virtio=VirtioSupport(**states),
    )


def describe_kernels(tree: SourceTree) -> tuple[Kernel, ...]:
    versions = [
        name.removeprefix("vmlinuz-")
        for name in tree.listdir("/boot")
        if name.startswith("vmlinuz-")
        and len(name) > 8
        and not name.endswith(".hmac")
        and tree.is_file(f"/boot/{name}")
    ]
    if not versions:
        tree.warn("/boot holds no vmlinuz-<version>: no kernel found")
    kernels = [describe_kernel(tree, kver) for kver in versions]
    return tuple(sorted(kernels, key=lambda k: version_key(k.version), reverse=True))


_INITRD_TOOL_PATHS: Mapping[InitrdToolName, tuple[str, ...]] = {
    "dracut": ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut"),
    "initramfs-tools": ("/usr/sbin/mkinitramfs", "/usr/sbin/update-initramfs", "/etc/initramfs-tools"),
    "mkinitrd": ("/sbin/mkinitrd", "/usr/sbin/mkinitrd", "/usr/bin/mkinitrd"),
}


def _dracut_conf_files(tree: SourceTree) -> list[str]:
    """dracut.conf, then conf.d files from /usr/lib and /etc by name (/etc wins)."""
    by_name: dict[str, str] = {}
    for directory in ("/usr/lib/dracut/dracut.conf.d", "/etc/dracut.conf.d"):
        for path in tree.files(directory, "*.conf"):
            by_name[path.rsplit("/", 1)[-1]] = path
    head = ["/etc/dracut.conf"] if tree.is_file("/etc/dracut.conf") else []
    return head + [by_name[name] for name in sorted(by_name)]


def preferred_kernel(kernels: Sequence[Kernel]) -> Kernel | None:
    """The kernel to boot on KVM (virt-v2v's rule): virtio disk support first, then
    not debug, not rescue, then the newest."""
    candidates = [k for k in kernels if not k.rescue]
    if not candidates:
        return None
    return max(candidates, key=lambda k: (k.virtio.disk_ready, not k.debug, version_key(k.version)))


def describe_initrd_tooling(tree: SourceTree) -> InitrdTooling:
    tools: list[InitrdToolName] = []
    paths: list[str] = []
    for tool, candidates in _INITRD_TOOL_PATHS.items():
        hit = next((p for p in candidates if tree.exists(p)), None)
        if hit:
            tools.append(tool)
            paths.append(tree.resolve(hit) or hit)
    chosen = tools[0] if tools else None
    if chosen is None:
        tree.warn("no initrd tool found (dracut, initramfs-tools or mkinitrd)")
    version = None
    hostonly: bool | None = None
    if "dracut" in tools:
        for path in ("/usr/lib/dracut/dracut-version.sh", "/usr/share/dracut/dracut-version.sh"):
            text = tree.read_text(path)
            if text is not None:
                version = parse_shell_vars(text)[0].get("DRACUT_VERSION") or None
                break
        for path in _dracut_conf_files(tree):
            values, problems = parse_shell_vars(tree.read_text(path) or "")
            for problem in problems:
                tree.warn(f"{path}: {problem}")
            if "hostonly" in values:
                hostonly = parse_bool(values["hostonly"])
    modules = None
    if "initramfs-tools" in tools:
        for path in ["/etc/initramfs-tools/initramfs.conf", *tree.files("/etc/initramfs-tools/conf.d")]:
            values, _ = parse_shell_vars(tree.read_text(path) or "")
            modules = values.get("MODULES", modules)
    return InitrdTooling(
        tool=chosen,
        tools=tuple(sorted(tools)),
        paths=tuple(sorted(paths)),
        version=version,
        dracut_hostonly=hostonly,
        initramfs_modules=modules,
    )
