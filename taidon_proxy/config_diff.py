"""What a reloaded config changes: aliases added, removed, changed; keys live now or at restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from taidon_proxy.config import Config

# Sections a running proxy takes over at once. Everything else is bound at start (sockets,
# the store and its backend, the runtime, TLS and auth of the listener): a change there is
# reported as needing a restart and the running value stays in force until then.
LIVE_SECTIONS = (
    "databases", "instances", "cache", "liquibase", "tcp_keepalive", "teams", "users", "builds",
)  # fmt: skip


@dataclass(frozen=True)
class Pending:
    """A key whose new value waits for a restart: what runs now, what the file says."""

    key: str
    running: Any
    configured: Any


@dataclass
class ConfigChange:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # dotted keys in force now
    needs_restart: list[Pending] = field(default_factory=list)
    secret: set[str] = field(default_factory=set)  # keys whose values came from files

    @property
    def empty(self) -> bool:
        return not (
            self.added or self.removed or self.changed or self.applied or self.needs_restart
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "aliases": {"added": self.added, "removed": self.removed, "changed": self.changed},
            "applied": self.applied,
            "needs_restart": [
                {
                    "key": p.key,
                    "running": _shown(p.key, p.running, self.secret),
                    "configured": _shown(p.key, p.configured, self.secret),
                }
                for p in self.needs_restart
            ],
        }


def _shown(key: str, value: Any, secret: set[str]) -> Any:
    """Values as reported; SCRAM verifiers, the metadata DSN (a password) and values read
    from files never leave the proxy."""
    hidden = key.startswith(("auth.users", "metadata.dsn")) or any(
        key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in secret
    )
    return "(secret)" if hidden and value is not None else value


def diff(running: Config, loaded: Config) -> tuple[ConfigChange, Config]:
    """The change from `running` to `loaded`, and the config to run with now: `loaded`, with
    every section that needs a restart kept as it runs."""
    old = running.model_dump(mode="json", exclude={"source", "file_values"})
    new = loaded.model_dump(mode="json", exclude={"source", "file_values"})
    change = ConfigChange(secret={*running.file_values, *loaded.file_values})
    old_dbs, new_dbs = old.pop("databases"), new.pop("databases")
    change.added = sorted(set(new_dbs) - set(old_dbs))
    change.removed = sorted(set(old_dbs) - set(new_dbs))
    change.changed = sorted(a for a in set(old_dbs) & set(new_dbs) if old_dbs[a] != new_dbs[a])
    keep: dict[str, Any] = {}
    for section in sorted(set(old) | set(new)):
        leaves = _leaf_changes(section, old.get(section), new.get(section))
        if not leaves:
            continue
        if section in LIVE_SECTIONS:
            change.applied += [key for key, _, _ in leaves]
        else:
            change.needs_restart += [Pending(k, a, b) for k, a, b in leaves]
            keep[section] = getattr(running, section)
    # A kept section's values are the running ones: so are its keys read from files.
    secret = [k for k in loaded.file_values if k.split(".")[0] not in keep]
    secret += [k for k in running.file_values if k.split(".")[0] in keep]
    effective = loaded.model_copy(update={**keep, "file_values": sorted(secret)})
    return change, effective


def _leaf_changes(key: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _leaf_changes(f"{key}.{k}", a.get(k), b.get(k))
        return out
    return [] if a == b else [(key, a, b)]
