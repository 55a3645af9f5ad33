"""Where cloud-init comes from: the package step's command lines, per package manager and source."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.lib.packages import APT_SCRATCH, REPO_MOUNT, PackageSource, packages_to_install, plan_install
from tasks.lib.runner import P2VError
from tests.unit.layouts import layout


def system(manager: str, codename: str | None = "bookworm") -> dict[str, Any]:
    return {"system": {"package_manager": manager, "os": {"codename": codename}}}


def test_source_kinds_from_the_spec() -> None:
    assert PackageSource.from_spec("distro") == PackageSource("distro", "")
    assert PackageSource.from_spec("http://deb.example/debian/") == PackageSource("url", "http://deb.example/debian")
    assert PackageSource.from_spec("/srv/debs") == PackageSource("directory", "/srv/debs")


def test_apt_from_a_directory_uses_a_flat_repository_of_its_own_and_no_network() -> None:
    plan = plan_install(layout("plain-bookworm"), PackageSource("directory", "/srv/debs"),
                        ["cloud-init", "qemu-guest-agent", "cloud-init"])
    assert plan.manager == "apt" and plan.packages == ("cloud-init", "qemu-guest-agent")
    assert not plan.needs_network
    assert plan.files == {f"{APT_SCRATCH}/sources.list": f"deb [trusted=yes] file:{REPO_MOUNT} ./\n"}
    mkdir, configure, update, install = plan.commands
    assert mkdir[:2] == ("mkdir", "-p")
    assert configure == ("dpkg", "--configure", "-a")  # what a killed run left half-installed, finished first
    # Lists, archives and sources all under the chroot's /run: nothing of it stays in the image.
    for option in (f"Dir::Etc::SourceList={APT_SCRATCH}/sources.list", "Dir::Etc::SourceParts=-",
                   f"Dir::State::Lists={APT_SCRATCH}/lists", f"Dir::Cache::Archives={APT_SCRATCH}/archives"):
        assert option in update and option in install
    assert update[-1] == "update"
    assert install[-4:] == ("-o", "Dpkg::Options::=--force-confold", "cloud-init", "qemu-guest-agent")
    assert "--no-install-recommends" in install


def test_apt_from_a_mirror_names_the_release() -> None:
    plan = plan_install(system("apt", "bullseye"), PackageSource("url", "http://mirror.example/debian"), ["cloud-init"])
    assert plan.files[f"{APT_SCRATCH}/sources.list"] == "deb http://mirror.example/debian bullseye main\n"
    assert plan.needs_network
    with pytest.raises(P2VError, match="codename is unknown"):
        plan_install(system("apt", None), PackageSource("url", "http://mirror.example/debian"), ["cloud-init"])


def test_apt_from_the_servers_own_repositories_keeps_its_sources_but_not_its_lists() -> None:
    plan = plan_install(system("apt"), PackageSource("distro", ""), ["cloud-init"])
    assert plan.files == {} and plan.needs_network
    update = plan.commands[2]
    assert not any("SourceList" in item or "SourceParts" in item for item in update)
    assert f"Dir::State::Lists={APT_SCRATCH}/lists" in update


def test_yum_and_dnf() -> None:
    local = plan_install(system("yum"), PackageSource("directory", "/srv/rpms"), ["cloud-init"])
    assert local.commands == (("sh", "-c", f"yum -y --disablerepo='*' --nogpgcheck localinstall "
                                            f"{REPO_MOUNT}/pool/*.rpm"),)
    mirror = plan_install(system("dnf"), PackageSource("url", "http://mirror.example/el9/"), ["cloud-init"])
    assert mirror.files == {"/run/p2v-yum/p2v.repo": "[p2v]\nname=p2v packages\nbaseurl=http://mirror.example/el9/"
                                                     "\nenabled=1\ngpgcheck=0\n"}
    assert mirror.commands == (("dnf", "-y", "--setopt=reposdir=/run/p2v-yum", "--disablerepo=*", "--enablerepo=p2v",
                                "install", "cloud-init"),)
    distro = plan_install(system("yum"), PackageSource("distro", ""), ["cloud-init"])
    assert distro.commands == (("yum", "-y", "install", "cloud-init"),)


def test_unknown_package_manager_is_a_clear_error() -> None:
    with pytest.raises(P2VError, match="no package manager known"):
        plan_install(system("pacman"), PackageSource("distro", ""), ["cloud-init"])


def test_after_an_unfinished_fix_what_the_server_lacked_is_installed_of_what_the_spec_still_wants() -> None:
    wanted = ["cloud-init", "qemu-guest-agent"]
    # The killed run installed cloud-init: installed again, so that the receipt names both.
    assert packages_to_install(wanted, ["qemu-guest-agent"], ["cloud-init", "qemu-guest-agent"]) == wanted
    # The spec changed since: a package it no longer wants is not installed, a new one is.
    assert packages_to_install(["qemu-guest-agent", "jq"], ["jq"], ["cloud-init", "qemu-guest-agent"]) == [
        "qemu-guest-agent", "jq"]
    assert packages_to_install(wanted, [], []) == []
