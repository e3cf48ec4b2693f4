"""Real clients (asyncpg, psycopg, psql) authenticate with SCRAM against a tiny test server
built from FrontendStartup + ScramServer; verifiers are checked against real Postgres."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.scram import ScramServer, make_verifier, parse_sasl_initial_response
from taidon_proxy.pgwire.startup import FrontendStartup, StartupState
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
USERS = {"app": make_verifier(PASSWORD, salt=b"fixed-test-salt!", iterations=4096)}
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BACKEND_PID = 31337
SERVER_PARAMS = {
    "server_version": "15.18",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
    "is_superuser": "off",
}


class MiniServer:
    """Just enough of a Postgres server: SCRAM auth, then empty/error answers to queries."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.mock_secret = secrets.token_bytes(16)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                if await self._startup(reader, writer):
                    await self._session(reader, writer)
        except RemoteProtocolError as exc:  # a wrong proof too (28P01)
            self.log.append(f"refused: {exc.sqlstate} {exc.message}")
            writer.write(m.error_response(exc.sqlstate, exc.message))
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        fs = FrontendStartup(tls_available=False)
        scram: ScramServer | None = None
        while fs.state is not StartupState.DONE:
            event = fs.next_event()
            if event is None:
                data = await reader.read(8192)
                if not data:
                    self.log.append(f"eof in {fs.state.name}")
                    return False
                fs.receive_data(data)
                continue
            self.log.append(repr(event))
            if isinstance(event, SSLRequested):
                writer.write(fs.answer_ssl(False))
            elif isinstance(event, GSSENCRequested):
                writer.write(fs.answer_gssenc())
            elif isinstance(event, CancelRequested):
                return False
            elif isinstance(event, StartupReceived):
                if event.needs_negotiation:
                    writer.write(m.negotiate_protocol_version(0, list(event.protocol_options)))
                user = event.params["user"]
                scram = ScramServer(
                    USERS.get(user),
                    nonce=secrets.token_urlsafe(18),
                    user=user,
                    mock_secret=self.mock_secret,
                )
                writer.write(m.authentication_sasl(["SCRAM-SHA-256"]))
                fs.expect_password()
            else:
                assert isinstance(event, PasswordReceived) and scram is not None
                if scram.phase.name == "INITIAL":
                    mechanism, data = parse_sasl_initial_response(event.payload)
                    writer.write(
                        m.authentication_sasl_continue(scram.handle_initial(mechanism, data))
                    )
                    fs.expect_password()
                else:
                    writer.write(m.authentication_sasl_final(scram.handle_final(event.payload)))
                    fs.auth_done()
        writer.write(m.authentication_ok())
        for name, value in SERVER_PARAMS.items():
            writer.write(m.parameter_status(name, value))
        writer.write(m.backend_key_data(BACKEND_PID, b"\x01\x02\x03\x04"))
        writer.write(m.ready_for_query(b"I"))
        self._leftover = fs.take_remaining()
        return True

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = m.MessageFramer(max_length=1 << 20)
        framer.receive_data(self._leftover)
        while True:
            msg = framer.next_message()
            if msg is None:
                data = await reader.read(8192)
                if not data:
                    return
                framer.receive_data(data)
                continue
            kind, body = msg
            self.log.append(f"message {kind!r}")
            if kind == b"X":
                return
            if kind == b"Q":
                if body.strip(b" \x00;") == b"":
                    writer.write(b"I\x00\x00\x00\x04")
                else:
                    writer.write(m.error_response("0A000", "test server", severity="ERROR"))
                writer.write(m.ready_for_query(b"I"))
            elif kind == b"S":
                writer.write(m.error_response("0A000", "test server", severity="ERROR"))
                writer.write(m.ready_for_query(b"I"))


@pytest.fixture
async def server() -> AsyncIterator[tuple[MiniServer, int]]:
    test_server = MiniServer()
    srv = await asyncio.start_server(test_server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield test_server, port
    finally:
        srv.close()
        await srv.wait_closed()
        # pytest shows captured output only when the test fails.
        print("test server log:\n  " + "\n  ".join(test_server.log))


async def test_asyncpg_scram_success(server: tuple[MiniServer, int]) -> None:
    _, port = server
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="app", password=PASSWORD, database="shop", timeout=10
    )
    try:
        assert conn.get_server_pid() == BACKEND_PID
        assert conn.get_settings().server_version == "15.18"
        with pytest.raises(asyncpg.PostgresError, match="test server"):
            await conn.execute("select 1")
    finally:
        await conn.close(timeout=5)


