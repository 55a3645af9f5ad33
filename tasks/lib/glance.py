"""Glance, the OpenStack image service, from p2v's side: credentials, a session, clear errors.

Credentials come the standard OpenStack way and never from the spec: openstacksdk's
`openstack.config` reads them, as the openstack CLI does (`load_cloud`):

- a clouds.yaml entry, named by the spec (`glance.cloud`) or by `OS_CLOUD`. The file is the first
  of `$OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/clouds.yaml` and
  `/etc/openstack/clouds.yaml` that exists, with a `secure.yaml` from the same places merged over
  it, vendor profiles (`profile:`), `regions` (`OS_REGION_NAME` picks one) and every key of the
  entry: `insecure`, `verify`, `cacert`, `cert`/`key`, `api_timeout`, `interface`,
  `image_endpoint_override`;
- otherwise the `OS_*` variables (`OS_AUTH_URL`, `OS_USERNAME`, `OS_PASSWORD`, `OS_PROJECT_NAME`,
  `OS_CACERT`, `OS_INSECURE`, ...), as an openrc file sets them.

keystoneauth makes the session from what openstack.config resolved (any of its auth plugins,
`password` by default; TLS verification and client certificate as openstack.config says), and
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
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity
import yaml

from tasks.lib.runner import P2VError

if TYPE_CHECKING:
    from openstack.config.loader import OpenStackConfig

log = logging.getLogger("p2v.glance")

T = TypeVar("T")

# The clients log every request at DEBUG (keystoneauth masks the token but not every body); the
# stage logs record DEBUG, so these stay at WARNING.
for _name in ("keystoneauth", "keystoneauth1", "glanceclient", "openstack", "urllib3", "requests", "stevedore"):
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
    """One set of credentials, as openstack.config resolved them. `auth` holds secrets: never print
    it (repr hides it)."""

    name: str  # the clouds.yaml entry, or "OS_* variables"
    source: str  # the file it came from, or "environment"
    auth_type: str
    auth: Mapping[str, Any] = field(repr=False)
    region_name: str | None = None
    interface: str = "public"
    verify: bool | str = True  # False (insecure), a CA bundle (cacert), or True
    cert: str | tuple[str, str] | None = None  # a client certificate, with its key when apart (cert, key)
    timeout: float | None = None  # api_timeout
    endpoint_override: str | None = None  # image_endpoint_override: Glance's URL, not the catalog's

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


# openstack.config names the cloud it makes of the OS_* variables so (unless OS_CLOUD_NAME renames it).
FROM_ENVIRONMENT = "OS_* variables"


def config_files(cwd: Path | None, home: Path | None, stem: str) -> list[str] | None:
    """Where openstack.config looks for `stem` (clouds, secure, clouds-public): its own search path,
    or, for a caller that names another working or home directory, the same one rooted there.
    (OS_CLIENT_CONFIG_FILE and OS_CLIENT_SECURE_FILE come first either way: openstack.config adds them.)"""
    if cwd is None and home is None:
        return None
    from openstack.config import loader

    directories = [cwd or Path.cwd(), (home or Path.home()) / ".config" / "openstack", Path("/etc/openstack")]
    return [str(directory / f"{stem}{suffix}") for directory in directories
            for suffix in (*loader.YAML_SUFFIXES, *loader.JSON_SUFFIXES)]


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """openstack.config reads os.environ itself: a caller's own environment (a test's, the live
    runner's) stands in for it while the configuration is read, and the process's comes back."""
    if env is os.environ:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_cloud(name: str | None, env: Mapping[str, str] | None = None, cwd: Path | None = None,
               home: Path | None = None) -> Cloud:
    """The credentials to use: the named clouds.yaml entry (or OS_CLOUD's), else the OS_* variables.

    openstack.config reads them, as every OpenStack client does: clouds.yaml (the first of
    $OS_CLIENT_CONFIG_FILE, ./, ~/.config/openstack/, /etc/openstack/), secure.yaml merged over it,
    clouds-public.yaml and the vendor profiles (`profile:`), `regions`, and every key of an entry
    (insecure, verify, cacert, cert/key, api_timeout, interface, image_endpoint_override, ...).
    What it lets pass quietly (a file it cannot parse is skipped) and what it raises become one
    P2VError line naming the file or cloud."""
    env = os.environ if env is None else env
    name = name or env.get("OS_CLOUD") or None
    with _environment(env):
        config, searched = _read_config(env, cwd, home)
        name, source, shown = _pick(config, name, searched)
        options: dict[str, Any] = {}
        if env.get("OS_REGION_NAME"):  # as the openstack CLI does: it picks one of the entry's regions
            options["region_name"] = env["OS_REGION_NAME"]
        if source == "environment" and not env.get("OS_AUTH_TYPE") and env.get("OS_APPLICATION_CREDENTIAL_SECRET"):
            options["auth_type"] = "v3applicationcredential"  # what an application credential's openrc means
        return _resolve(config, name, source, shown, options)


def _read_config(env: Mapping[str, str], cwd: Path | None, home: Path | None) -> tuple[OpenStackConfig, list[str]]:
    """openstack.config's view of the files and the OS_* variables, and the clouds.yaml paths it tried."""
    from openstack import exceptions as os_exc
    from openstack.config import loader

    files = {stem: config_files(cwd, home, stem) for stem in ("clouds", "secure", "clouds-public")}
    try:
        config = loader.OpenStackConfig(config_files=files["clouds"], secure_files=files["secure"],
                                        vendor_files=files["clouds-public"], app_name="p2v")
    except os_exc.ConfigException as error:
        raise P2VError(f"OpenStack configuration: {error}", hint="fix the file it names") from None
    searched = _searched(env, files["clouds"] or loader.CONFIG_FILES, "OS_CLIENT_CONFIG_FILE")
    _check_read(searched, config.config_filename)
    _check_read(_searched(env, files["secure"] or loader.SECURE_FILES, "OS_CLIENT_SECURE_FILE"),
                config.secure_config_filename)
    return config, searched


def _pick(config: OpenStackConfig, name: str | None, searched: list[str]) -> tuple[str, str, str]:
    """Which cloud: (its name for openstack.config, where it comes from, its name in messages)."""
    clouds = config.cloud_config["clouds"]
    if name is None:
        if config.envvar_key not in clouds:
            raise P2VError("no OpenStack credentials: the spec names no glance.cloud, and neither OS_CLOUD nor "
                           "OS_AUTH_URL is set",
                           hint="set glance.cloud to a clouds.yaml entry, or export OS_CLOUD (or source an openrc)")
        return str(config.envvar_key), "environment", FROM_ENVIRONMENT
    if config.config_filename is None:
        looked = ", ".join(path for path in searched if path.endswith(".yaml"))
        raise P2VError(f"cloud {name!r}: no clouds.yaml found (looked in {looked})",
                       hint="write a clouds.yaml there, or set OS_CLIENT_CONFIG_FILE")
    from_file = {str(key) for key in clouds} - {config.envvar_key}
    if name not in from_file:
        known = ", ".join(sorted(from_file)) or "none"
        raise P2VError(f"cloud {name!r} is not in {config.config_filename} (clouds there: {known})",
                       hint="set glance.cloud in the spec (or OS_CLOUD) to one of them, or add the entry")
    entry = clouds[name]
    for what, value in (("the entry", entry), ("its 'auth'", entry.get("auth", {}) if isinstance(entry, Mapping)
                                                 else {})):
        if not isinstance(value, Mapping):
            raise P2VError(f"cloud {name!r} in {config.config_filename}: {what} is not a mapping",
                           hint="see the clouds.yaml format: auth holds auth_url, username, ...")
    return name, config.config_filename, name


def _resolve(config: OpenStackConfig, name: str, source: str, shown: str, options: Mapping[str, Any]) -> Cloud:
    """The cloud's settings, resolved by openstack.config (profile, region, auth plugin options)."""
    import requests
    from keystoneauth1 import exceptions as ks_exc
    from openstack import exceptions as os_exc

    where = f"cloud {shown!r} ({source})"
    fix = "set the OS_* variables for them" if source == "environment" else "add them to the entry"
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            region = config.get_one(name, **options)
            verify, cert = region.get_requests_verify_args()
    except ks_exc.NoMatchingPlugin as error:
        raise P2VError(f"{where}: unknown auth_type {error.name!r}",
                       hint="use password, v3applicationcredential or another keystoneauth plugin") from None
    except ks_exc.MissingRequiredOptions as error:
        missing = ", ".join(option.dest for option in error.options)
        raise P2VError(f"{where} lacks auth settings: {missing}", hint=fix) from None
    except requests.RequestException as error:  # a vendor profile by URL (profile: https://...) is fetched
        raise P2VError(f"{where}: its vendor profile could not be fetched ({_connection_reason(error)})",
                       hint="name a profile that openstacksdk ships, or put it in clouds-public.yaml") from None
    except (os_exc.ConfigException, ks_exc.ClientException, TypeError, AttributeError, ValueError) as error:
        raise P2VError(f"{where}: {_first_line(error)}",
                       hint="fix the entry; see openstacksdk's clouds.yaml documentation") from None
    # Its pending deprecations are about openstacksdk's own future (every cloud gets one about
    # InfluxDB); what it says about the configuration (a vendor profile not found, cacert with
    # insecure, a deprecated key) goes to the log, once.
    for message in dict.fromkeys(str(w.message) for w in said if not issubclass(w.category, PendingDeprecationWarning)):
        log.warning("%s: %s", where, message)
    resolved = region.config
    interface = region.get_interface("image")
    timeout = resolved.get("api_timeout")
    return Cloud(name=shown, source=source, auth_type=str(resolved.get("auth_type") or "password"),
                 auth=dict(resolved.get("auth") or {}), region_name=region.region_name or None,
                 interface=interface if isinstance(interface, str) else "public",
                 verify=True if verify is None else verify, cert=cert,
                 timeout=float(timeout) if timeout else None,
                 endpoint_override=resolved.get("image_endpoint_override") or None)


def _searched(env: Mapping[str, str], files: list[str], override: str) -> list[str]:
    """The files openstack.config tried, in its order: the override variable's first."""
    return [env[override], *files] if env.get(override) else list(files)


def _check_read(candidates: list[str], used: str | None) -> None:
    """openstack.config skips a file it cannot read or parse and takes the next one, or none: that
    would use other credentials than the operator wrote, so the first file there must be the one used."""
    first = next((path for path in candidates if os.path.exists(path)), None)
    if first is None or first == used:
        return
    try:
        text = Path(first).read_text()
    except OSError as error:
        raise P2VError(f"cannot read {first}: {error.strerror}") from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise P2VError(f"{first} is not valid YAML{where}", hint="fix the file; see the clouds.yaml format") from None
    raise P2VError(f"{first} was not read as OpenStack configuration", hint="fix the file; see the clouds.yaml format")


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

        where: dict[str, Any] = {"endpoint_override": cloud.endpoint_override} if cloud.endpoint_override else {}
        self.client = glance_client.Client("2", session=self.session, region_name=cloud.region_name,
                                           interface=cloud.interface, **where)

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
            ks_session.Session(auth=unscoped, verify=self.cloud.verify, cert=self.cloud.cert,
                               timeout=self.cloud.timeout).get_token()
        except ks_exc.Unauthorized:
            return ": wrong user name or password", f"check username and password of the entry in {self.cloud.source}"
        except Exception:  # a diagnosis only; the 401 stands
            return "", None
        return (f": the password is right, but the user has no role on project {self.cloud.project!r}",
                "ask the cloud's admins for the member role on the project, or name another project")

    @property
    def endpoint(self) -> str:
        if self.cloud.endpoint_override:
            return self.cloud.endpoint_override
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
    return ks_session.Session(auth=plugin, verify=cloud.verify, cert=cloud.cert, timeout=cloud.timeout,
                              app_name="p2v")
