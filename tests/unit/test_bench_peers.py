"""bench/peers.py's pure parts: virt-v2v's domain XML, the parsing of both tools' consoles,
medians, ratios and their direction, the tables, and the arguments. The bench itself runs on demand."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.peers import (
    BootVerdict,
    Collected,
    Machine,
    Phase,
    Sizes,
    ToolFigures,
    ToolRun,
    cli_env,
    convert_table,
    disk_target,
    domain_xml,
    figures_json,
    median,
    output_disks,
    p2v_stages,
    parse_args,
    sizes_of,
    throughput_ratio,
    time_ratio,
    upload_table,
    v2v_phases,
    verdict,
)
from tasks.lib.runner import P2VError

GiB = 1 << 30


def test_domain_xml_lists_the_disks_in_boot_order_on_the_servers_bus() -> None:
    disks = [Path("/var/tmp/p2v-bench/peers-1/source/disk1.img"), Path("/var/tmp/p2v-bench/peers-1/source/disk2.img")]
    text = domain_xml("bench-plain-bookworm", disks, bus="ide", mac="52:54:00:a0:00:12", nic_model="e1000")
    domain = ET.fromstring(text)
    assert domain.tag == "domain" and domain.get("type") == "kvm"
    assert domain.findtext("name") == "bench-plain-bookworm"
    assert domain.find("memory").get("unit") == "KiB" and domain.findtext("memory") == str(1024 * 1024)  # type: ignore[union-attr]
    assert domain.find("os/type").get("arch") == "x86_64"  # type: ignore[union-attr]
    found = [(d.find("source").get("file"), d.find("target").get("dev"), d.find("target").get("bus"),  # type: ignore[union-attr]
              d.find("driver").get("type"))  # type: ignore[union-attr]
             for d in domain.findall("devices/disk")]
    assert found == [(str(disks[0]), "hda", "ide", "raw"), (str(disks[1]), "hdb", "ide", "raw")]
    assert all(d.get("device") == "disk" and d.get("type") == "file" for d in domain.findall("devices/disk"))
    nic = domain.find("devices/interface")
    assert nic is not None and nic.find("mac").get("address") == "52:54:00:a0:00:12"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "e1000"  # type: ignore[union-attr]


def test_domain_xml_escapes_paths_and_marks_uefi() -> None:
    disk = Path("/srv/a&b <c>/disk.img")
    domain = ET.fromstring(domain_xml("x", [disk], bus="sata", mac="52:54:00:00:00:01", nic_model="virtio",
                                      firmware="uefi", memory_mib=2048, vcpus=2))
    assert domain.find("devices/disk/source").get("file") == str(disk)  # type: ignore[union-attr]
    assert domain.find("devices/disk/target").get("dev") == "sda"  # type: ignore[union-attr]
    assert domain.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert domain.findtext("vcpu") == "2" and domain.findtext("memory") == str(2048 * 1024)


def test_disk_target_names_and_refusals() -> None:
    assert [disk_target("ide", 0), disk_target("sata", 1), disk_target("virtio", 2), disk_target("scsi", 25)] == [
        "hda", "sdb", "vdc", "sdz"]
    with pytest.raises(P2VError, match="bus 'floppy'"):
        disk_target("floppy", 0)
    with pytest.raises(P2VError, match="out of range"):
        disk_target("sata", 26)


V2V_CONSOLE = """\
[   0.0] Setting up the source: -i libvirtxml /tmp/domain.xml
[   2.5] Opening the source
[  40.0] Inspecting the source
[  61.0] Checking for sufficient free disk space in the guest
[  61.0] Converting Debian GNU/Linux 12 (bookworm) to run on KVM
virt-v2v: warning: something (ignored)
[ 380.3] Mapping filesystem data to avoid copying unused and blank areas
[ 392.0] Closing the overlay
[ 392.5] Assigning disks to buses
[ 392.5] Checking if the guest needs BIOS or UEFI to boot
[ 392.6] Setting up the destination: -o local -os /tmp/out
[ 395.0] Copying disk 1/2
█ 100% [****************************************]
[ 440.0] Copying disk 2/2
[ 450.0] Creating output metadata
[ 450.2] Finishing off
"""


def test_v2v_phases_time_each_step_until_the_next_and_the_last_until_the_wall_time() -> None:
    phases = v2v_phases(V2V_CONSOLE, total=451.0)
    assert phases[0] == Phase("Setting up the source: -i libvirtxml /tmp/domain.xml", 2.5)
    assert Phase("Converting Debian GNU/Linux 12 (bookworm) to run on KVM", 319.3) in phases
    assert Phase("Copying disk 1/2", 45.0) in phases
    assert phases[-1] == Phase("Finishing off", 0.8)
    assert len(phases) == 14  # the warning and the progress bar are no steps
    assert v2v_phases(V2V_CONSOLE)[-1].seconds == 0.0
    assert v2v_phases("no steps at all\n") == ()


def test_p2v_stages_from_the_doit_console_of_this_host_only() -> None:
    text = ("== inspect:bench-plain-bookworm done in 12.5 s -> /x/layout.json\n"
            ".  disk:bench-plain-bookworm\n"
            "== disk:bench-plain-bookworm done in 3.0 s -> /x/disk-plan.json\n"
            "== disk:other-host done in 9.0 s -> /y\n"
            "== verify:bench-plain-bookworm done in 88 s -> /x/verified.stamp\n")
    assert p2v_stages(text, "bench-plain-bookworm") == (Phase("inspect", 12.5), Phase("disk", 3.0),
                                                        Phase("verify", 88.0))
    assert p2v_stages(text, "bench-plain") == ()


def test_output_disks_are_virt_v2vs_files_in_order(tmp_path: Path) -> None:
    for name in ("g-sdb", "g-sda", "g.xml", "other-sda", "g-sda.xml"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in output_disks(tmp_path, "g")] == ["g-sda", "g-sdb"]


def test_sizes_count_allocated_and_apparent_bytes(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as handle:
        handle.truncate(64 << 20)
        handle.write(b"x" * 4096)
    sizes = sizes_of([sparse])
    assert sizes.apparent == 64 << 20
    assert 4096 <= sizes.allocated < 1 << 20


def test_median_and_ratio_directions() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 2.0]) == 1.5
    assert math.isnan(median([]))
    # convert: p2v's time over virt-v2v's; smaller is better
    assert time_ratio(100.0, 400.0) == 0.25
    # upload: throughput ours over theirs = their seconds over ours; larger is better
    assert throughput_ratio(GiB, 10.0, 12.0) == pytest.approx(1.2)
    assert throughput_ratio(GiB, 12.0, 10.0) == pytest.approx(10 / 12)
    assert math.isnan(throughput_ratio(GiB, 0.0, 10.0)) and math.isnan(time_ratio(1.0, 0.0))


def test_verdicts() -> None:
    assert verdict(0.2, 0.25, at_most=True) == "target <= 0.25: ok"
    assert verdict(0.3, 0.25, at_most=True) == "target <= 0.25: MISSED"
    assert verdict(1.0, 1.0, at_most=False) == "target >= 1.00: ok"
    assert verdict(0.9, 1.0, at_most=False) == "target >= 1.00: MISSED"
    assert verdict(float("nan"), 1.0, at_most=False) == "no figure"


def _convert_figures() -> list[ToolFigures]:
    p2v = ToolFigures("p2v", "doit report:h", (
        ToolRun(120.0, Sizes(GiB, 5 * GiB), (Phase("sync", 20.0),)),
        ToolRun(100.0, Sizes(GiB, 5 * GiB), (Phase("sync", 18.0), Phase("verify", 70.0))),
        ToolRun(110.0, Sizes(GiB, 5 * GiB))),
        BootVerdict(True, "login after 60 s; system-state, root-virtio, fstab, source paths ok", 60.0))
    v2v = ToolFigures("virt-v2v", "virt-v2v -i libvirtxml", (ToolRun(440.0, Sizes(2 * GiB, 4 * GiB)),),
                      BootVerdict(False, "timed out after 900 s waiting for the login: prompt"))
    return [p2v, v2v]


def test_convert_table_medians_ratio_and_boots() -> None:
    text = convert_table(_convert_figures(), "plain-bookworm (fixture server)")
    lines = text.splitlines()
    assert lines[0].startswith("convert plain-bookworm (fixture server): medians")
    p2v_line = next(line for line in lines if line.startswith("p2v "))
    assert p2v_line.split()[1] == "3" and "110.0 s" in p2v_line and "yes: login after 60 s" in p2v_line
    v2v_line = next(line for line in lines if line.startswith("virt-v2v "))
    assert "440.0 s" in v2v_line and "NO: timed out" in v2v_line
    assert "p2v / virt-v2v (wall time) = 0.25 (target <= 0.25: ok)" in lines
    # the last run's steps, when the console had them
    assert "  p2v (last run): " not in text  # the last p2v run had none
    assert "doit report:h" in text


def test_upload_table_states_the_ratio_as_throughput() -> None:
    figures = [ToolFigures("p2v", "stage", (ToolRun(10.0), ToolRun(11.0), ToolRun(12.0))),
               ToolFigures("openstack", "openstack image create", (ToolRun(11.0),)),
               ToolFigures("glance", "glance image-create", (ToolRun(9.0),))]
    text = upload_table(figures, GiB)
    assert "1.0 GiB" in text.splitlines()[0]
    assert "p2v / openstack (throughput; = openstack s / p2v s) = 1.00 (target >= 1.00: ok)" in text
    assert "p2v / glance (throughput; = glance s / p2v s) = 0.82 (target >= 1.00: MISSED)" in text


def test_figures_json_carries_runs_boots_and_ratios() -> None:
    machine = Machine("2026-12-02 09:00 UTC", 2, "/dev/vda ext4", (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    upload = [ToolFigures("p2v", "stage", (ToolRun(10.0),)), ToolFigures("glance", "glance", (ToolRun(12.0),))]
    data = figures_json(machine, _convert_figures(), upload, GiB, "plain-bookworm")
    assert data["ratios"] == {"convert_p2v_over_virt_v2v_time": 0.25,
                              "upload_p2v_over_glance_throughput": pytest.approx(1.2)}
    assert data["convert"][0]["median_seconds"] == 110.0
    assert data["convert"][1]["boot"]["boots"] is False
    assert data["convert"][0]["runs"][1]["phases"][1] == {"name": "verify", "seconds": 70.0}
    assert data["machine"]["nproc"] == 2 and data["upload_bytes"] == GiB


def test_machine_line() -> None:
    machine = Machine("2026-12-02 09:00 UTC", 2, "/dev/vda ext4 252G non-rotational", (5.52, 3.36, 2.53),
                      (4.0, 3.0, 2.0))
    assert machine.line() == ("2026-12-02 09:00 UTC, nproc 2, disk /dev/vda ext4 252G non-rotational, "
                              "load average 5.52 3.36 2.53 before, 4.00 3.00 2.00 after")


def test_cli_env_from_a_clouds_yaml_entry() -> None:
    auth = {"auth_url": "http://127.0.0.1:5000/v3", "username": "p2v", "password": "s3cret", "project_name": "p2v",
            "user_domain_name": "Default", "project_domain_name": "Default"}
    assert cli_env(auth, "RegionOne", "public") == {
        "OS_AUTH_URL": "http://127.0.0.1:5000/v3", "OS_USERNAME": "p2v", "OS_PASSWORD": "s3cret",
        "OS_PROJECT_NAME": "p2v", "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default",
        "OS_IDENTITY_API_VERSION": "3", "OS_IMAGE_API_VERSION": "2", "OS_REGION_NAME": "RegionOne",
        "OS_INTERFACE": "public"}
    assert "OS_REGION_NAME" not in cli_env({"auth_url": "u"}, None)


def test_arguments() -> None:
    options = parse_args([])
    assert (options.parts, options.repeat, options.fixture, options.size_mib, options.json) == (
        ("convert", "upload"), 1, "plain-bookworm", 1024, None)
    options = parse_args(["--parts", "upload", "--repeat", "3", "--size-mib", "64", "--json", "f.json"])
    assert (options.parts, options.repeat, options.size_mib, options.json) == (("upload",), 3, 64, Path("f.json"))


@pytest.mark.parametrize("argv", [["--parts", "convert,tar"], ["--parts", ","], ["--repeat", "0"],
                                  ["--size-mib", "0"], ["--repeat", "x"]])
def test_bad_arguments_stop_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert "usage: python -m bench.peers" in capsys.readouterr().err


def test_an_interrupted_bench_prints_what_finished_and_no_ratio_without_both() -> None:
    collected = Collected({"p2v": "doit", "virt-v2v": "virt-v2v"})
    assert collected.figures() == []
    collected.add("virt-v2v", ToolRun(1555.8, Sizes(GiB, 4 * GiB), (Phase("Copying disk 1/2", 2.2),)))
    (only,) = collected.figures()
    assert only.tool == "virt-v2v" and only.boot is None
    text = convert_table([only], "plain-bookworm (fixture server)")
    assert "1555.8 s" in text and "not checked" in text and "p2v / virt-v2v" not in text
    assert "  virt-v2v (last run): Copying disk 1/2 2 s" in text
    collected.add("p2v", ToolRun(100.0))
    collected.boots["p2v"] = BootVerdict(True, "ok")
    assert [f.tool for f in collected.figures()] == ["p2v", "virt-v2v"]  # the table's order, not the runs'
    assert collected.figures()[0].boot == BootVerdict(True, "ok")