@pytest.mark.parametrize("user", ["app", "nobody"])
async def test_asyncpg_wrong_password_gets_28p01(server: tuple[MiniServer, int], user: str) -> None:
    test_server, port = server
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, password="wrong", database="shop", timeout=10
        )
    assert info.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{user}"' in str(info.value)
    assert any("refused: 28P01" in line for line in test_server.log)


async def test_psycopg_scram_success(server: tuple[MiniServer, int]) -> None:
    test_server, port = server
    conn = await psycopg.AsyncConnection.connect(
        host="127.0.0.1",
        port=port,
        user="app",
        password=PASSWORD,
        dbname="shop",
        connect_timeout=10,
    )
    try:
        assert conn.info.backend_pid == BACKEND_PID
        assert conn.info.parameter_status("server_version") == "15.18"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            await conn.execute("select 1")
    finally:
        await conn.close()
    assert any("SSLRequested" in line for line in test_server.log)  # libpq's sslmode=prefer


@pytest.mark.parametrize("user", ["app", "nobody"])
async def test_psycopg_wrong_password(server: tuple[MiniServer, int], user: str) -> None:
    _, port = server
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=port, user=user, password="nope", dbname="x", connect_timeout=10
        )
    assert f'password authentication failed for user "{user}"' in str(info.value)


async def _psql(port: int, password: str, user: str = "app") -> tuple[int, str]:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    proc = await asyncio.create_subprocess_exec(
        "psql",
        "-w",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        user,
        "-d",
        "shop",
        "-c",
        "",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_psql_scram(server: tuple[MiniServer, int]) -> None:
    test_server, port = server
    code, out = await _psql(port, PASSWORD)
    assert code == 0, out
    assert "message b'Q'" in test_server.log
    code, out = await _psql(port, "bad")
    assert code == 2, out
    assert 'password authentication failed for user "app"' in out


# --- verifiers made by real Postgres ---------------------------------------------------------


class PgCluster:
    """A throwaway Postgres 15 cluster on a private unix socket."""

    def __init__(self, sock: str, port: str, log: Path) -> None:
        self.sock = sock
        self.port = port
        self.log = log

    def role_verifier(self, role: str, password: str) -> str:
        """Let Postgres hash `password` for a new role; prints the server log on failure."""
        try:
            with psycopg.connect(
                host=self.sock, port=self.port, user="postgres", dbname="postgres"
            ) as conn:
                conn.execute("SET password_encryption = 'scram-sha-256'")
                conn.execute(
                    psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(role))
                )
                conn.execute(
                    psycopg.sql.SQL("CREATE ROLE {} PASSWORD {}").format(
                        psycopg.sql.Identifier(role), password
                    )
                )
                row = conn.execute(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
                ).fetchone()
        except Exception:
            print("postgres log:\n" + self.log.read_text(errors="replace"))
            raise
        assert row is not None
        return str(row[0])


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgCluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run postgres as the postgres OS user")
    base = tempfile.mkdtemp(dir="/tmp", prefix="taidon-t-")
    os.chmod(base, 0o755)
    shutil.chown(base, "postgres")
    data, sock, log = f"{base}/data", f"{base}/s", Path(base, "log")
    port = str(20000 + secrets.randbelow(30000))
    os.mkdir(sock)
    shutil.chown(sock, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, str(PG_BIN / "initdb"), "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                *as_pg,
                str(PG_BIN / "postgres"),
                "-D",
                data,
                "-k",
                sock,
                "-p",
                port,
                "-c",
                "listen_addresses=",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        # The socket appears before the server accepts sessions ("the database system is
        # starting up"): ready means a real connection succeeded.
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(
                    host=sock, port=port, user="postgres", dbname="postgres", connect_timeout=5
                ).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(errors="replace"))
                    pytest.fail("postgres did not start")
                time.sleep(0.05)
        yield PgCluster(sock, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("password", ["pencil", "pässwörd", "I\u00adX\u2168", "a\u0007b"])
def test_make_verifier_matches_postgres(postgres: PgCluster, password: str) -> None:
    theirs = postgres.role_verifier("v", password)
    iterations, salt_b64 = theirs.split("$")[1].split(":")
    ours = make_verifier(password, salt=base64.b64decode(salt_b64), iterations=int(iterations))
    assert ours == theirs


async def test_postgres_made_verifier_accepts_real_client(postgres: PgCluster) -> None:
    test_server = MiniServer()
    USERS["w"] = postgres.role_verifier("w", "from-postgres")
    srv = await asyncio.start_server(test_server.handle, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="w", password="from-postgres", timeout=10
        )
        await conn.close(timeout=5)
    finally:
        del USERS["w"]
        srv.close()
        await srv.wait_closed()
        print("test server log:\n  " + "\n  ".join(test_server.log))
