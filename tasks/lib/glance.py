"""Glance, the OpenStack image service, from p2v's side: credentials, a session, clear errors.

Credentials come the standard OpenStack way and never from the spec:

- a clouds.yaml entry, named by the spec (`glance.cloud`) or by `OS_CLOUD`. The file is the first
  of `$OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/clouds.yaml` and
  `/etc/openstack/clouds.yaml` that exists (as openstacksdk looks them up), with a `secure.yaml`
  from the same places merged over it;
- otherwise the `OS_*` variables (`OS_AUTH_URL`, `OS_USERNAME`, `OS_PASSWORD`, `OS_PROJECT_NAME`,
  ...), as an openrc file sets them.

keystoneauth makes the session (any of its auth plugins, `password` by default), and
python-glanceclient v2 talks to the image endpoint from the catalog. Every client error becomes a
`P2VError` with one line that says what happened and what to do; errors worth retrying (the
service unreachable, a reset connection, a 5xx) are a `TransientError`, which `retrying` retries
with exponential backoff (tenacity). Passwords and tokens never reach a message or a log: the
clients' own debug logging (which prints requests) is kept out of the stage logs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tenacity
import yaml

from tasks.lib.runner import P2VError

log = logging.getLogger("p2v.glance")

T = TypeVar("T")

# The clients log every request at DEBUG (keystoneauth masks the token but not every body); the
# stage logs record DEBUG, so these stay at WARNING.
for _name in ("keystoneauth", "keystoneauth1", "glanceclient", "urllib3", "requests", "stevedore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Image states of an upload that did not finish: a rerun deletes those with our provenance.
UNFINISHED = frozenset({"queued", "saving", "uploading", "importing", "killed"})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    wait_min: float = 1.0
    wait_max: float = 30.0


RETRY = RetryPolicy(attempts=int(os.environ.get("P2V_GLANCE_ATTEMPTS", "6")))


class TransientError(P2VError):
    """Worth another try: the service is unreachable, restarting or overloaded."""


class AuthError(P2VError):
    """Keystone refused the credentials."""


# ---------------------------------------------------------------- where the credentials are


@dataclass(frozen=True)
class Cloud:
    """One set of credentials. `auth` holds secrets: never print it (repr hides it)."""

    name: str  # the clouds.yaml entry, or "OS_* variables"
    source: str  # the file it came from, or "environment"
    auth_type: str
    auth: Mapping[str, Any] = field(repr=False)
    region_name: str | None = None
    interface: str = "public"
    verify: bool | str = True

    @property
    def auth_url(self) -> str:
        return str(self.auth.get("auth_url", ""))

    @property
    def user(self) -> str:
        return str(self.auth.get("username") or self.auth.get("user_id") or
                   self.auth.get("application_credential_name") or self.auth.get("application_credential_id") or "?")

    @property
    def project(self) -> str:
        return str(self.auth.get("project_name") or self.auth.get("project_id") or "?")

    def public(self) -> dict[str, Any]:
        """What may be shown and recorded: no password, secret or token."""
        return {"cloud": self.name, "source": self.source, "auth_url": self.auth_url, "auth_type": self.auth_type,
                "user": self.user, "project": self.project, "region": self.region_name, "interface": self.interface}


def config_paths(env: Mapping[str, str], cwd: Path, home: Path, name: str = "clouds") -> list[Path]:
    """Where clouds.yaml (or secure.yaml) may be, in the order openstacksdk tries them."""
    paths = []
    override = env.get("OS_CLIENT_CONFIG_FILE" if name == "clouds" else "OS_CLIENT_SECURE_FILE")
    if override:
        paths.append(Path(override))
    for directory in (cwd, home / ".config" / "openstack", Path("/etc/openstack")):
        for suffix in (".yaml", ".yml"):
            paths.append(directory / f"{name}{suffix}")
    return paths


def _read_clouds(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise P2VError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise P2VError(f"{path} is not valid YAML{where}", hint="fix the file; see the clouds.yaml format") from None
    clouds = data.get("clouds") if isinstance(data, dict) else None
    if not isinstance(clouds, dict):
        raise P2VError(f"{path} has no 'clouds:' mapping")
    return clouds


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_cloud(name: str | None, env: Mapping[str, str] | None = None, cwd: Path | None = None,
               home: Path | None = None) -> Cloud:
    """The credentials to use: the named clouds.yaml entry (or OS_CLOUD's), else OS_* variables."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    home = Path.home() if home is None else home
    name = name or env.get("OS_CLOUD") or None
    if name is None:
        return _cloud_from_env(env)
    candidates = config_paths(env, cwd, home)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p) for p in candidates if p.suffix == ".yaml")
        raise P2VError(f"cloud {name!r}: no clouds.yaml found (looked in {looked})",
                       hint="write a clouds.yaml there, or set OS_CLIENT_CONFIG_FILE")
    clouds = _read_clouds(found)
    if name not in clouds:
        known = ", ".join(sorted(map(str, clouds))) or "none"
        raise P2VError(f"cloud {name!r} is not in {found} (clouds there: {known})",
                       hint="set glance.cloud in the spec (or OS_CLOUD) to one of them, or add the entry")
    entry = clouds[name]
    if not isinstance(entry, Mapping):
        raise P2VError(f"cloud {name!r} in {found} is not a mapping")
    secure = next((p for p in config_paths(env, cwd, home, "secure") if p.is_file()), None)
    if secure is not None:
        secure_entry = _read_clouds(secure).get(name)
        if isinstance(secure_entry, Mapping):
            entry = _merge(entry, secure_entry)
    auth = entry.get("auth") or {}
    if not isinstance(auth, Mapping):
        raise P2VError(f"cloud {name!r} in {found}: 'auth' is not a mapping")
    verify: bool | str = entry.get("cacert") or bool(entry.get("verify", True))
    return Cloud(name=name, source=str(found), auth_type=str(entry.get("auth_type", "password")),
                 auth={str(k).replace("-", "_"): v for k, v in auth.items()},
                 region_name=entry.get("region_name") or entry.get("region") or None,
                 interface=str(entry.get("interface") or entry.get("endpoint_type") or "public"), verify=verify)


