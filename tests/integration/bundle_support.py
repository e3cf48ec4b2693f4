"""Helpers of the state bundle tests: the admin API calls they make, a bundle's two parts,
and everything an import could leave in a store."""

from __future__ import annotations

import io
import itertools
import json
import struct
from typing import Any

import aiohttp

from taidon_proxy.admin.auth import read_token
from taidon_proxy.store.bundle.content import manifest_frame
from taidon_proxy.store.ids import initdb_state_id, step_state_id
from tests.conftest import RunningProxy

ADMIN = {"listen": "127.0.0.1:0"}


class Api:
    def __init__(self, p: RunningProxy, http: aiohttp.ClientSession) -> None:
        assert p.proxy.admin is not None and p.proxy.admin.address is not None
        self.base = f"http://{p.proxy.admin.address}"
        self.headers = {"Authorization": f"Bearer {read_token(p.proxy.config.store)}"}
        self.http = http

    async def export(self, ref: str) -> bytes:
        async with self.http.get(f"{self.base}/v1/states/{ref}/bundle", headers=self.headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"] == "application/zstd"
            return await r.read()

    async def import_(self, data: bytes, **query: str) -> tuple[int, Any]:
        url = f"{self.base}/v1/bundles"
        body = io.BytesIO(data)
        async with self.http.post(url, data=body, headers=self.headers, params=query) as r:
            return r.status, await r.json()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path, headers=self.headers) as r:
            return r.status, await r.json()


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    _, length = struct.unpack("<II", data[:8])
    body, _, _digest = data[8 : 8 + length].rpartition(b"\n")
    return json.loads(body), data[8 + length :]


def join(manifest: dict[str, Any], rest: bytes) -> bytes:
    return manifest_frame(json.dumps(manifest).encode()) + rest


def as_other_major(manifest: dict[str, Any], version: str) -> dict[str, Any]:
    """The manifest a proxy running Postgres `version` would write: every id recomputed."""
    m = json.loads(json.dumps(manifest))
    m["engine"].update(version=version, major=int(version.split(".", maxsplit=1)[0]))
    chain = m["chain"]
    old_ids = [link["id"] for link in chain]
    chain[0]["id"] = initdb_state_id(version, m["engine"]["source"], m["initdb_settings"])
    for parent, link in itertools.pairwise(chain):
        link["parent"] = parent["id"]
        link["id"] = step_state_id(parent["id"], link["kind"], link["step_hash"])
    m["state"] = chain[-1]["id"]
    if m.get("provenance"):  # its records keyed by its own ids
        new_of = dict(zip(old_ids, (link["id"] for link in chain), strict=True))
        m["provenance"] = {new_of[k]: v for k, v in m["provenance"].items()}
    return m


async def store_view(p: RunningProxy) -> tuple[Any, ...]:
    """Everything an import could leave behind: rows, links, snapshots, clones, fingerprints."""
    meta, backend = p.proxy.meta, p.proxy.store.backend  # type: ignore[union-attr]

    def tables() -> tuple[Any, ...]:
        db = meta.db
        return tuple(
            db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("states", "links", "fingerprints", "jobs")
        )

    return (
        await meta.run(tables),
        sorted(await backend.list_snapshots()),
        sorted(await backend.list_clones()),
        sorted(p.proxy.config.store.joinpath("data").rglob("*")),
    )
