"""The YAML configuration: schema, defaults, path resolution and errors that name key and line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from taidon_proxy.config_errors import (
    KIND_SYNONYMS,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")


def parse_duration(value: object) -> float:
    """'10m' → 600.0 seconds; a bare number is seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int:
    """'20GiB' → bytes; a bare number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 20GiB)")
    unit = (m.group(2) or "b").lower()
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PsqlPrepare(_Model):
    kind: Literal["psql"]
    files: list[Path] = Field(min_length=1)
    variables: dict[str, str] = Field(default_factory=dict)


class LiquibasePrepare(_Model):
    kind: Literal["lb"]
    search_path: list[Path] = Field(default_factory=lambda: [Path(".")])
    changelog: str
    contexts: str | None = None
    labels: str | None = None
    parameters: dict[str, str] = Field(default_factory=dict)
    # Names in `parameters` whose values are secret: masked in Liquibase's output, events,
    # errors and the admin API; still part of the state id (hashed, never stored).
    secret_parameters: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _secrets_are_parameters(self) -> LiquibasePrepare:
        unknown = sorted(set(self.secret_parameters) - set(self.parameters))
        if unknown:
            raise ValueError(f"secret_parameters names no parameter: {', '.join(unknown)}")
        return self

    @field_validator("search_path", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        if isinstance(v, str):
            return [p for p in v.split(",") if p]
        return v


class CommandPrepare(_Model):
    """Any migration command, one state; hashed over its declared inputs, argv, env, version."""

    kind: Literal["command"]
    run: list[str] = Field(min_length=1)
    inputs: list[str] = Field(min_length=1)  # globs relative to the config file's directory
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=600.0, gt=0)
    version: list[str] | None = None

    _t = field_validator("timeout", mode="before")(lambda cls, v: parse_duration(v))


class AlembicPrepare(_Model):
    """An Alembic project, one state per revision in the order `alembic upgrade` applies them."""

    kind: Literal["alembic"]
    config: Path = Path("alembic.ini")
    x: list[str] = Field(default_factory=list)  # alembic -x arguments
    target: str = "heads"
    lock: Path | None = None  # a lock file whose content changes what env.py imports
    python: Path | None = None  # default: the proxy's own interpreter
    timeout: float = Field(default=3600.0, gt=0)  # per revision

    _t = field_validator("timeout", mode="before")(lambda cls, v: parse_duration(v))


class DjangoPrepare(_Model):
    """A Django project, one state per migration in the order `manage.py migrate` applies them."""

    kind: Literal["django"]
    manage: Path = Path("manage.py")  # its directory is the project's root (sys.path, cwd)
    settings: str  # the settings module, as in DJANGO_SETTINGS_MODULE
    pythonpath: list[Path] = Field(default_factory=list)  # as django-admin --pythonpath (src/)
    per: Literal["migration", "app"] = "migration"
    python: Path | None = None  # default: the proxy's own interpreter
    timeout: float = Field(default=3600.0, gt=0)  # per step

    _t = field_validator("timeout", mode="before")(lambda cls, v: parse_duration(v))


Prepare = Annotated[
    PsqlPrepare | LiquibasePrepare | CommandPrepare | AlembicPrepare | DjangoPrepare,
    Field(discriminator="kind"),
]


class Recipe(_Model):
    prepare: Prepare
    database: str | None = None  # default: the alias
    roles: list[str] = Field(default_factory=list)
    isolation: Literal["shared", "connection"] = "shared"
    idle_ttl: float | None = None
    settings: dict[str, str] = Field(default_factory=dict)  # GUCs for every instance

    @model_validator(mode="before")
    @classmethod
    def _kind_synonyms(cls, data: Any) -> Any:
        """`kind: liquibase` is `kind: lb` (one kind, one state chain, whichever is written)."""
        if isinstance(data, dict) and isinstance(data.get("prepare"), dict):
            kind = data["prepare"].get("kind")
            if isinstance(kind, str) and kind in KIND_SYNONYMS:
                data = {**data, "prepare": {**data["prepare"], "kind": KIND_SYNONYMS[kind]}}
        return data

    _ttl = field_validator("idle_ttl", mode="before")(
        lambda cls, v: None if v is None else parse_duration(v)
    )

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        for r in v:
            if not _NAME.match(r):
                raise ValueError(f"not a valid role name: {r!r}")
        return v


class AdminConfig(_Model):
    listen: str | None = "127.0.0.1:55433"


class SnapshotConfig(_Model):
    backend: Literal["auto", "copy", "overlayfs", "btrfs", "zfs"] = "auto"
    options: dict[str, str] = Field(default_factory=dict)
    dataset: str | None = None  # zfs: POOL/NAME


class MetadataConfig(_Model):
    """Where the metadata lives: the store's SQLite file, or a Postgres database shared by
    gateway replicas (docs/kubernetes-metadata.md). Give the DSN by ${NAME}: it holds a
    password."""

    kind: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str | None = None  # postgres: postgresql://user:password@host:port/database
    # postgres: this gateway's name for the rows about files in its store (default:
    # hostname:store path, stable across restarts of the same gateway).
    node: str | None = Field(default=None, min_length=1, max_length=200)
    connect_timeout: float = Field(default=10.0, gt=0)

    _t = field_validator("connect_timeout", mode="before")(lambda cls, v: parse_duration(v))

    @model_validator(mode="after")
    def _dsn(self) -> MetadataConfig:
        if self.kind == "postgres" and not self.dsn:
            raise ValueError(
                "metadata.kind postgres needs metadata.dsn (e.g. ${TAIDON_METADATA_DSN})"
            )
        if self.kind == "sqlite" and (self.dsn or self.node):
            raise ValueError("metadata.dsn and metadata.node are for metadata.kind postgres")
        return self


class RuntimeConfig(_Model):
    kind: Literal["process", "docker"] = "process"
    postgres_bin: Path | None = None
    os_user: str | None = None
    image: str | None = None
    memory: str | None = None
    cpus: float | None = None
    run_dir: Path | None = None


class AuthConfig(_Model):
    method: Literal["trust", "scram-sha-256", "password"] = "trust"
    users: dict[str, str] = Field(default_factory=dict)


# The team server (docs/team-server.md): roles from least to most; each includes the ones before.
ROLES = ("viewer", "developer", "maintainer", "admin")
Role = Literal["viewer", "developer", "maintainer", "admin"]


class Quotas(_Model):
    """Limits of a team or a user; unset: no limit."""

    instances: int | None = Field(default=None, ge=0)  # instances at once
    builds: int | None = Field(default=None, ge=1)  # builds running at once (more wait queued)
    queued: int | None = Field(default=None, ge=0)  # builds waiting at once (more: 53300)
    lifetime: float | None = Field(default=None, gt=0)  # an instance's age at most (57P01)
    disk: int | None = Field(default=None, gt=0)  # bytes its instances wrote, at most (53100)
    idle_ttl: float | None = Field(default=None, gt=0)  # the instances' idle TTL at most

    _l = field_validator("lifetime", "idle_ttl", mode="before")(
        lambda cls, v: None if v is None else parse_duration(v)
    )
    _disk = field_validator("disk", mode="before")(
        lambda cls, v: None if v is None else parse_size(v)
    )


class TeamConfig(_Model):
    members: list[str] = Field(default_factory=list)  # none: only oidc.groups fill it
    aliases: list[str] = Field(default_factory=list)  # the recipes it may use; "*": every one
    role: Role = "developer"
    quotas: Quotas = Quotas()

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[str]) -> list[str]:
        for m in v:
            if not _NAME.match(m):
                raise ValueError(f"not a valid user name: {m!r} (letters, digits, _ . -)")
        return v


class UserConfig(_Model):
    quotas: Quotas = Quotas()


class OidcConfig(_Model):
    """`sqlrs login` through an OpenID provider (docs/team-server.md, Login with OIDC)."""

    issuer: str  # its discovery document is <issuer>/.well-known/openid-configuration
    client_id: str = Field(min_length=1)
    client_secret: str | None = None  # only for a provider that will not take a public client
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    username_claim: Literal["preferred_username", "email"] = "preferred_username"
    groups_claim: str = Field(default="groups", min_length=1)
    groups: dict[str, str] = Field(default_factory=dict)  # IdP group -> team
    token_ttl: float = Field(default=12 * 3600.0, gt=0, le=366 * 86400.0)
    leeway: float = Field(default=60.0, ge=0, le=600)  # clock skew allowed on exp/iat/nbf

    _t = field_validator("token_ttl", "leeway", mode="before")(lambda cls, v: parse_duration(v))

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", v):
            raise ValueError(f"not an issuer URL: {v!r} (https://host[/path], no query)")
        return v

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("must include openid")
        return v


class TlsConfig(_Model):
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _both(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together")
        return self


class LiquibaseConfig(_Model):
    exec: str = "auto"
    # A state after every k-th changeset (and the last): auto is every one on a copy-on-write
    # store and every 10th on a plain-copy store, where each state is a full copy.
    keep_every: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"


class InstancesConfig(_Model):
    idle_ttl: float = 600.0
    max: int = Field(default=50, ge=1)
    # Started, unused per-connection instances kept ready: a number, or auto (sized from the
    # recent connect rate, at most warm_max; none without a steady stream of connections).
    warm: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    warm_max: int = Field(default=4, ge=0)
    # Started, never used clones kept ready for the first connection of a new shared label
    # (a test's own database: the pytest plugin sets it to its worker count).
    warm_labels: int = Field(default=0, ge=0)
    start_timeout: float = 60.0
    # How long a stopped shared instance's clone is kept after its last use (0 / never: forever).
    retention: float = Field(default=7 * 86400.0, ge=0)
    # Idle server connections kept per shared instance and startup parameters, for the next
    # client (reset with DISCARD ALL); 0 turns reuse off.
    server_pool: int = Field(default=8, ge=0)

    _d = field_validator("idle_ttl", "start_timeout", mode="before")(
        lambda cls, v: parse_duration(v)
    )
    _r = field_validator("retention", mode="before")(  # YAML reads a bare off as False
        lambda cls, v: 0.0 if v is False or str(v).strip().lower() == "never" else parse_duration(v)
    )


class KeepaliveConfig(_Model):
    """TCP keepalive on client connections: a client that vanished without a FIN (a cut
    network, a sleeping laptop) is dropped after idle + interval x count, its instance let go."""

    idle: float = Field(default=60.0, ge=0)  # 0: no keepalive (the OS never probes)
    interval: float = Field(default=10.0, gt=0)
    count: int = Field(default=6, ge=1, le=127)

    _d = field_validator("idle", "interval", mode="before")(lambda cls, v: parse_duration(v))


class BuildsConfig(_Model):
    """The build queue (docs/team-server.md, "Build queue"): builds running at once."""

    concurrency: int = Field(default=4, ge=1)


class CacheConfig(_Model):
    max_size: int = 20 * 2**30
    min_free: str = "10%"
    failure_ttl: float = 10.0  # how long a failed build's error is remembered

    _s = field_validator("max_size", mode="before")(lambda cls, v: parse_size(v))
    _f = field_validator("failure_ttl", mode="before")(lambda cls, v: parse_duration(v))


def default_store() -> Path:
    # Root's home is 0700, out of reach of the unprivileged user that runs the servers.
    if os.geteuid() == 0:
        return Path("/var/lib/taidon")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "taidon"


class Config(_Model):
    listen: str = "127.0.0.1:55432"
    # Who moves a session's bytes once it is spliced: the C relay thread (native; `auto`
    # uses it when it was built), or the Python protocol callbacks. TLS sessions always
    # use the Python relay.
    relay: Literal["auto", "native", "python"] = "auto"
    admin: AdminConfig = AdminConfig()
    store: Path = Field(default_factory=default_store)
    snapshot: SnapshotConfig = SnapshotConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    metadata: MetadataConfig = MetadataConfig()
    # Teams and their members' own limits (the team server); empty: one user, as before.
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    oidc: OidcConfig | None = None  # sign-in through an OpenID provider; groups map to teams
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    liquibase: LiquibaseConfig = LiquibaseConfig()
    instances: InstancesConfig = InstancesConfig()
    cache: CacheConfig = CacheConfig()
    builds: BuildsConfig = BuildsConfig()
    tcp_keepalive: KeepaliveConfig = KeepaliveConfig()
    databases: dict[str, Recipe] = Field(default_factory=dict)
    # Names a client may CREATE DATABASE on a maintenance connection (postgres, template1):
    # each becomes a fresh instance of recipe {alias}; {n} stands for digits.
    test_databases: list[str] = Field(
        default_factory=lambda: [
            "test_{alias}", "test_{alias}_{n}", "{alias}_test", "{alias}_test_{n}",
            "{alias}_test-{n}",
        ]
    )  # fmt: skip
    # At a stop, how long open sessions may go on before they are ended with 57P01.
    shutdown_grace: float = Field(default=5.0, ge=0)
    # Where the file was read from; relative paths were resolved against its directory.
    source: Path | None = None
    profile: str | None = None  # set by the loader: the profile in force (config_profiles.py)
    # Set by the loader: dotted keys whose value came from a ${file:…} (shown as "(secret)").
    file_values: list[str] = Field(default_factory=list)

    _g = field_validator("shutdown_grace", mode="before")(lambda cls, v: parse_duration(v))

    @field_validator("auth")
    @classmethod
    def _users_for_scram(cls, v: AuthConfig, info: ValidationInfo) -> AuthConfig:
        # Team members may hold only tokens (docs/team-server.md): their passwords.
        # (teams missing from info.data: they failed validation, and that error is reported)
        if v.method != "trust" and not v.users and info.data.get("teams", True) == {}:
            raise ValueError(f"auth.method {v.method} needs at least one entry in auth.users")
        return v

    @field_validator("teams", "users")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"not a valid name: {name!r} (letters, digits, _ . -)")
        return v

    @field_validator("databases")
    @classmethod
    def _aliases(cls, v: dict[str, Recipe]) -> dict[str, Recipe]:
        for alias in v:
            if not _NAME.match(alias) or ":" in alias:
                raise ValueError(f"not a valid alias: {alias!r} (letters, digits, _ . -)")
        return v

    @field_validator("test_databases")
    @classmethod
    def _test_databases(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.count("{alias}") != 1:
                raise ValueError(f"pattern {p!r} must contain {{alias}} once")
        return v

    def database_of(self, alias: str) -> str:
        return self.databases[alias].database or alias