def _cloud_from_env(env: Mapping[str, str]) -> Cloud:
    if not env.get("OS_AUTH_URL"):
        raise P2VError("no OpenStack credentials: the spec names no glance.cloud, and neither OS_CLOUD nor "
                       "OS_AUTH_URL is set",
                       hint="set glance.cloud to a clouds.yaml entry, or export OS_CLOUD (or source an openrc)")
    skip = {"OS_CLOUD", "OS_AUTH_TYPE", "OS_REGION_NAME", "OS_INTERFACE", "OS_ENDPOINT_TYPE", "OS_CACERT",
            "OS_INSECURE", "OS_IDENTITY_API_VERSION", "OS_CLIENT_CONFIG_FILE", "OS_CLIENT_SECURE_FILE"}
    auth = {key[3:].lower(): value for key, value in env.items() if key.startswith("OS_") and key not in skip}
    if "tenant_name" in auth:
        auth.setdefault("project_name", auth.pop("tenant_name"))
    if "tenant_id" in auth:
        auth.setdefault("project_id", auth.pop("tenant_id"))
    verify: bool | str = env.get("OS_CACERT") or env.get("OS_INSECURE", "").lower() not in ("1", "true", "yes")
    auth_type = env.get("OS_AUTH_TYPE") or ("v3applicationcredential" if "application_credential_secret" in auth
                                            else "password")
    return Cloud(name="OS_* variables", source="environment", auth_type=auth_type, auth=auth,
                 region_name=env.get("OS_REGION_NAME") or None,
                 interface=env.get("OS_INTERFACE") or env.get("OS_ENDPOINT_TYPE") or "public", verify=verify)


# ---------------------------------------------------------------- errors


def _status(error: BaseException) -> int | None:
    for attr in ("http_status", "code", "status_code"):
        value = getattr(error, attr, None)
        if isinstance(value, int):
            return value
    return None


