"""The proxy the fixtures talk to: its Postgres address, its admin API, and test databases."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from taidon_proxy.errors import TaidonError

REQUEST_TIMEOUT = 60.0
LABEL_PREFIX = "pytest-"  # every test database's label starts so


class TaidonPluginError(TaidonError):
    """A problem the user must fix (no proxy, wrong alias, a refused request); pytest shows
    its message as the reason a test could not get its database."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the admin API's HTTP status, when it answered

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TaidonDatabase:
    """One fresh database: the recipe's state under `alias:label`, removed after its scope."""

    alias: str
    label: str
    host: str
    port: int
    user: str

    @property
    def name(self) -> str:
        """The database name a client asks for (ALIAS:LABEL)."""
        return f"{self.alias}:{self.label}"

    @property
    def dsn(self) -> str:
        name = urllib.parse.quote(self.name, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host.startswith("/"):  # a unix socket directory
            query = urllib.parse.urlencode({"host": self.host, "port": self.port})
            return f"postgresql://{self.user}@/{name}?{query}"
        return f"postgresql://{self.user}@{host}:{self.port}/{name}"

    def psycopg_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": self.name}

    def asyncpg_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "database": self.name}


@dataclass(frozen=True)
class Endpoint:
    """A running proxy: its admin base URL and token, and where clients connect."""

    admin_url: str
    token: str | None
    host: str
    port: int
    aliases: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "admin_url": self.admin_url,
            "token": self.token,
            "host": self.host,
            "port": self.port,
            "aliases": list(self.aliases),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        return cls(
            admin_url=data["admin_url"],
            token=data["token"],
            host=data["host"],
            port=int(data["port"]),
            aliases=tuple(data["aliases"]),
        )

    @classmethod
    def discover(cls, admin_url: str, token: str | None) -> Endpoint:
        """Ask a running proxy's /v1/status where its clients connect and what it serves."""
        return cls.of_status(admin_url, token, call(admin_url, token, "GET", "/v1/status"))

    @classmethod
    def of_status(cls, admin_url: str, token: str | None, status: dict[str, Any]) -> Endpoint:
        addresses = status.get("listeners", {}).get("proxy", [])
        if not addresses:
            raise TaidonPluginError(f"the proxy at {admin_url} listens nowhere for clients")
        host, port = split_address(addresses[0])
        return cls(admin_url, token, host, port, tuple(status.get("aliases", [])))

    def database(self, alias: str, label: str, user: str) -> TaidonDatabase:
        if alias not in self.aliases:
            known = ", ".join(self.aliases) or "none"
            raise TaidonPluginError(
                f'taidon: unknown alias "{alias}" (the proxy at {self.admin_url} serves: {known});'
                " set taidon_alias in the ini file or pass --taidon-alias"
            )
        return TaidonDatabase(alias, label, self.host, self.port, user)

    def remove(self, db: TaidonDatabase) -> bool:
        """Remove the database's instance (its clients are ended); False if it never started."""
        try:
            call(self.admin_url, self.token, "DELETE", f"/v1/instances/{db.name}")
        except TaidonPluginError as e:
            if e.status == 404:
                return False
            raise
        return True


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or a unix socket path `/dir/.s.PGSQL.PORT`."""
    if address.startswith("/"):
        directory, _, sock = address.rpartition("/")
        return directory, int(sock.rsplit(".", 1)[1])
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def call(admin_url: str, token: str | None, method: str, path: str) -> Any:
    """One admin API request; a refusal or an unreachable proxy is a TaidonPluginError."""
    req = urllib.request.Request(admin_url + urllib.parse.quote(path, safe="/:"), method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", {}).get("message", "")
        except ValueError:
            message = ""
        raise TaidonPluginError(
            f"taidon: {method} {path} at {admin_url} failed: {e.code} {message}".rstrip(),
            e.code,
        ) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TaidonPluginError(
            f"taidon: cannot reach the proxy at {admin_url}: {reason}"
        ) from None


def healthy(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(admin_url + "/v1/health", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False
