"""State ids: SHA-256 over length-prefixed fields, chained from a root (DESIGN §5)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

ID_LEN = 64


def _field(h: hashlib._Hash, value: str | bytes) -> None:
    data = value.encode() if isinstance(value, str) else value
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def digest(*fields: str | bytes) -> str:
    h = hashlib.sha256()
    for f in fields:
        _field(h, f)
    return h.hexdigest()


def canonical(mapping: Mapping[str, str]) -> str:
    """A stable text form of a mapping (sorted, length-safe)."""
    return "\x00".join(f"{k}={v}" for k, v in sorted(mapping.items()))


def initdb_state_id(engine_version: str, engine_source: str, settings: Mapping[str, str]) -> str:
    # The source matters only when it changes what initdb writes (another image, another build);
    # callers pass a normalized source ("host" for host binaries of this major.minor).
    return digest("initdb", engine_version, engine_source, canonical(settings))


def step_state_id(parent: str, step_kind: str, step_hash: str) -> str:
    return digest(parent, step_kind, step_hash)
