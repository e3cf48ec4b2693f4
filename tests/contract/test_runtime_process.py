"""The runtime contract against ProcessRuntime, plus what only the process runtime promises."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from taidon_proxy.runtimes import open_runtime, proctree
from taidon_proxy.runtimes.base import InstanceRuntime, RuntimeError_
from taidon_proxy.runtimes.process import ProcessRuntime, short_name
from tests.contract.runtime_suite import (
    Harness,
    RuntimeContract,
    RuntimeFactory,
    connect,
    make_shared_tmp,
    query,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to run servers as another user")


def identities(pids: list[int]) -> list[tuple[int, int]]:
    """(pid, start time) pairs: a pid alone may be reused by then."""
    return [(st.pid, st.start_ticks) for p in pids if (st := proctree.read_stat(p)) is not None]


def survivors(procs: list[tuple[int, int]]) -> list[tuple[int, str, list[str]]]:
    """Which of `procs` still run, with their state and command line."""
    found = []
    for pid, ticks in procs:
        st = proctree.read_stat(pid)
        if st is not None and st.start_ticks == ticks and st.state not in ("Z", "X"):
            found.append((pid, st.state, proctree.cmdline(pid)))
    return found


async def lasting_survivors(procs: list[tuple[int, int]]) -> list[tuple[int, str, list[str]]]:
    """`survivors`, but a process already in its exit (memory released: no command line,
    state still R or D on a busy machine) is given up to 5 s to finish it."""
    for _ in range(250):
        found = survivors(procs)
        if all(argv for _, _, argv in found):
            break
        await asyncio.sleep(0.02)
    return found


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = make_shared_tmp("taidon-r-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestProcessRuntime(RuntimeContract):
    kind = "process"

    @pytest.fixture
    def runtime_factory(self, run_dir: Path) -> RuntimeFactory:
        return lambda: ProcessRuntime(run_dir=run_dir)

    # -- process-only guarantees --------------------------------------------------------------

    @needs_root
    @pytest.mark.root
    async def test_runs_as_the_os_user(self, runtime: InstanceRuntime, harness: Harness) -> None:
        handle = await harness.start(runtime, "who", await harness.pgdata(runtime))
        uid = pwd.getpwnam("postgres").pw_uid
        assert proctree.uid(handle.pid) == uid
        children = proctree.descendants(handle.pid)
        assert children, "a running postmaster has background processes"
        assert {proctree.uid(p) for p in children} == {uid}
        st = handle.socket_dir.stat()
        assert st.st_uid == uid
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert stat.S_IMODE(handle.socket_dir.parent.stat().st_mode) == 0o755

    async def test_holds_no_tcp_listener(self, runtime: InstanceRuntime, harness: Harness) -> None:
        handle = await harness.start(runtime, "tcp", await harness.pgdata(runtime))
        assert proctree.listening_tcp_ports(handle.pid) == []

    async def test_record_lives_as_long_as_the_server(
        self, runtime: InstanceRuntime, harness: Harness, run_dir: Path
    ) -> None:
        handle = await harness.start(runtime, "rec", await harness.pgdata(runtime))
        record = json.loads((run_dir / "instances" / "rec.json").read_text())
        assert record["pid"] == handle.pid
        assert record["pgdata"] == str(handle.pgdata)
        assert handle.socket_dir == run_dir / "rec"
        await harness.stop(runtime, handle)
        assert not (run_dir / "instances" / "rec.json").exists()
        assert not handle.socket_dir.exists()

    async def test_failed_start_leaves_no_process_or_record(
        self, runtime: InstanceRuntime, harness: Harness, run_dir: Path
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        (pgdata / "postgresql.conf").write_text("shared_buffers = 'lots'\n")
        with pytest.raises(RuntimeError_) as info:
            await harness.start(runtime, "bad", pgdata)
        assert "shared_buffers" in str(info.value)
        assert list((run_dir / "instances").iterdir()) == []
        assert not (run_dir / "bad").exists()

    async def test_stale_pid_file_with_dead_pid_is_ignored(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        dead = await asyncio.create_subprocess_exec("true")
        await dead.wait()
        pid_file = pgdata / "postmaster.pid"
        pid_file.write_text(f"{dead.pid}\n{pgdata}\n1\n5432\n/nowhere\n\n  5432001  0\nready   \n")
        handle = await harness.start(runtime, "stale", pgdata)
        assert await query(handle, "select 1") == 1

    async def test_refuses_a_data_dir_in_use(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        first = await harness.start(runtime, "first", pgdata)
        with pytest.raises(RuntimeError_, match="already running"):
            await harness.start(runtime, "second", pgdata)
        assert await query(first, "select 1") == 1

    async def test_refuses_a_live_recorded_id(self, harness: Harness) -> None:
        old = harness.new_runtime()
        await harness.start(old, "busy", await harness.pgdata(old, "one"))
        new = harness.new_runtime()
        with pytest.raises(RuntimeError_, match="reap it first"):
            await harness.start(new, "busy", await harness.pgdata(new, "two"))

    async def test_reserved_settings_are_refused(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        pgdata = await harness.pgdata(runtime)
        for key in ("listen_addresses", "port", "unix_socket_directories"):
            with pytest.raises(RuntimeError_, match="managed by the runtime"):
                await harness.start(runtime, "r", pgdata, {key: "x"})

    async def test_root_owned_copy_is_handed_to_the_os_user(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        if not IS_ROOT:
            pytest.skip("needs root to own files as another user")
        template = await harness.pgdata(runtime, "orig")
        copy = harness.workdir / "copy"
        await asyncio.to_thread(shutil.copytree, template, copy)  # now owned by root
        copy.chmod(0o755)
        handle = await harness.start(runtime, "owned", copy)
        assert await query(handle, "select 1") == 1
        assert copy.stat().st_uid == pwd.getpwnam("postgres").pw_uid

    @needs_root
    @pytest.mark.root
    async def test_unreachable_data_dir_is_named(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        locked = harness.workdir / "locked"
        locked.mkdir(mode=0o700)
        (locked / "inner").mkdir(mode=0o755)
        with pytest.raises(RuntimeError_, match=f"cannot traverse {locked} "):
            await runtime.init_cluster(locked / "inner" / "pg", {})
        pgdata = await harness.pgdata(runtime)
        shutil.move(pgdata, locked / "pg")
        with pytest.raises(RuntimeError_, match=f"cannot traverse {locked} "):
            await harness.start(runtime, "locked", locked / "pg")

    @needs_root
    @pytest.mark.root
    async def test_init_cluster_opens_its_own_parent(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        parent = harness.workdir / "clone"
        parent.mkdir(mode=0o700)
        await runtime.init_cluster(parent / "pgdata", {})
        assert stat.S_IMODE(parent.stat().st_mode) == 0o701
        handle = await harness.start(runtime, "opened", parent / "pgdata")
        assert await query(handle, "select 1") == 1

    async def test_socket_path_limit_is_checked(self, harness: Harness) -> None:
        deep = harness.workdir / ("d" * 90)
        rt = ProcessRuntime(run_dir=deep)
        harness.runtimes.append(rt)
        pgdata = await harness.pgdata(rt)
        with pytest.raises(RuntimeError_, match="107 bytes"):
            await harness.start(rt, "long-enough-name", pgdata)

    async def test_planted_run_dir_is_refused(self, harness: Harness) -> None:
        target = harness.workdir / "elsewhere"
        target.mkdir()
        planted = harness.workdir / "run"
        planted.symlink_to(target)
        rt = ProcessRuntime(run_dir=planted)
        harness.runtimes.append(rt)
        with pytest.raises(RuntimeError_, match="not a directory owned"):
            await harness.start(rt, "p", await harness.pgdata(rt))
        assert list(target.iterdir()) == []

    async def test_concurrent_starts_of_one_id_run_one_server(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        first, second = await asyncio.gather(
            harness.start(runtime, "same", await harness.pgdata(runtime, "x")),
            harness.start(runtime, "same", await harness.pgdata(runtime, "y")),
            return_exceptions=True,
        )
        outcomes = sorted(type(o).__name__ for o in (first, second))
        assert outcomes == ["InstanceHandle", "RuntimeError_"], (first, second)

    async def test_stop_kills_the_group_when_shutdown_hangs(
        self, harness: Harness, run_dir: Path
    ) -> None:
        rt = ProcessRuntime(run_dir=run_dir, stop_timeout=1.0)
        harness.runtimes.append(rt)
        handle = await harness.start(rt, "hang", await harness.pgdata(rt))
        children = identities(proctree.descendants(handle.pid))
        checkpointer = [p for p, _ in children if "checkpointer" in " ".join(proctree.cmdline(p))]
        assert checkpointer, [proctree.cmdline(p) for p, _ in children]
        # A fast shutdown waits for the shutdown checkpoint, which now never comes.
        os.kill(checkpointer[0], signal.SIGSTOP)
        async with asyncio.timeout(15):
            await harness.stop(rt, handle)
        assert await rt.wait_exit(handle) == -signal.SIGKILL
        assert await lasting_survivors(children) == []

    async def test_no_process_survives_a_crash_and_stop(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        handle = await harness.start(runtime, "crashy", await harness.pgdata(runtime))
        conn = await connect(handle)
        children = identities(proctree.descendants(handle.pid))
        os.kill(handle.pid, signal.SIGKILL)
        try:
            async with asyncio.timeout(10):
                await runtime.wait_exit(handle)
            await harness.stop(runtime, handle)
        finally:
            conn.terminate()
        assert proctree.postgres_in(handle.pgdata) == []
        assert await lasting_survivors(children) == []

    async def test_reaping_a_frozen_leftover_kills_all_of_it(self, harness: Harness) -> None:
        old = harness.new_runtime()
        handle = await harness.start(old, "frost", await harness.pgdata(old))
        assert proctree.postgres_in(handle.pgdata)
        await old.freeze(handle)
        async with asyncio.timeout(30):
            assert await harness.new_runtime().reap(set()) == ["frost"]
        assert proctree.postgres_in(handle.pgdata) == []

    async def test_unknown_initdb_setting_is_refused(
        self, runtime: InstanceRuntime, harness: Harness
    ) -> None:
        with pytest.raises(RuntimeError_, match="lc_typo"):
            await runtime.init_cluster(harness.workdir / "pg", {"lc_typo": "C"})
        assert not (harness.workdir / "pg").exists()

    async def test_reap_leaves_a_reused_pid_alone(self, harness: Harness, run_dir: Path) -> None:
        """A record whose pid now belongs to another process must not get that process killed."""
        other = await asyncio.create_subprocess_exec("sleep", "30")
        try:
            (run_dir / "instances").mkdir(exist_ok=True)
            (run_dir / "instances" / "ghost.json").write_text(
                json.dumps(
                    {
                        "instance_id": "ghost",
                        "pid": other.pid,
                        "start_ticks": 1,
                        "pgdata": "/nonexistent",
                        "socket_dir": str(run_dir / "ghost"),
                        "started_at": 0.0,
                    }
                )
            )
            rt = harness.new_runtime()
            assert await rt.reap(set()) == ["ghost"]
            assert other.returncode is None and proctree.is_alive(other.pid)
        finally:
            other.kill()
            await other.wait()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("instance_id", "expected"),
    [("shop", "shop"), ("gw0.1", "gw0.1"), ("instances", None), ("shop:ci/42", None), (".x", None)],
)
def test_short_name(instance_id: str, expected: str | None) -> None:
    name = short_name(instance_id)
    if expected is not None:
        assert name == expected
    else:
        assert name != instance_id
        assert "/" not in name and not name.startswith(".")
        assert short_name(instance_id) == name
    assert len(name) <= 24


@pytest.mark.unit
def test_long_ids_get_distinct_names() -> None:
    a, b = "x" * 30 + "a", "x" * 30 + "b"
    assert short_name(a) != short_name(b)


@pytest.mark.unit
def test_registry_opens_process_and_names_the_known_kinds(tmp_path: Path) -> None:
    rt = open_runtime("process", run_dir=tmp_path / "run")
    assert isinstance(rt, ProcessRuntime)
    assert isinstance(rt, InstanceRuntime)
    with pytest.raises(RuntimeError_, match="process"):
        open_runtime("vm")