def translate(error: Exception, what: str, cloud: Cloud) -> P2VError:
    """A client exception -> one operator line; TransientError for what is worth retrying."""
    from glanceclient import exc as glance_exc
    from keystoneauth1 import exceptions as ks_exc

    if isinstance(error, P2VError):
        return error
    where = f"cloud {cloud.name!r} ({cloud.auth_url})"
    status = _status(error)
    if isinstance(error, ks_exc.EndpointNotFound | ks_exc.EmptyCatalog):
        return P2VError(f"{what}: no image service (Glance) in the catalog of {where}, region "
                        f"{cloud.region_name or 'any'}, interface {cloud.interface}",
                        hint="check region_name and interface of the cloud entry")
    if isinstance(error, ks_exc.SSLError | glance_exc.SSLCertificateError | glance_exc.SSLConfigurationError):
        return P2VError(f"{what}: TLS failed with {where}: {_first_line(error)}",
                        hint="set cacert in the cloud entry (or OS_CACERT)")
    if isinstance(error, ks_exc.ConnectFailure | ks_exc.ConnectTimeout | ks_exc.UnknownConnectionError |
                  ks_exc.RetriableConnectionFailure | glance_exc.CommunicationError | glance_exc.InvalidEndpoint |
                  ConnectionError | TimeoutError):
        return TransientError(f"{what}: cannot reach {_url_in(error) or 'the service'} ({_connection_reason(error)})")
    if isinstance(error, ks_exc.DiscoveryFailure):
        return P2VError(f"{what}: no Keystone identity API at {cloud.auth_url}: {_first_line(error)}",
                        hint="check auth_url in the cloud entry (it usually ends in /v3)")
    if isinstance(error, ks_exc.MissingRequiredOptions):
        return P2VError(f"{what}: cloud {cloud.name!r} ({cloud.source}) lacks auth settings: {_first_line(error)}")
    if status == 401:
        return AuthError(f"{what}: Keystone refused user {cloud.user!r} for project {cloud.project!r} of {where} "
                         "(401 Unauthorized)", hint="check the user, password and project of the cloud entry")
    if status == 403:
        return P2VError(f"{what}: Glance refused (403 Forbidden): user {cloud.user!r} may not do this in project "
                        f"{cloud.project!r}",
                        hint="the user needs the member role on the project (a reader only reads)")
    if status == 413:
        return P2VError(f"{what}: Glance refused the data (413): the image store is full or the project's image "
                        "quota is exhausted", hint="free space in the image store or raise the quota, then rerun")
    if status is not None and status >= 500:
        return TransientError(f"{what}: Glance answered {status}: {_first_line(error)}")
    if status is not None:
        return P2VError(f"{what}: Glance answered {status}: {_first_line(error)}")
    return P2VError(f"{what}: {type(error).__name__}: {_first_line(error)}")


def _url_in(error: BaseException) -> str | None:
    match = re.search(r"https?://[^\s/:'\"]+(:\d+)?", str(error))
    return match.group(0) if match else None


