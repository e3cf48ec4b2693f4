"""The startup phase on raw sockets: negotiation answers, protocol versions, bad packets."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
READ_TIMEOUT = 30.0


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


def startup(params: dict[str, str], major: int = 3, minor: int = 0) -> bytes:
    body = struct.pack("!hh", major, minor)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


class Wire:
    """A raw client connection that reads typed backend messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, p: RunningProxy) -> Wire:
        r, w = await asyncio.open_connection(p.host, p.port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def byte(self) -> bytes:
        async with asyncio.timeout(READ_TIMEOUT):
            return await self.reader.readexactly(1)

    async def message(self) -> tuple[bytes, bytes]:
        async with asyncio.timeout(READ_TIMEOUT):
            hdr = await self.reader.readexactly(5)
            (length,) = struct.unpack("!i", hdr[1:])
            return hdr[:1], await self.reader.readexactly(length - 4)

    async def until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of `kind`; an ErrorResponse fails."""
        seen = []
        for _ in range(200):
            t, body = await self.message()
            seen.append((t, body))
            if t == kind:
                return seen
            assert t != b"E", fields(body)
        raise AssertionError(f"no {kind!r} in {seen}")

    async def error(self) -> dict[str, str]:
        """The next message must be an ErrorResponse, and then the connection closes."""
        t, body = await self.message()
        assert t == b"E", (t, body)
        async with asyncio.timeout(READ_TIMEOUT):
            assert await self.reader.read() == b""
        await self.close()
        return fields(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def fields(body: bytes) -> dict[str, str]:
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode()
    return out


async def still_serves(p: RunningProxy) -> None:
    conn = await asyncpg.connect(p.dsn("one"))
    try:
        assert await conn.fetchval("select x from t") == 42
    finally:
        await conn.close()


USER = {"user": "postgres", "database": "one"}


async def test_negotiation_answers_and_protocol_versions(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    # SSLRequest without a certificate: 'N', then a normal session.
    w = await Wire.open(p)
    await w.send(SSL_REQUEST)
    assert await w.byte() == b"N"
    await w.send(startup(USER))
    seen = await w.until(b"Z")
    assert seen[0] == (b"R", struct.pack("!i", 0))
    # BackendKeyData: one before the build's notices (so the wait can be cancelled), then the
    # backend's real pid with the proxy's own secret; the instance's secret never reaches us.
    keys = [struct.unpack("!i4s", body) for t, body in seen if t == b"K"]
    kinds = [t for t, _ in seen]
    assert kinds.index(b"K") == 1 and len(keys) == (2 if b"N" in kinds else 1)
    assert p.proxy.server is not None
    [session] = p.proxy.server.sessions
    assert session.instance_key is not None
    real_pid, instance_secret = session.instance_key
    assert keys[-1] == (real_pid, session.secret) and {k[1] for k in keys} == {session.secret}
    assert instance_secret != session.secret
    assert any(t == b"S" and body.startswith(b"server_version\0") for t, body in seen)
    await w.close()
    # GSSENCRequest: 'N'; SSLRequest may still follow; then startup.
    w = await Wire.open(p)
    await w.send(GSSENC_REQUEST)
    assert await w.byte() == b"N"
    await w.send(SSL_REQUEST)
    assert await w.byte() == b"N"
    await w.send(startup(USER))
    await w.until(b"Z")
    await w.close()
    # Protocol 3.1 with a _pq_ option: NegotiateProtocolVersion (3.0, the option), then on.
    w = await Wire.open(p)
    await w.send(startup({**USER, "_pq_.x": "1"}, minor=1))
    t, body = await w.message()
    assert t == b"v"
    assert body == struct.pack("!ii", 0, 1) + b"_pq_.x\0"
    seen = await w.until(b"Z")
    assert seen[0] == (b"R", struct.pack("!i", 0))
    # The session works at 3.0: a simple query.
    q = b"select x from t\0"
    await w.send(b"Q" + struct.pack("!i", len(q) + 4) + q)
    rows = [b for t, b in await w.until(b"Z") if t == b"D"]
    assert rows == [struct.pack("!hi", 1, 2) + b"42"]
    await w.close()
    # Protocol 4.0: refused with 0A000.
    w = await Wire.open(p)
    await w.send(startup(USER, major=4))
    err = await w.error()
    assert err["C"] == "0A000" and err["S"] == "FATAL"
    assert "unsupported frontend protocol 4.0" in err["M"]
    await still_serves(p)


BAD_PACKETS: list[tuple[str, bytes, str, str]] = [
    ("too long", struct.pack("!i", 10001) + b"\0" * 10, "08P01", "invalid length"),
    ("too short", struct.pack("!ii", 4, 196608), "08P01", "invalid length"),
    ("negative length", struct.pack("!ii", -8, 196608), "08P01", "invalid length"),
    (
        "no terminator",
        struct.pack("!ihh", 16, 3, 0) + b"user\0pg\0",
        "08P01",
        "invalid startup packet layout",
    ),
    (
        "value runs past the end",
        struct.pack("!ihh", 15, 3, 0) + b"user\0pg",
        "08P01",
        "invalid startup packet layout",
    ),
    ("no user", startup({"database": "one"}), "28000", "no PostgreSQL user name"),
    (
        "bad utf-8",
        struct.pack("!ihh", 26, 3, 0) + b"user\0postgres\0x\0\xff\xfe\0\0",
        "08P01",
        "invalid",
    ),
    ("cancel of wrong size", struct.pack("!iii", 12, 80877102, 1), "08P01", "cancel request"),
    ("TLS without SSLRequest", bytes([0x16, 3, 1, 0, 200]) + b"\0" * 200, "08P01", "TLS"),
    ("typed message first", b"p\0\0\0\x09secret\0", "08P01", "invalid length"),
]


@pytest.mark.parametrize("case", BAD_PACKETS, ids=[c[0] for c in BAD_PACKETS])
async def test_bad_packets_get_an_error_response(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, case: tuple[str, bytes, str, str]
) -> None:
    _, data, sqlstate, needle = case
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    w = await Wire.open(p)
    await w.send(data)
    err = await w.error()
    assert err["C"] == sqlstate, err
    assert needle in err["M"], err
    assert err["S"] == "FATAL"
    assert "Traceback" not in err["M"] and "/" not in err["M"]
    await w.close()
    await still_serves(p)


async def test_sequencing_violations(make_proxy: ProxyFactory, pg_dir: Path, store: str) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    # A second SSLRequest after 'N'.
    w = await Wire.open(p)
    await w.send(SSL_REQUEST)
    assert await w.byte() == b"N"
    await w.send(SSL_REQUEST)
    err = await w.error()
    assert err["C"] == "08P01" and "SSLRequest" in err["M"]
    # A second GSSENCRequest.
    w = await Wire.open(p)
    await w.send(GSSENC_REQUEST)
    assert await w.byte() == b"N"
    await w.send(GSSENC_REQUEST)
    err = await w.error()
    assert err["C"] == "08P01" and "GSSENCRequest" in err["M"]
    # Trust auth, then a second startup packet before ReadyForQuery is just session bytes for
    # the instance, which refuses it as Postgres would: the client still gets an ErrorResponse.
    w = await Wire.open(p)
    await w.send(startup(USER) + startup(USER))
    msgs: list[tuple[bytes, bytes]] = []
    for _ in range(100):
        t, body = await w.message()
        msgs.append((t, body))
        if t == b"E":
            break
    assert msgs[-1][0] == b"E" and fields(msgs[-1][1])["C"] == "08P01"
    await w.close()
    await still_serves(p)


async def test_truncated_packet_then_hangup_leaves_the_proxy_serving(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    assert p.proxy.server is not None
    w = await Wire.open(p)
    await w.send(startup(USER)[:9])
    w.writer.write_eof()
    # The client said it will send nothing more: the proxy closes (there is no one to read an
    # error once the client is gone, and Postgres too just logs "incomplete startup packet").
    async with asyncio.timeout(READ_TIMEOUT):
        rest = await w.reader.read()
    assert rest == b"" or rest.startswith(b"E")
    await w.close()
    for _ in range(100):
        if not p.proxy.server.sessions:
            break
        await asyncio.sleep(0.05)
    assert not p.proxy.server.sessions
    await still_serves(p)


async def test_unknown_cancel_key_is_ignored_quietly(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    w = await Wire.open(p)
    await w.send(struct.pack("!iiii", 16, 80877102, 1234, 5678))
    async with asyncio.timeout(READ_TIMEOUT):
        assert await w.reader.read() == b""  # as Postgres: no answer to a CancelRequest
    await w.close()
    await still_serves(p)


async def test_psql_gssencmode_and_sslmode_prefer_work_without_tls(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    for mode in ("gssencmode=prefer sslmode=prefer", "gssencmode=disable sslmode=prefer"):
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-At", "-c", "select x from t",
            f"host={p.host} port={p.port} user=postgres dbname=one {mode}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert out.strip() == b"42"
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-c", "select 1",
        f"host={p.host} port={p.port} user=postgres dbname=one sslmode=require",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"server does not support SSL, but SSL was required" in err


# Malformed and truncated first packets, each sent and then the write side closed: the proxy
# answers with an ErrorResponse (or just closes, as Postgres does for an incomplete packet).
HOSTILE: list[tuple[str, bytes]] = [
    ("length 0", struct.pack("!i", 0)),
    ("length 3", struct.pack("!i", 3)),
    ("length 4", struct.pack("!i", 4)),
    ("length 2^31-1", struct.pack("!ii", 2**31 - 1, 196608)),
    ("length -1", struct.pack("!ii", -1, 196608)),
    ("unterminated name", struct.pack("!ihh", 13, 3, 0) + b"user\0"),
    ("unterminated value", struct.pack("!ihh", 17, 3, 0) + b"user\0postg"),
    ("header only", struct.pack("!i", 8)),
    ("two startups", startup(USER) + startup(USER)),
    ("bytes after SSLRequest", SSL_REQUEST + b"\x16\x03\x01garbage"),
    ("SSLRequest twice", SSL_REQUEST + SSL_REQUEST),
    ("cancel of 20 bytes", struct.pack("!iiii", 20, 80877102, 1, 2) + b"\0" * 4),
    ("cancel of 12 bytes", struct.pack("!iii", 12, 80877102, 1)),
    ("password first", b"p" + struct.pack("!i", 11) + b"secret\0"),
    ("one byte", b"\x00"),
    ("noise", bytes(range(256)) * 4),
]


async def _replay(p: RunningProxy, data: bytes) -> bytes:
    w = await Wire.open(p)
    try:
        await w.send(data)
        w.writer.write_eof()
        async with asyncio.timeout(READ_TIMEOUT):
            return await w.reader.read()
    finally:
        await w.close()


async def test_a_hostile_corpus_leaves_a_connected_client_unaffected(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    conn = await asyncpg.connect(p.dsn("one"))
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("insert into t values (7)")
        for name, data in HOSTILE:
            answer = await _replay(p, data)
            # What comes back: nothing, 'N' (SSL refused) and/or one ErrorResponse, never
            # anything that looks like a server's internals.
            rest = answer[1:] if answer[:1] == b"N" else answer
            if rest:
                assert rest[:1] in (b"E", b"R"), (name, answer[:80])
            if rest[:1] == b"E":
                (length,) = struct.unpack("!i", rest[1:5])
                err = fields(rest[5 : 1 + length])
                assert err["S"] == "FATAL" and len(err["C"]) == 5, (name, err)
                assert "Traceback" not in err["M"], (name, err)
            # The client connected all along is in the same transaction, unaffected.
            assert await conn.fetchval("select count(*) from t") == 2, name
        await tx.commit()
    finally:
        await conn.close()
    await still_serves(p)
