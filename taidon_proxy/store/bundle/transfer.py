"""Export a stored state as a bundle, and import one through the store's own create path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import BinaryIO

from snapshots.base import AlreadyExists
from taidon_proxy.store.bundle.content import (
    extract,
    measure,
    read_manifest,
    verify_data,
    write_bundle,
)
from taidon_proxy.store.bundle.manifest import (
    BundleError,
    Content,
    Engine,
    Link,
    Manifest,
    check_engine,
)
from taidon_proxy.store.ids import initdb_state_id
from taidon_proxy.store.metadata import StateLink, StateRow
from taidon_proxy.store.metadata_api import MetadataStore
from taidon_proxy.store.states import StateStore, is_disk_full, store_full

MAX_CHAIN = 100_000


def _producer() -> str:
    try:
        return f"taidon-proxy {version('taidon-proxy')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "taidon-proxy"


async def chain_of(meta: MetadataStore, state_id: str) -> list[Link]:
    """The state's chain from its initdb root, from the recorded links (DESIGN §5)."""
    out: list[Link] = []
    sid = state_id
    for _ in range(MAX_CHAIN):
        link = await meta.link(sid)
        if link is None:
            row = await meta.get_state(sid)
            if row is not None and row.kind == "initdb":
                out.append(Link(id=sid, kind="initdb", label=row.label))
                return out[::-1]
            raise BundleError(
                "chain",
                f"state {sid[:12]} has no recorded derivation, so its id cannot be checked"
                " elsewhere (a snapshot of a live instance, or a state stored by an older"
                " version of the proxy)",
                hint="build the recipe again with this version (sqlrs rm STATE, then"
                " sqlrs prepare ALIAS) and export that",
            )
        out.append(Link(id=link.id, parent=link.parent, kind=link.kind, label=link.label,
                        step_hash=link.step_hash))  # fmt: skip
        if link.parent is None:  # an initdb root that came with an imported chain
            return out[::-1]
        sid = link.parent
    raise BundleError("chain", f"state {state_id[:12]}'s chain is longer than {MAX_CHAIN}")


@dataclass(frozen=True)
class ExportSource:
    manifest: Manifest
    state_dir: Path  # the snapshot's read-only content (pgdata/ in it)

    def write(self, out: BinaryIO) -> None:
        """Blocking: run in a thread."""
        write_bundle(self.manifest, self.state_dir, out)


async def prepare_export(
    store: StateStore,
    row: StateRow,
    engines: Sequence[tuple[str, str]],
    settings: Mapping[str, str],
) -> ExportSource:
    """The manifest of `row` (its chain checked, its data measured); `engines` are the
    (major.minor, source) pairs that may have made the chain's initdb state."""
    chain = await chain_of(store.meta, row.id)
    root = chain[0].id
    engine = next((e for e in engines if initdb_state_id(e[0], e[1], settings) == root), None)
    if engine is None:
        known = ", ".join(f"{v} ({s})" for v, s in engines)
        raise BundleError(
            "chain",
            f"state {row.id[:12]} grows from initdb state {root[:12]}, which none of the"
            f" engines this proxy knows made: {known}",
        )
    # A state used now is not evicted for the cache's grace period (the export reads it).
    await store.meta.touch_state(row.id)
    state_dir = await store.backend.snapshot_path(row.id)
    sha, size, files = await asyncio.to_thread(measure, state_dir)
    manifest = Manifest(
        state=row.id,
        alias=row.alias,
        chain=chain,
        engine=Engine(version=engine[0], major=int(engine[0].split(".")[0]), source=engine[1]),
        initdb_settings=dict(settings),
        backend=store.backend_name,
        clean=row.clean,
        created=row.created,
        exported_at=time.time(),
        exported_by=_producer(),
        content=Content(sha256=sha, size=size, files=files),
        provenance=await store.meta.provenance([k.id for k in chain]) or None,
    )
    return ExportSource(manifest, state_dir)


@dataclass(frozen=True)
class ImportResult:
    manifest: Manifest
    imported: bool  # False: the store had the state already


async def import_bundle(store: StateStore, src: BinaryIO, major: int, version: str) -> ImportResult:
    """Verify the bundle read from `src` (blocking reads, done in threads) and store its state.

    The data goes into a fresh workspace first and becomes a state only through the
    store's commit (snapshot, then row): a failure or crash before the row leaves an
    unowned workspace and maybe an orphan snapshot, which the store drops at its next start.
    """
    manifest = await asyncio.to_thread(read_manifest, src)
    check_engine(manifest, major, version)
    if await store.get(manifest.state) is not None:
        # Nothing to store, but a damaged copy is still said to be damaged.
        await asyncio.to_thread(verify_data, manifest, src)
        return ImportResult(manifest, imported=False)
    link = manifest.link
    clone_id, path = await store.create_workspace()
    try:
        try:
            await asyncio.to_thread(extract, manifest, src, path)
        except OSError as e:
            if is_disk_full(e):
                raise store_full("import a bundle") from e
            raise
        # Links are facts about ids (checked above): true whether or not the state lands.
        await store.meta.add_links(
            [StateLink(k.id, k.parent, k.kind, k.step_hash, k.label) for k in manifest.chain]
        )
        if manifest.provenance:  # what made them, as recorded where they were built
            await store.meta.add_provenance(manifest.provenance)
        now = time.time()
        row = StateRow(
            id=manifest.state, parent=link.parent, kind=link.kind, alias=manifest.alias,
            label=link.label, backend=store.backend_name, engine=manifest.engine.version,
            created=now, last_used=now, use_count=0, build_seconds=0.0, size_bytes=0,
            pinned=False, clean=manifest.clean,
        )  # fmt: skip
        try:
            await store.commit(clone_id, row)
        except AlreadyExists:  # a concurrent import or build stored it first
            if await store.get(manifest.state) is None:
                raise
            return ImportResult(manifest, imported=False)
    finally:
        await store.remove_clone(clone_id)
    return ImportResult(manifest, imported=True)
