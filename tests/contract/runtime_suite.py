"""The instance runtime contract: one suite every InstanceRuntime must pass, with real servers.

Subclass `RuntimeContract` in a `test_*.py` module and provide the `runtime_factory` fixture:
a callable that returns a new runtime object sharing the same records (the same run
directory, the same daemon), as a restarted proxy would. Runtime-specific details (how to
crash a server, where its log is) are methods a subclass may override.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import ClassVar

import asyncpg
import pytest

from taidon_proxy.runtimes.base import (
    InstanceHandle,
    InstanceRuntime,
    InstanceStartError,
    RuntimeError_,
)

RuntimeFactory = Callable[[], InstanceRuntime]


def make_shared_tmp(prefix: str) -> Path:
    """A directory under /tmp that an unprivileged server user can traverse (0755)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    path.chmod(0o755)
    return path


async def connect(handle: InstanceHandle, timeout: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=str(handle.socket_dir),
        port=handle.port,
        user="postgres",
        database="postgres",
        timeout=timeout,
    )


async def query(handle: InstanceHandle, sql: str) -> object:
    """Run one statement on a fresh connection and return the first value."""
    conn = await connect(handle)
    try:
        return await conn.fetchval(sql, timeout=10)
    finally:
        await conn.close(timeout=5)


class Harness:
    """Tracks what a test starts so teardown can print server logs and stop everything."""

    def __init__(
        self, factory: RuntimeFactory, workdir: Path, templates: dict[str, Path], kind: str
    ) -> None:
        self.factory = factory
        self.workdir = workdir
        self._templates = templates
        self._kind = kind
        self.runtimes: list[InstanceRuntime] = []
        self.handles: list[tuple[InstanceRuntime, InstanceHandle]] = []
        self.logs: dict[str, str] = {}
        self.read_log: Callable[[InstanceHandle], str] = lambda h: ""

    def new_runtime(self) -> InstanceRuntime:
        rt = self.factory()
        self.runtimes.append(rt)
        return rt

    async def pgdata(self, rt: InstanceRuntime, name: str = "pg") -> Path:
        """A fresh stopped cluster: a copy (ownership kept) of one made by `rt.init_cluster`."""
        template = self._templates.get(self._kind)
        if template is None:
            root = make_shared_tmp("taidon-tpl-")
            template = root / "pg"
            await rt.init_cluster(template, {})
            self._templates[self._kind] = template
        dest = self.workdir / name
        await run("cp", "-a", str(template), str(dest))
        return dest

    async def start(
        self,
        rt: InstanceRuntime,
        instance_id: str,
        pgdata: Path,
        settings: dict[str, str] | None = None,
    ) -> InstanceHandle:
        handle = await rt.start(instance_id, pgdata, settings)
        self.handles.append((rt, handle))
        return handle

    def keep_log(self, handle: InstanceHandle) -> str:
        text = self.read_log(handle)
        key = f"{handle.instance_id} (pid {handle.pid})"
        if text or key not in self.logs:  # a stopped server's log may be gone by now
            self.logs[key] = text
        return text

    async def stop(self, rt: InstanceRuntime, handle: InstanceHandle, mode: str = "fast") -> None:
        self.keep_log(handle)
        async with asyncio.timeout(60):
            await rt.stop(handle, mode=mode)

    async def teardown(self) -> None:
        for _, handle in self.handles:
            self.keep_log(handle)
        for rt in self.runtimes:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(60):
                    await rt.close()
        # Shown by pytest only when the test failed.
        for name, text in self.logs.items():
            print(f"----- server log of {name} -----\n{text}")


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    async with asyncio.timeout(120):
        assert await proc.wait() == 0, argv