def _connection_reason(error: BaseException) -> str:
    """What went wrong with a connection, in a few words, from the whole chain of causes."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(f"{type(e).__name__} {e}" for e in chain)
    for marker, reason in (("Connection refused", "connection refused"), ("ConnectionRefused", "connection refused"),
                           ("Connection reset", "connection reset"), ("ConnectionReset", "connection reset"),
                           ("RemoteDisconnected", "the server closed the connection"),
                           ("Broken pipe", "connection broken"), ("BrokenPipe", "connection broken"),
                           ("timed out", "timed out"), ("Timeout", "timed out"),
                           ("Name or service not known", "unknown host name"),
                           ("Temporary failure in name resolution", "name resolution failed")):
        if marker in text:
            return reason
    return _first_line(error)[:160]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def retrying(what: str, action: Callable[[], T], cloud: Cloud, policy: RetryPolicy | None = None) -> T:
    """Run `action`; a TransientError (after translation) is retried with exponential backoff."""
    policy = policy or RETRY

    def attempt() -> T:
        try:
            return action()
        except Exception as error:  # every client error is translated, then judged
            raise translate(error, what, cloud) from error

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning("%s (attempt %d of %d; retrying in %.0f s)", error, state.attempt_number, policy.attempts, wait)

    try:
        result: T = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=tenacity.stop_after_attempt(policy.attempts),
            wait=tenacity.wait_exponential(multiplier=policy.wait_min, min=policy.wait_min, max=policy.wait_max),
            before_sleep=before_sleep,
            reraise=True,
        )(attempt)
    except TransientError as error:
        raise P2VError(f"{error} (gave up after {policy.attempts} attempts)",
                       hint=f"check that the image service of cloud {cloud.name!r} is up, then rerun; "
                            "an interrupted upload is cleaned up") from None
    return result


# ---------------------------------------------------------------- the image service


class ImageService:
    """Glance through keystoneauth and glanceclient v2, with translated errors."""

    def __init__(self, cloud: Cloud, session: Any = None):
        self.cloud = cloud
        self.session = session if session is not None else make_session(cloud)
        from glanceclient import client as glance_client

        self.client = glance_client.Client("2", session=self.session, region_name=cloud.region_name,
                                           interface=cloud.interface)

    def call(self, what: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except Exception as error:
            raise translate(error, what, self.cloud) from error

    def authenticate(self) -> None:
        """Get a token now, so that refused credentials fail first, and say why Keystone refused."""
        try:
            retrying("authenticating", lambda: self.session.get_token(), self.cloud)
        except AuthError as error:
            why, hint = self._why_refused()
            raise AuthError(str(error).split(" (hint:")[0] + why, hint=hint or error.hint) from None

    def _why_refused(self) -> tuple[str, str | None]:
        """Keystone says 401 for a wrong password and for no role on the project alike; an
        unscoped token (same user and password, no project) tells them apart."""
        if self.cloud.auth_type not in ("password", "v3password") or not self.cloud.auth.get("password"):
            return "", None
        from keystoneauth1 import exceptions as ks_exc
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        keep = ("auth_url", "username", "user_id", "password", "user_domain_name", "user_domain_id")
        try:
            unscoped = v3.Password(**{k: v for k, v in self.cloud.auth.items() if k in keep})
            ks_session.Session(auth=unscoped, verify=self.cloud.verify).get_token()
        except ks_exc.Unauthorized:
            return ": wrong user name or password", f"check username and password of the entry in {self.cloud.source}"
        except Exception:  # a diagnosis only; the 401 stands
            return "", None
        return (f": the password is right, but the user has no role on project {self.cloud.project!r}",
                "ask the cloud's admins for the member role on the project, or name another project")

    @property
    def endpoint(self) -> str:
        url = self.call("looking up the image endpoint", lambda: self.session.get_endpoint(
            service_type="image", interface=self.cloud.interface, region_name=self.cloud.region_name))
        return str(url)

    @property
    def project_id(self) -> str:
        return str(self.call("looking up the project", lambda: self.session.get_project_id()))

    def find(self, **filters: str) -> list[dict[str, Any]]:
        """Images visible to us whose properties match `filters` (every page)."""
        return retrying("listing images", lambda: [dict(i) for i in self.client.images.list(filters=filters)],
                        self.cloud)

    def get(self, image_id: str) -> dict[str, Any]:
        return retrying(f"reading image {image_id}", lambda: dict(self.client.images.get(image_id)), self.cloud)

    def create(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        return self.call("creating the image", lambda: dict(self.client.images.create(**fields)))

    def upload(self, image_id: str, reader: Any, size: int) -> None:
        self.call(f"uploading the data of image {image_id}",
                  lambda: self.client.images.upload(image_id, reader, image_size=size))

    def delete(self, image_id: str) -> None:
        retrying(f"deleting image {image_id}", lambda: self.client.images.delete(image_id), self.cloud)

    def delete_quietly(self, image_id: str) -> bool:
        """Best effort, once, for cleanup after a failure; a rerun deletes what this leaves."""
        try:
            self.client.images.delete(image_id)
        except Exception as error:
            log.warning("could not delete the unfinished image %s now (%s); the next run deletes it",
                        image_id, _first_line(error))
            return False
        log.info("deleted the unfinished image %s", image_id)
        return True

    def download(self, image_id: str) -> Iterator[bytes]:
        chunks: Iterator[bytes] = self.call(f"downloading image {image_id}", lambda: self.client.images.data(image_id))
        return chunks


def make_session(cloud: Cloud) -> Any:
    from keystoneauth1 import exceptions as ks_exc
    from keystoneauth1 import loading
    from keystoneauth1 import session as ks_session

    try:
        loader: Any = loading.get_plugin_loader(cloud.auth_type)
    except ks_exc.NoMatchingPlugin:
        raise P2VError(f"cloud {cloud.name!r}: unknown auth_type {cloud.auth_type!r}") from None
    options = {option.dest for option in loader.get_options()}
    unknown = sorted(set(cloud.auth) - options)
    if unknown:
        log.debug("cloud %s: ignoring auth settings %s (not used by %s)", cloud.name, ", ".join(unknown),
                  cloud.auth_type)
    try:
        plugin = loader.load_from_options(**{k: v for k, v in cloud.auth.items() if k in options})
    except ks_exc.MissingRequiredOptions as error:
        missing = ", ".join(option.dest for option in error.options)
        raise P2VError(f"cloud {cloud.name!r} ({cloud.source}) lacks auth settings: {missing}") from None
    return ks_session.Session(auth=plugin, verify=cloud.verify, app_name="p2v")
