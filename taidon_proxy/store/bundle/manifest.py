"""A bundle's manifest: what it holds, and the checks that its ids follow from its chain."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taidon_proxy.errors import TaidonError
from taidon_proxy.store.ids import initdb_state_id, step_state_id

FORMAT = "taidon-state-bundle"
VERSION = 1
ID_PATTERN = r"^[0-9a-f]{64}$"


class BundleError(TaidonError):
    """A bundle refused: `check` names what failed (format, manifest, chain, engine, content)."""

    sqlstate = "22000"

    def __init__(self, check: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.check = check


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Link(_Model):
    """One state of the chain: id = step_state_id(parent, kind, step_hash), or the initdb root."""

    id: str = Field(pattern=ID_PATTERN)
    parent: str | None = Field(default=None, pattern=ID_PATTERN)
    kind: str = Field(min_length=1, max_length=64)
    label: str = Field(max_length=4096)
    step_hash: str | None = Field(default=None, max_length=4096)


class Engine(_Model):
    version: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?$")  # major.minor, as in the root id
    major: int = Field(ge=1)
    source: str = Field(min_length=1, max_length=512)  # "host", or "docker:<image>"


class Content(_Model):
    """The data directory as an uncompressed tar stream of `pgdata/`: its SHA-256 and size."""

    format: Literal["tar"] = "tar"
    compression: Literal["zstd"] = "zstd"
    root: Literal["pgdata"] = "pgdata"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    files: int = Field(ge=0)


class Manifest(_Model):
    format: Literal["taidon-state-bundle"] = "taidon-state-bundle"
    version: int = VERSION
    state: str = Field(pattern=ID_PATTERN)
    alias: str | None = None  # the recipe the state was built for, where it was exported
    chain: list[Link] = Field(min_length=1, max_length=100_000)  # initdb root first
    engine: Engine
    initdb_settings: dict[str, str]
    backend: str  # the exporting store's snapshot backend (provenance only)
    clean: bool  # taken from a cleanly stopped server
    created: float  # when the state was stored where it was exported
    exported_at: float
    exported_by: str
    content: Content
    # What made each state of the chain (docs/provenance.md), by state id; absent in bundles
    # written before provenance was recorded (they still import).
    provenance: dict[str, dict[str, Any]] | None = None

    @property
    def link(self) -> Link:
        return self.chain[-1]

    def dump(self) -> bytes:
        data = self.model_dump(mode="json")
        if data["provenance"] is None:  # as bundles before provenance: older readers take it
            del data["provenance"]
        return json.dumps(data, indent=1, sort_keys=True).encode()


def parse(raw: bytes) -> Manifest:
    """The manifest from its JSON; the format and version are checked before the fields."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BundleError("manifest", "the manifest is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError("format", f"not a state bundle (the manifest's format is not {FORMAT})")
    version = data.get("version")
    if version != VERSION:
        raise BundleError(
            "format",
            f"unknown bundle format version {version!r}: this sqlrs reads version {VERSION}",
            hint="export the state again with this version of sqlrs, or upgrade sqlrs",
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(manifest)"
        raise BundleError("manifest", f"manifest field {where}: {first['msg']}") from None


def verify_chain(m: Manifest) -> None:
    """Every id is recomputed: the root from engine and initdb settings, each link from its
    parent and step hash, and the chain must end at the manifest's state."""
    version_major = int(m.engine.version.split(".")[0])
    if version_major != m.engine.major:
        raise BundleError(
            "manifest", f"engine version {m.engine.version} is not major {m.engine.major}"
        )
    root = m.chain[0]
    if root.kind != "initdb" or root.parent is not None or root.step_hash is not None:
        raise BundleError("chain", "the chain does not start at an initdb state")
    expected = initdb_state_id(m.engine.version, m.engine.source, m.initdb_settings)
    if root.id != expected:
        raise BundleError(
            "chain",
            f"the chain's initdb state {root.id[:12]} does not follow from engine"
            f" {m.engine.version} ({m.engine.source}) and the initdb settings"
            f" (they give {expected[:12]})",
        )
    for i, (parent, link) in enumerate(zip(m.chain, m.chain[1:], strict=False), start=2):
        if link.parent != parent.id:
            raise BundleError(
                "chain", f"link {i} ({link.label}) names parent {str(link.parent)[:12]}, but the"
                f" state before it is {parent.id[:12]}",
            )  # fmt: skip
        if link.step_hash is None:
            raise BundleError("chain", f"link {i} ({link.label}) has no step hash")
        recomputed = step_state_id(parent.id, link.kind, link.step_hash)
        if recomputed != link.id:
            raise BundleError(
                "chain",
                f"link {i} ({link.label}) is listed as {link.id[:12]}, but its parent and step"
                f" hash give {recomputed[:12]}",
            )
    if m.link.id != m.state:
        raise BundleError(
            "chain", f"the chain ends at {m.link.id[:12]}, not at the bundle's state {m.state[:12]}"
        )
    stray = sorted(set(m.provenance or {}) - {k.id for k in m.chain})
    if stray:
        raise BundleError(
            "manifest", f"the manifest's provenance names state {stray[0][:12]}, not in its chain"
        )


def check_engine(m: Manifest, major: int, version: str) -> None:
    """A data directory opens only with the Postgres major version that wrote it."""
    if m.engine.major != major:
        raise BundleError(
            "engine",
            f"the bundle holds a Postgres {m.engine.major} state (built with"
            f" {m.engine.version}); this proxy runs Postgres {major} ({version})",
            hint=f"import it where Postgres {m.engine.major} runs, or build the recipe here",
        )