class RuntimeContract:
    """What every instance runtime guarantees. Subclasses provide `runtime_factory`."""

    pytestmark: ClassVar = [pytest.mark.contract, pytest.mark.integration]
    kind = "abstract"

    @pytest.fixture(scope="class")
    @classmethod
    def _cluster_templates(cls) -> Iterator[dict[str, Path]]:
        """initdb once per test class; tests get copies."""
        templates: dict[str, Path] = {}
        yield templates
        for path in templates.values():
            shutil.rmtree(path.parent, ignore_errors=True)

    @pytest.fixture
    def runtime_factory(self) -> RuntimeFactory:
        raise NotImplementedError("a RuntimeContract subclass provides runtime_factory")

    def server_log(self, handle: InstanceHandle) -> str:
        """The server's log so far ("" when the runtime keeps none)."""
        path = handle.extra.get("log_path")
        if path is None:
            return ""
        try:
            return Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def crash(self, handle: InstanceHandle) -> None:
        """Kill the server the hard way, as an OOM killer would."""
        os.kill(handle.pid, signal.SIGKILL)

    @pytest.fixture
    async def harness(
        self, runtime_factory: RuntimeFactory, _cluster_templates: dict[str, Path]
    ) -> AsyncIterator[Harness]:
        workdir = make_shared_tmp("taidon-t-")
        h = Harness(runtime_factory, workdir, _cluster_templates, self.kind)
        h.read_log = self.server_log
        try:
            yield h
        finally:
            await h.teardown()
            shutil.rmtree(workdir, ignore_errors=True)

    @pytest.fixture
    def runtime(self, harness: Harness) -> InstanceRuntime:
        return harness.new_runtime()

    # -- engine and clusters ------------------------------------------------------------------

    async def test_engine_reports_the_real_version(self, runtime: InstanceRuntime) -> None:
        info = await runtime.engine()
        assert re.fullmatch(r"\d+\.\d+", info.version), info
        assert info.major == int(info.version.split(".")[0])
        assert info.source
        assert await runtime.engine() == info

    async def test_init_cluster_applies_settings(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = harness.workdir / "fresh"
        settings = {"encoding": "UTF8", "locale": "C", "data_checksums": "on"}
        await runtime.init_cluster(pgdata, settings)
        assert (pgdata / "PG_VERSION").is_file()
        handle = await harness.start(runtime, "fresh", pgdata)
        assert await query(handle, "show data_checksums") == "on"
        assert await query(handle, "show server_encoding") == "UTF8"
        assert await query(handle, "show lc_collate") == "C"

    async def test_init_cluster_refuses_an_existing_dir(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        (harness.workdir / "taken").mkdir()
        with pytest.raises(RuntimeError_):
            await runtime.init_cluster(harness.workdir / "taken", {})

    # -- start and stop -----------------------------------------------------------------------

    async def test_start_serves_a_real_client(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        t0 = time.perf_counter()
        handle = await harness.start(runtime, "one", pgdata)
        ready_ms = (time.perf_counter() - t0) * 1000
        assert handle.socket_path.exists()
        assert await query(handle, "select 1") == 1
        print(f"start() to ready: {ready_ms:.1f} ms")

    async def test_listens_on_no_tcp_port(self, runtime: InstanceRuntime, harness: Harness) -> None:
        handle = await harness.start(runtime, "notcp", await harness.pgdata(runtime))
        assert await query(handle, "show listen_addresses") == ""

    async def test_caller_settings_reach_the_server(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        handle = await harness.start(runtime, "set", pgdata, {"statement_timeout": "1234ms"})
        assert await query(handle, "show statement_timeout") == "1234ms"
        assert await query(handle, "show fsync") == "off"

    async def test_stop_is_clean_and_idempotent(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        handle = await harness.start(runtime, "clean", pgdata)
        conn = await connect(handle)
        await conn.execute("create table t as select 42 as v")
        await conn.close()
        await harness.stop(runtime, handle)
        assert not handle.socket_path.exists()
        async with asyncio.timeout(5):
            await runtime.wait_exit(handle)
        await runtime.stop(handle)  # idempotent

        again = await harness.start(runtime, "clean", pgdata)
        assert await query(again, "select v from t") == 42
        log = self.server_log(again)
        assert "not properly shut down" not in log
        assert "automatic recovery" not in log

    async def test_immediate_stop_then_restart_recovers(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        handle = await harness.start(runtime, "imm", pgdata)
        await harness.stop(runtime, handle, mode="immediate")
        again = await harness.start(runtime, "imm", pgdata)
        assert await query(again, "select 1") == 1
        assert "not properly shut down" in self.server_log(again)

    async def test_start_time_is_measured(self, runtime: InstanceRuntime, harness: Harness) -> None:
        pgdata = await harness.pgdata(runtime)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            handle = await harness.start(runtime, "timed", pgdata)
            times.append((time.perf_counter() - t0) * 1000)
            assert await query(handle, "select 1") == 1
            await harness.stop(runtime, handle)
        print(
            f"{self.kind}: start() to ready over {len(times)} starts: "
            f"median {statistics.median(times):.1f} ms, min {min(times):.1f}, max {max(times):.1f}"
        )
        assert len(times) == 5

    async def test_broken_config_raises_with_the_log(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        with (pgdata / "postgresql.conf").open("a") as f:
            f.write("\nthis is = = not a setting\n")
        with pytest.raises(InstanceStartError) as info:
            await harness.start(runtime, "broken", pgdata)
        assert "postgresql.conf" in str(info.value)
        assert "syntax error" in str(info.value)
        # Nothing is left behind: the same id starts once the config is repaired.
        conf = (pgdata / "postgresql.conf").read_text()
        (pgdata / "postgresql.conf").write_text(conf.replace("this is = = not a setting", ""))
        handle = await harness.start(runtime, "broken", pgdata)
        assert await query(handle, "select 1") == 1

    async def test_start_refuses_a_dir_that_is_not_a_cluster(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        empty = harness.workdir / "empty"
        empty.mkdir()
        with pytest.raises(RuntimeError_):
            await harness.start(runtime, "empty", empty)

    # -- exits --------------------------------------------------------------------------------

    async def test_crash_is_seen_by_wait_exit(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        handle = await harness.start(runtime, "crash", await harness.pgdata(runtime))
        waiter = asyncio.create_task(runtime.wait_exit(handle))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await self.crash(handle)
        async with asyncio.timeout(10):
            status = await waiter
        assert status != 0
        await harness.stop(runtime, handle)  # cleans up after a dead server

    async def test_wait_exit_runs_alongside_stop(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        handle = await harness.start(runtime, "waited", await harness.pgdata(runtime))
        waiters = [asyncio.create_task(runtime.wait_exit(handle)) for _ in range(2)]
        await asyncio.sleep(0.02)
        await harness.stop(runtime, handle)
        async with asyncio.timeout(10):
            statuses = await asyncio.gather(*waiters)
        assert statuses[0] == statuses[1]
        assert await runtime.wait_exit(handle) == statuses[0]

    # -- freeze -------------------------------------------------------------------------------

    async def test_freeze_pauses_and_thaw_resumes(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        if not runtime.capabilities.can_freeze:
            pytest.skip(f"{runtime.capabilities.name} cannot freeze")
        handle = await harness.start(runtime, "frozen", await harness.pgdata(runtime))
        conn = await connect(handle)
        try:
            await runtime.freeze(handle)
            pending = asyncio.create_task(conn.fetchval("select 1"))
            done, _ = await asyncio.wait({pending}, timeout=1.0)
            assert not done, "a query completed on a frozen server"
            with pytest.raises(TimeoutError):
                await connect(handle, timeout=1.0)
            await runtime.thaw(handle)
            async with asyncio.timeout(10):
                assert await pending == 1
            assert await query(handle, "select 2") == 2
        finally:
            conn.terminate()

    async def test_stop_while_frozen_does_not_hang(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        if not runtime.capabilities.can_freeze:
            pytest.skip(f"{runtime.capabilities.name} cannot freeze")
        handle = await harness.start(runtime, "ice", await harness.pgdata(runtime))
        await runtime.freeze(handle)
        async with asyncio.timeout(20):
            await harness.stop(runtime, handle)
            await runtime.wait_exit(handle)

    async def test_clone_of_a_frozen_server_starts(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        """A live snapshot carries postmaster.pid of a running server: the clone must start."""
        if not runtime.capabilities.can_freeze:
            pytest.skip(f"{runtime.capabilities.name} cannot freeze")
        pgdata = await harness.pgdata(runtime)
        source = await harness.start(runtime, "source", pgdata, {"synchronous_commit": "on"})
        await query(source, "create table t as select 7 as v")
        await runtime.freeze(source)
        clone = harness.workdir / "clone"
        try:
            await run("cp", "-a", str(pgdata), str(clone))
        finally:
            await runtime.thaw(source)
        assert (clone / "postmaster.pid").exists()
        copy = await harness.start(runtime, "copy", clone)
        assert await query(copy, "select v from t") == 7
        assert await query(source, "select v from t") == 7

    # -- several instances and runtimes -------------------------------------------------------

    async def test_two_instances_are_independent(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        a = await harness.start(runtime, "a", await harness.pgdata(runtime, "a"))
        b = await harness.start(runtime, "b", await harness.pgdata(runtime, "b"))
        assert a.socket_path != b.socket_path
        await query(a, "create table only_in_a(x int)")
        assert await query(a, "select to_regclass('only_in_a') is not null") is True
        assert await query(b, "select to_regclass('only_in_a') is not null") is False
        await harness.stop(runtime, a)
        assert await query(b, "select 1") == 1

    async def test_start_refuses_a_running_id(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        await harness.start(runtime, "dup", await harness.pgdata(runtime, "d1"))
        with pytest.raises(RuntimeError_):
            await harness.start(runtime, "dup", await harness.pgdata(runtime, "d2"))

    async def test_reap_stops_what_an_earlier_runtime_left(self, harness: Harness) -> None:
        old = harness.new_runtime()  # the previous proxy
        gone = await harness.start(old, "gone", await harness.pgdata(old, "gone"))
        kept = await harness.start(old, "kept", await harness.pgdata(old, "kept"))
        new = harness.new_runtime()
        async with asyncio.timeout(30):
            reaped = await new.reap({"kept"})
        assert reaped == ["gone"]
        async with asyncio.timeout(10):
            await old.wait_exit(gone)
        assert await query(kept, "select 1") == 1
        assert await new.reap({"kept"}) == []

    async def test_reap_stops_a_frozen_leftover(self, harness: Harness) -> None:
        old = harness.new_runtime()
        if not old.capabilities.can_freeze:
            pytest.skip(f"{old.capabilities.name} cannot freeze")
        left = await harness.start(old, "left", await harness.pgdata(old))
        await old.freeze(left)
        new = harness.new_runtime()
        async with asyncio.timeout(30):
            assert await new.reap(set()) == ["left"]
            await old.wait_exit(left)

    async def test_close_stops_everything(self, runtime: InstanceRuntime, harness: Harness) -> None:
        handles = [
            await harness.start(runtime, f"c{i}", await harness.pgdata(runtime, f"c{i}"))
            for i in range(3)
        ]
        for handle in handles:
            harness.keep_log(handle)
        async with asyncio.timeout(30):
            await runtime.close()
            for handle in handles:
                await runtime.wait_exit(handle)
        for handle in handles:
            assert not handle.socket_path.exists()
