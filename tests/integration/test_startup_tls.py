"""TLS in the startup phase: SSLRequest with a certificate, direct TLS with ALPN, injected bytes."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.integration

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
READ_TIMEOUT = 30.0


def recipe(pg_dir: Path) -> dict[str, Any]:
    f = pg_dir / "one.sql"
    f.write_text("create table t (x int);\ninsert into t values (42);\n")
    return {"prepare": {"kind": "psql", "files": [str(f)]}}


def startup(params: dict[str, str]) -> bytes:
    body = struct.pack("!hh", 3, 0)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


USER = {"user": "postgres", "database": "one"}


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    async with asyncio.timeout(READ_TIMEOUT):
        hdr = await reader.readexactly(5)
        (length,) = struct.unpack("!i", hdr[1:])
        return hdr[:1], await reader.readexactly(length - 4)


def fields(body: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode() for part in body.split(b"\0") if part}


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
        await writer.wait_closed()


def client_context(alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def psycopg_ok(p: RunningProxy, **kw: Any) -> bool:
    async with await psycopg.AsyncConnection.connect(p.dsn("one"), **kw) as conn:
        cur = await conn.execute("select x from t")
        assert await cur.fetchone() == (42,)
        return bool(conn.info.pgconn.ssl_in_use)


async def test_sslrequest_with_certificate_runs_tls(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, tls=cert)
    assert await psycopg_ok(p, sslmode="require") is True
    assert await psycopg_ok(p, sslmode="disable") is False  # TLS is offered, not forced
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-c", "select x from t",
        f"host={p.host} port={p.port} user=postgres dbname=one sslmode=require",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == b"42"
    # verify-full against our own certificate: the proxy serves the configured one.
    assert await psycopg_ok(p, sslmode="verify-full", sslrootcert=cert["cert"]) is True


async def test_direct_tls_needs_alpn_postgresql(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, tls=cert)
    reader, writer = await asyncio.open_connection(
        p.host, p.port, ssl=client_context(["postgresql"]), server_hostname="localhost"
    )
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
        writer.write(startup(USER))
        assert await read_message(reader) == (b"R", struct.pack("!i", 0))
        for _ in range(100):
            t, _body = await read_message(reader)
            assert t != b"E"
            if t == b"Z":
                break
        else:
            raise AssertionError("no ReadyForQuery")
    finally:
        await close(writer)
    # Inside direct TLS, an SSLRequest is out of place.
    reader, writer = await asyncio.open_connection(
        p.host, p.port, ssl=client_context(["postgresql"]), server_hostname="localhost"
    )
    try:
        writer.write(SSL_REQUEST)
        t, body = await read_message(reader)
        assert t == b"E" and fields(body)["C"] == "08P01", (t, body)
    finally:
        await close(writer)
    # Without ALPN: refused with an ErrorResponse (over the TLS session), no AuthenticationOk.
    refused = False
    try:
        reader, writer = await asyncio.open_connection(
            p.host, p.port, ssl=client_context(None), server_hostname="localhost"
        )
    except (ssl.SSLError, ConnectionError):
        refused = True  # a TLS alert is a refusal too
    else:
        try:
            writer.write(startup(USER))
            t, body = await read_message(reader)
            assert t == b"E", (t, body)
            assert fields(body)["C"] == "08P01"
            assert "ALPN" in fields(body)["M"]
            refused = True
            async with asyncio.timeout(READ_TIMEOUT):
                assert await reader.read() == b""
        finally:
            await close(writer)
    assert refused
    assert await psycopg_ok(p, sslmode="require") is True


async def test_bytes_after_sslrequest_are_a_protocol_error(
    make_proxy: ProxyFactory, pg_dir: Path, store: str, cert: dict[str, str]
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store, tls=cert)
    reader, writer = await asyncio.open_connection(p.host, p.port)
    try:
        # A plaintext startup packet smuggled in behind the SSLRequest (CVE-2021-23214 style).
        writer.write(SSL_REQUEST + startup(USER))
        await writer.drain()
        t, body = await read_message(reader)
        assert t == b"E", (t, body)  # never 'S', never AuthenticationOk
        err = fields(body)
        assert err["C"] == "08P01"
        assert "unencrypted data after SSL request" in err["M"]
        async with asyncio.timeout(READ_TIMEOUT):
            assert await reader.read() == b""
    finally:
        await close(writer)
    assert await psycopg_ok(p, sslmode="require") is True


async def test_psql_prefer_and_require_without_a_certificate(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy({"one": recipe(pg_dir)}, store=store)
    assert await psycopg_ok(p, sslmode="prefer") is False
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        await psycopg_ok(p, sslmode="require")
    # Direct TLS when no certificate is configured: the handshake goes nowhere, and the client
    # gets a plaintext ErrorResponse instead of a hang.
    reader, writer = await asyncio.open_connection(p.host, p.port)
    try:
        writer.write(bytes([0x16, 3, 1, 0, 5]) + b"\x01\0\0\x01\0")
        t, body = await read_message(reader)
        assert t == b"E" and fields(body)["C"] == "08P01"
    finally:
        await close(writer)
