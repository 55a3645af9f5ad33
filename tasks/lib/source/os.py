"""Which distribution a tree holds: os-release, redhat-release, lsb-release, debian_version."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.lib.formats.shellvars import parse_shell_vars
from tasks.lib.source.model import Family, OSIdentity
from tasks.lib.source.tree import SourceTree


def parse_os_release(text: str) -> dict[str, str]:
    values, _ = parse_shell_vars(text)
    return values


def major_minor(version: str | None) -> tuple[str | None, int | None, int | None]:
    """'7.9.2009' -> ('7.9', 7, 9); '22.04' -> ('22.04', 22, 4); '9' -> ('9', 9, None)."""
    if not version:
        return None, None, None
    match = re.match(r"^(\d+)(?:\.(\d+))?", version)
    if not match:
        return version, None, None
    major, minor = match.group(1), match.group(2)
    text = f"{major}.{minor}" if minor is not None else major
    return text, int(major), int(minor) if minor is not None else None


_RELEASE_NAMES: tuple[tuple[str, str], ...] = (
    (r"^CentOS", "centos"),
    (r"^Red Hat Enterprise Linux", "rhel"),
    (r"^Rocky Linux", "rocky"),
    (r"^AlmaLinux", "almalinux"),
    (r"^(Oracle Linux|Enterprise Linux Enterprise Linux)", "ol"),
    (r"^Scientific Linux", "scientific"),
    (r"^CloudLinux", "cloudlinux"),
    (r"^EuroLinux", "eurolinux"),
    (r"^Fedora", "fedora"),
)


def parse_redhat_release(text: str) -> tuple[str, str | None, str]:
    """'CentOS release 6.10 (Final)' -> ('centos', '6.10', 'CentOS release 6.10 (Final)')."""
    line = next((raw.strip() for raw in text.splitlines() if raw.strip()), "")
    distro = next((d for pattern, d in _RELEASE_NAMES if re.match(pattern, line)), "rhel")
    match = re.search(r"\brelease\s+(\d+(?:\.\d+)*)", line)
    return distro, match.group(1) if match else None, line


_RHEL_IDS = {"rhel", "centos", "fedora", "rocky", "almalinux", "ol", "scientific", "cloudlinux", "eurolinux", "amzn"}


_DEBIAN_IDS = {"debian", "ubuntu", "linuxmint", "raspbian", "devuan", "pop", "kali"}


def family_of(distro: str, id_like: Sequence[str]) -> Family:
    for name in (distro, *id_like):
        if name in _RHEL_IDS:
            return "rhel"
        if name in _DEBIAN_IDS:
            return "debian"
    return "unknown"


def describe_os(tree: SourceTree) -> OSIdentity:
    sources: list[str] = []
    os_release: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = tree.read_text(path)
        if text is not None:
            os_release = parse_os_release(text)
            sources.append(path)
            break
    release: tuple[str, str | None, str] | None = None
    for path in (
        "/etc/centos-release",
        "/etc/rocky-release",
        "/etc/almalinux-release",
        "/etc/oracle-release",
        "/etc/redhat-release",
    ):
        text = tree.read_text(path)
        if text is not None and text.strip():
            release = parse_redhat_release(text)
            sources.append(path)
            break
    debian_version = (tree.read_text("/etc/debian_version") or "").strip() or None
    if debian_version:
        sources.append("/etc/debian_version")
    lsb: dict[str, str] = {}
    lsb_text = tree.read_text("/etc/lsb-release")
    if lsb_text is not None:
        lsb, _ = parse_shell_vars(lsb_text)
        if lsb:
            sources.append("/etc/lsb-release")

    id_like = tuple(os_release.get("ID_LIKE", "").split())
    distro = os_release.get("ID", "").lower()
    version = os_release.get("VERSION_ID") or None
    pretty = os_release.get("PRETTY_NAME") or None
    codename = os_release.get("VERSION_CODENAME") or os_release.get("UBUNTU_CODENAME") or None
    if not distro:
        if release is not None:
            distro, version, pretty = release[0], release[1], release[2]
        elif lsb.get("DISTRIB_ID"):
            distro = lsb["DISTRIB_ID"].lower()
            version = lsb.get("DISTRIB_RELEASE") or None
            pretty = lsb.get("DISTRIB_DESCRIPTION") or None
        elif debian_version:
            distro = "debian"
            version = debian_version if debian_version[:1].isdigit() else None
            pretty = f"Debian GNU/Linux {debian_version}"
    elif release is not None and release[1] and family_of(distro, id_like) == "rhel":
        # os-release says "7"; centos-release says "7.9.2009".
        if version is None or release[1].split(".")[0] == version.split(".")[0]:
            version = release[1]
    elif distro == "debian" and debian_version and version and debian_version.startswith(version + "."):
        version = debian_version
    if not codename and lsb.get("DISTRIB_CODENAME"):
        codename = lsb["DISTRIB_CODENAME"]
    family = family_of(distro, id_like)
    if family == "unknown":
        if release is not None:
            family = "rhel"
        elif debian_version:
            family = "debian"
    if not distro:
        tree.warn("no os-release, redhat-release, lsb-release or debian_version: distribution unknown")
        distro = "unknown"
    text, major, minor = major_minor(version)
    return OSIdentity(
        family=family,
        id=distro,
        version=text,
        major=major,
        minor=minor,
        pretty_name=pretty,
        codename=codename,
        id_like=id_like,
        sources=tuple(sources),
    )
