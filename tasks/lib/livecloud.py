"""The credential a live system uploads with: a Keystone application credential, never a password.

When a spec's `live.last_stage` is `upload`, the server's live system uploads the image itself,
so it needs credentials. They reach it through its own directory of the work area, which the
NFS export admits to that server's address alone (tasks/lib/pxe.py). What goes there is narrow
on purpose: one clouds.yaml entry of type `v3applicationcredential` (a credential the operator
created for the conversion, with the member role on the image project and nothing more, that
can be revoked on its own), plus its CA bundle when the cloud has one. A password or token entry
is refused with one line: it would hand the operator's whole identity to a server that other
people still own. With an earlier last stage nothing is written, and whatever an earlier
rendering left is removed: the credentials then stay on the infra side, where upload runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.glance import Cloud, load_cloud
from tasks.lib.pxe import write_if_changed
from tasks.lib.runner import P2VError
from tasks.lib.spec import Spec

APPLICATION_CREDENTIAL = "v3applicationcredential"
# In the host's directory of the work area; the runner points OS_CLIENT_CONFIG_FILE at it.
CLOUD_DIR = "cloud"
CLOUDS_FILE = "clouds.yaml"
CA_FILE = "cacert.pem"
# The entry's name when the infra side's credentials came from OS_* variables.
ENTRY_FROM_ENVIRONMENT = "p2v-live"
# What an application credential entry may carry: how to find the credential, never more.
AUTH_KEYS = ("auth_url", "application_credential_id", "application_credential_name",
             "application_credential_secret", "user_id", "username", "user_domain_id", "user_domain_name")


def uploads_from_live(spec: Spec) -> bool:
    return spec.live.last_stage == "upload"


def check_application_credential(spec: Spec, cloud: Cloud) -> None:
    """One line naming the spec and the field when `cloud` may not go to the server."""
    if cloud.auth_type.replace("-", "").lower() != APPLICATION_CREDENTIAL:
        raise P2VError(
            f"{spec.file}: live.last_stage is upload, so the server's live system uploads, but cloud "
            f"{cloud.name!r} ({cloud.source}) authenticates with {cloud.auth_type!r}: p2v never puts a password "
            "or token into the work area",
            hint=f"name an application credential in glance.cloud (openstack application credential create "
                 f"--role member p2v-{spec.host}), or set live.last_stage: report and run upload:{spec.host} "
                 "on the infra side")
    if not cloud.auth.get("application_credential_secret"):
        raise P2VError(f"{spec.file}: cloud {cloud.name!r} ({cloud.source}) has no application_credential_secret",
                       hint="add the secret to the entry (or to secure.yaml)")
    if cloud.cert is not None:
        raise P2VError(f"{spec.file}: cloud {cloud.name!r} ({cloud.source}) authenticates with a client certificate "
                       "(cert/key), which p2v does not put into the work area",
                       hint=f"use an application credential without one, or set live.last_stage: report and run "
                            f"upload:{spec.host} on the infra side")
    if not (cloud.auth.get("application_credential_id") or cloud.auth.get("application_credential_name")):
        raise P2VError(f"{spec.file}: cloud {cloud.name!r} ({cloud.source}) names no application credential "
                       "(application_credential_id, or _name with the user)")


def entry_name(cloud: Cloud) -> str:
    return ENTRY_FROM_ENVIRONMENT if cloud.source == "environment" else cloud.name


def render_live_clouds(cloud: Cloud, cacert: str | None) -> str:
    """The whole clouds.yaml the live system gets: the one entry, its secret and nothing else."""
    entry: dict[str, Any] = {
        "auth_type": APPLICATION_CREDENTIAL,
        "auth": {key: cloud.auth[key] for key in AUTH_KEYS if cloud.auth.get(key)},
        "interface": cloud.interface,
    }
    if cloud.region_name:
        entry["region_name"] = cloud.region_name
    if cloud.endpoint_override:
        entry["image_endpoint_override"] = cloud.endpoint_override
    if cloud.timeout:
        entry["api_timeout"] = cloud.timeout
    if cacert:
        entry["cacert"] = cacert
    elif cloud.verify is False:
        entry["verify"] = False
    header = ("# Written by `doit pxe` for this server's live system alone (its NFS export admits only\n"
              "# its address). An application credential: revoke it when the conversion is done.\n")
    return header + yaml.safe_dump({"clouds": {entry_name(cloud): entry}}, sort_keys=False)


def write_live_cloud(spec: Spec, host_dir: Path, env: Mapping[str, str] | None = None) -> str | None:
    """Give the host's live system its credential, or take an earlier one away.

    Returns the entry's name when a credential was written."""
    directory = host_dir / CLOUD_DIR
    if not uploads_from_live(spec):
        shutil.rmtree(directory, ignore_errors=True)
        return None
    try:
        cloud = load_cloud(spec.glance.cloud, env=env)
    except P2VError as error:
        raise P2VError(f"{spec.file}: live.last_stage is upload, so the server's live system needs a "
                       f"credential: {error.args[0]}", hint=error.hint) from None
    check_application_credential(spec, cloud)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    cacert = None
    if isinstance(cloud.verify, str):
        source = Path(cloud.verify)
        if not source.is_file():
            raise P2VError(f"{spec.file}: the CA bundle {source} of cloud {cloud.name!r} is not there")
        write_if_changed(directory / CA_FILE, source.read_text(), 0o644)
        cacert = str(directory / CA_FILE)  # the same path on the server: the work area is mounted there
    write_if_changed(directory / CLOUDS_FILE, render_live_clouds(cloud, cacert), 0o600)
    return entry_name(cloud)


def live_cloud_env(host_dir: Path) -> dict[str, str]:
    """For the live runner: the variables that make upload use the work area's credential."""
    clouds = host_dir / CLOUD_DIR / CLOUDS_FILE
    if not clouds.is_file():
        return {}
    names = list((yaml.safe_load(clouds.read_text()) or {}).get("clouds", {}))
    if len(names) != 1:
        raise P2VError(f"{clouds} should hold exactly one cloud entry, it holds {len(names)}",
                       hint="run `doit pxe` on the infra side again")
    return {"OS_CLIENT_CONFIG_FILE": str(clouds), "OS_CLOUD": str(names[0])}
