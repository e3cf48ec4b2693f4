"""State bundles over HTTP: a state as a file (export) and a file as a state (import).

The proxy does both because it owns the store: its snapshot backend (overlayfs mounts),
its single SQLite writer, its evictor and the states its instances use. The bundle's
bytes stream both ways; the blocking work (tar, zstd, hashing) runs in a thread that
reads the request, or writes the response, through the event loop.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import StreamReader, web

from taidon_proxy.admin.context import services_of
from taidon_proxy.admin.errors import ApiError
from taidon_proxy.routing import parse_ref
from taidon_proxy.services.bundles import cache_key, export_state, import_state
from taidon_proxy.store.bundle import BundleError

log = structlog.get_logger("taidon.admin")
routes = web.RouteTableDef()
MEDIA_TYPE = "application/zstd"  # a zstd stream (its first frame, the manifest, is skippable)
WRITE_BATCH = 256 * 2**10  # bytes per hop from the writer thread to the loop
READ_CHUNK = 2**20
STALL_TIMEOUT = 300.0  # a client that sends or reads nothing for this long is given up on


class _ToResponse:
    """A blocking file the export thread writes; each batch goes out on the loop."""

    def __init__(self, resp: web.StreamResponse, loop: asyncio.AbstractEventLoop) -> None:
        self._resp = resp
        self._loop = loop
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= WRITE_BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            done = asyncio.run_coroutine_threadsafe(self._resp.write(data), self._loop)
            try:
                done.result(timeout=STALL_TIMEOUT)
            except TimeoutError:  # the client stopped reading: end the export (an OSError)
                done.cancel()
                raise


class _FromRequest:
    """A blocking file the import thread reads; each read waits on the loop for the body."""

    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := self.read(READ_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        done = asyncio.run_coroutine_threadsafe(self._content.read(n), self._loop)
        try:
            return done.result(timeout=STALL_TIMEOUT)
        except TimeoutError:
            done.cancel()
            raise BundleError(
                "truncated", f"truncated: the upload sent nothing for {STALL_TIMEOUT:.0f}s"
            ) from None


@routes.get("/v1/states/{ref}/bundle")
async def export(request: web.Request) -> web.StreamResponse:
    s = services_of(request)
    try:
        source = await export_state(s.store, s.builder, request.match_info["ref"])
    except BundleError as e:
        raise ApiError(409, "not_exportable", e.message, check=e.check, hint=e.hint) from None
    state = source.manifest.state
    resp = web.StreamResponse(
        headers={
            "Content-Type": MEDIA_TYPE,
            "Content-Disposition": f'attachment; filename="{state[:12]}.tzst"',
            "X-Taidon-State": state,
        }
    )
    await resp.prepare(request)
    out = _ToResponse(resp, asyncio.get_running_loop())

    def write() -> None:
        source.write(out)  # type: ignore[arg-type]  # a write-only file is all it needs
        out.flush()

    try:
        await asyncio.to_thread(write)
    except (BundleError, OSError, ConnectionError) as e:
        # The headers are out: cut the stream short, so the client sees no complete bundle.
        log.warning("admin.export_failed", state=state[:12], error=str(e)[:300])
        if request.transport is not None:
            request.transport.abort()
        return resp
    await resp.write_eof()
    log.info("admin.exported", state=state[:12], bytes=source.manifest.content.size)
    return resp


async def _drain(request: web.Request) -> None:
    """Read the rest of the body: a client that sends it all before reading the answer
    (urllib does) would otherwise never see it."""
    while await request.content.read(READ_CHUNK):
        pass


@routes.post("/v1/bundles")
async def import_(request: web.Request) -> web.Response:
    """The body is the bundle; `?alias=NAME` adopts it for that recipe (default: the
    manifest's alias, where it is configured)."""
    s = services_of(request)
    src = _FromRequest(request.content, asyncio.get_running_loop())
    alias = request.query.get("alias") or None
    try:
        outcome = await import_state(s.store, s.builder, s.config, src, alias)  # type: ignore[arg-type]  # reads are all it needs
    except BundleError as e:
        code = "incompatible" if e.check == "engine" else "invalid_bundle"
        log.warning("admin.import_refused", check=e.check, error=e.message)
        raise ApiError(422, code, e.message, check=e.check, hint=e.hint) from None
    finally:
        await _drain(request)
    m = outcome.result.manifest
    log.info(
        "admin.imported", state=m.state[:12], imported=outcome.result.imported,
        adopted=bool(outcome.adoption and outcome.adoption.adopted),
    )  # fmt: skip
    return web.json_response(outcome.view())


@routes.get("/v1/aliases/{alias}/key")
async def key(request: web.Request) -> web.Response:
    """A CI cache key: the recipe's final state id, planned here without a build (`?ref=`:
    with the recipe's files as of that git ref)."""
    s = services_of(request)
    alias = request.match_info["alias"]
    s.builder.recipe(alias)  # an unknown alias: 404 with the known ones
    ref = request.query.get("ref")
    ref = None if ref is None else parse_ref(ref)
    return web.json_response((await cache_key(s.builder, alias, ref)).view())
