"""The build queue through real clients: two teams with a build at a time each under a global
limit (a race of concurrent asyncpg connects), an interactive psql connection overtaking queued
prewarms, queue positions as NOTICEs and in the API, per-team metrics, and a `sqlrs serve`
killed -9 with builds queued that resume after the restart."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from taidon_proxy.admin.auth import read_token
from tests.conftest import ProxyFactory, RunningProxy, free_port, processes_under
from tests.integration.test_store_recovery import (
    running,
    start_serve,
    wait_listening,
    write_config,
)
from tests.integration.test_team_server import Api, token_for

pytestmark = pytest.mark.integration

USERS = ["ana", "al", "bob"]
ADMIN = {"listen": "127.0.0.1:0"}


def slow_recipe(pg_dir: Path, name: str, seconds: float, **extra: Any) -> dict[str, Any]:
    """A psql recipe whose second file holds its build for `seconds` (pg_sleep)."""
    d = pg_dir / "sql" / name
    d.mkdir(parents=True, exist_ok=True)
    first, second = d / "00.sql", d / "01.sql"
    first.write_text(f"create table t as select '{name}'::text as name;\n")
    second.write_text(f"select pg_sleep({seconds});\ncreate table done (x int);\n")
    return {"prepare": {"kind": "psql", "files": [str(first), str(second)]}, **extra}


async def psql(p: RunningProxy, db: str, user: str = "postgres", password: str = "") -> str:
    """A real psql connecting (its stderr shows the notices it got while it waited)."""
    env = {**p.libpq_env(), "PGPASSWORD": password}
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-At", "-w", "-U", user, "-d", db, "-c", "select name from t",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == db
    return err.decode()


def build_spans(jobs: list[dict[str, Any]], events: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[float, float]]:  # fmt: skip  # noqa: E501
    """Each job's (start of its build, end): from leaving the queue to its last event."""
    spans = {}
    for job in jobs:
        evs = events[job["id"]]
        start = next(e["ts"] for e in evs if e["kind"] not in ("job.start", "queued"))
        spans[job["alias"]] = (start, evs[-1]["ts"])
    return spans


async def queue_of(api: Api) -> list[dict[str, Any]]:
    status, rows = await api.call("GET", "/v1/queue")
    assert status == 200, rows
    return list(rows)


async def wait_for(api: Api, what: str, check: Any, timeout: float = 60) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            rows = await queue_of(api)
            if check(rows):
                return rows
            await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_two_teams_one_build_each_under_a_global_limit(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    aliases = {f"a{i}": slow_recipe(pg_dir, f"a{i}", 1.0, roles=USERS) for i in range(1, 5)}
    aliases["b1"] = slow_recipe(pg_dir, "b1", 3.0, roles=USERS)
    aliases["b2"] = slow_recipe(pg_dir, "b2", 0.2, roles=USERS)
    p = await make_proxy(
        aliases, store=store, admin=ADMIN, auth={"method": "scram-sha-256"},
        builds={"concurrency": 2}, users={"al": {"quotas": {"instances": 1}}},
        teams={
            "a": {"members": ["ana", "al"], "aliases": ["*"], "quotas": {"builds": 1}},
            "b": {"members": ["bob"], "aliases": ["*"], "quotas": {"builds": 1}},
        },
    )  # fmt: skip
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        tokens = {u: await token_for(admin, u) for u in USERS}
        samples: list[list[dict[str, Any]]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append(await queue_of(admin))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        # Many clients at once: four builds of team a, two of team b, each its own recipe.
        who = [("ana", "a1"), ("ana", "a2"), ("al", "a3"), ("ana", "a4"), ("bob", "b1"),
               ("bob", "b2")]  # fmt: skip
        try:
            conns = await asyncio.gather(
                *(
                    asyncpg.connect(p.dsn(db, user=u), password=tokens[u], timeout=90)
                    for u, db in who
                )
            )
        finally:
            stop.set()
            await sampler
        try:
            for conn, (_, db) in zip(conns, who, strict=True):
                assert await conn.fetchval("select name from t") == db
            # al holds a3 and may hold one instance: a second is refused (and counted)
            with pytest.raises(asyncpg.TooManyConnectionsError, match='user "al": 1 in use'):
                await asyncpg.connect(p.dsn("a1", user="al"), password=tokens["al"])
        finally:
            for conn in conns:
                await conn.close()
        # Never more than one build of a team, nor more than two in all, at any sample.
        both = False
        for rows in samples:
            running = [r for r in rows if r["state"] == "running"]
            teams = [r["team"] for r in running]
            assert len(running) <= 2 and teams.count("a") <= 1 and teams.count("b") <= 1, rows
            both = both or sorted(teams) == ["a", "b"]
            for r in rows:  # a connection's build: interactive; positions count from 0
                assert r["priority"] == "interactive"
                queued = sorted(x["position"] for x in rows if x["state"] == "queued")
                assert queued == list(range(len(queued))), rows
        assert both, "the teams never built at the same time"
        assert any(r["position"] == 2 for rows in samples for r in rows), samples[:5]
        # The job log agrees: team a's builds one after another.
        status, jobs = await admin.call("GET", "/v1/jobs")
        assert status == 200
        jobs = [j for j in jobs if j["alias"] in aliases]
        assert len(jobs) == 6
        events = {}
        for j in jobs:
            events[j["id"]] = await _events(admin, j["id"])
            assert j["status"] == "succeeded" and j["queue"] is None, j
        spans = sorted(v for k, v in build_spans(jobs, events).items() if k.startswith("a"))
        assert len(spans) == 4
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end - 0.05, spans
        waited = [e for evs in events.values() for e in evs if e["kind"] == "queued"]
        assert any('team "a" runs 1 of its 1 builds at once' in e["message"] for e in waited)
        # Use against limits, and the metrics per team.
        status, q = await admin.call("GET", "/v1/quotas")
        assert q["teams"]["a"]["builds"] == {"used": 0, "limit": 1}
        async with http.get(
            f"{admin.base}/metrics", headers={"Authorization": f"Bearer {admin_token}"}
        ) as r:
            text = await r.text()
        metrics = _samples(text)
        assert metrics['taidon_team_builds_total{outcome="succeeded",team="a"}'] == 4
        assert metrics['taidon_team_builds_total{outcome="succeeded",team="b"}'] == 2
        assert metrics['taidon_build_queue_wait_seconds_count{team="a"}'] == 4
        assert metrics['taidon_build_queue_wait_seconds_sum{team="a"}'] > 2.0  # waited in turn
        assert metrics['taidon_team_builds_running{team="a"}'] == 0
        assert 'taidon_team_connections_open{team="b"}' in metrics
        assert 'taidon_team_instances{team="a"}' in metrics
        assert metrics['taidon_quota_refusals_total{quota="instances",team="a"}'] == 1


async def test_a_team_queue_limit_lets_exactly_the_quota_wait(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    aliases = {f"q{i}": slow_recipe(pg_dir, f"q{i}", 1.0, roles=["cy"]) for i in range(6)}
    p = await make_proxy(
        aliases, store=store, admin=ADMIN, auth={"method": "scram-sha-256"},
        teams={"c": {"members": ["cy"], "aliases": ["*"], "quotas": {"builds": 1, "queued": 2}}},
    )  # fmt: skip
    admin_token = read_token(p.proxy.config.store)
    assert admin_token
    async with aiohttp.ClientSession() as http:
        admin = Api(p, http, admin_token)
        token = await token_for(admin, "cy")
        # Six clients at once, each for its own build: one runs, two wait, three are refused.
        results = await asyncio.gather(
            *(asyncpg.connect(p.dsn(a, user="cy"), password=token, timeout=90) for a in aliases),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, asyncpg.Connection)]
        lost = [r for r in results if not isinstance(r, asyncpg.Connection)]
        try:
            assert len(won) == 3, results
            for err in lost:
                assert isinstance(err, asyncpg.TooManyConnectionsError), err
                assert err.sqlstate == "53300"
                assert err.args[0] == (
                    'quota exceeded: queued builds for team "c": 2 waiting, limit 2'
                )
                assert "sqlrs admin jobs" in (err.hint or "")
        finally:
            for c in won:
                await c.close()
        # A refused build left nothing behind: no job, no queue row.
        _, jobs = await admin.call("GET", "/v1/jobs")
        assert len([j for j in jobs if j["alias"] in aliases]) == 3
        assert all(j["status"] == "succeeded" for j in jobs if j["alias"] in aliases)
        assert await p.proxy.builder.queue_rows.pending() == []  # type: ignore[union-attr]
        _, q = await admin.call("GET", "/v1/quotas")
        assert q["teams"]["c"]["queued"] == {"used": 0, "limit": 2}
        async with http.get(f"{admin.base}/metrics", headers=admin.headers) as r:
            metrics = _samples(await r.text())
        assert metrics['taidon_quota_refusals_total{quota="queued",team="c"}'] == 3


async def _events(api: Api, job: str) -> list[dict[str, Any]]:
    async with api.http.get(f"{api.base}/v1/jobs/{job}/events", headers=api.headers) as r:
        assert r.status == 200
        return [json.loads(line) for line in (await r.text()).splitlines() if line]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _prepare(api: Api, alias: str, priority: str | None = None) -> list[dict[str, Any]]:
    """POST /v1/aliases/{alias}/prepare, read to its end (NDJSON lines)."""
    params = {"priority": priority} if priority else {}
    async with api.http.post(
        f"{api.base}/v1/aliases/{alias}/prepare", headers=api.headers, params=params
    ) as r:
        assert r.status == 200, await r.text()
        return [json.loads(line) for line in (await r.text()).splitlines() if line]


async def test_an_interactive_connection_overtakes_queued_prewarms(
    make_proxy: ProxyFactory, pg_dir: Path, store: str
) -> None:
    p = await make_proxy(
        {
            "hold": slow_recipe(pg_dir, "hold", 2.0),
            "warm": slow_recipe(pg_dir, "warm", 0.1),
            "nightly": slow_recipe(pg_dir, "nightly", 0.1),
            "conn": slow_recipe(pg_dir, "conn", 0.1),
        },
        store=store, admin=ADMIN, builds={"concurrency": 1},
    )  # fmt: skip
    token = read_token(p.proxy.config.store)
    assert token
    async with aiohttp.ClientSession() as http:
        api = Api(p, http, token)
        hold = asyncio.create_task(_prepare(api, "hold"))
        await wait_for(api, "hold running", lambda rows: any(r["state"] == "running" for r in rows))
        warm = asyncio.create_task(_prepare(api, "warm"))
        await wait_for(api, "warm queued", lambda rows: len(rows) == 2)
        nightly = asyncio.create_task(_prepare(api, "nightly", "ci"))
        await wait_for(api, "nightly queued", lambda rows: len(rows) == 3)
        status, bad = await api.call("POST", "/v1/aliases/warm/prepare?priority=urgent")
        assert status == 422 and bad["error"]["field"] == "priority", bad
        client = asyncio.create_task(psql(p, "conn"))
        rows = await wait_for(api, "conn queued", lambda rows: len(rows) == 4)
        queued = {
            r["alias"]: (r["position"], r["priority"]) for r in rows if r["state"] == "queued"
        }
        assert queued == {"conn": (0, "interactive"), "warm": (1, "prewarm"), "nightly": (2, "ci")}
        status, jobs = await api.call("GET", "/v1/jobs")
        ours = ("hold", "warm", "nightly", "conn")  # (the module's store keeps other tests' jobs)
        by_alias = {j["alias"]: j for j in jobs if j["alias"] in ours}
        assert by_alias["warm"]["status"] == "queued"
        assert (
            by_alias["warm"]["queue"]["position"] == 1 and by_alias["warm"]["queue"]["team"] is None
        )
        assert by_alias["hold"]["queue"]["state"] == "running"
        # The dashboard's overview lists the waiting builds, next first.
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            async with browser.post(f"{api.base}/ui/signin", data={"token": token}) as r:
                assert r.status == 200
            async with browser.get(f"{api.base}/") as r:
                page = await r.text()
        assert 'id="queued-builds"' in page, page[page.find("Builds queued") :][:400]
        listed = page[page.index('id="queued-builds"') :].split("</ol>")[0]
        where = {a: listed.find(f"</a> {a}:") for a in ("conn", "warm", "nightly")}
        assert -1 not in where.values() and sorted(where, key=where.__getitem__) == list(where)
        assert "interactive" in listed and "ci" in listed
        err = await client
        notices = [ln for ln in err.splitlines() if ln.startswith("NOTICE:")]
        assert "NOTICE:  queued: 0 builds ahead; 1 of 1 builds run at once" in notices, err
        assert notices.index("NOTICE:  preparing conn") < notices.index(
            "NOTICE:  queued: 0 builds ahead; 1 of 1 builds run at once"
        )
        assert any(n.startswith("NOTICE:  building now, after ") for n in notices), notices
        for task in (hold, warm, nightly):
            lines = await task
            assert "result" in lines[-1], lines[-1]
        events = {j["id"]: await _events(api, j["id"]) for j in by_alias.values()}
        spans = build_spans(list(by_alias.values()), events)
        order = sorted(spans, key=lambda a: spans[a][0])
        assert order == ["hold", "conn", "warm", "nightly"], spans
        # The prewarm's client saw its position move back when the connection overtook it.
        warm_queued = [
            e["message"] for e in events[by_alias["warm"]["id"]] if e["kind"] == "queued"
        ]
        assert warm_queued[0].startswith("queued: 0 builds ahead")
        assert any(m.startswith("queued: 1 build ahead") for m in warm_queued), warm_queued
        assert await queue_of(api) == []


def kinds_of(store: Path, alias: str) -> list[str]:
    db = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT kind FROM states WHERE alias = ?", (alias,))]
    finally:
        db.close()


async def test_a_proxy_killed_with_builds_queued_resumes_them_in_order(pg_dir: Path) -> None:
    marker = pg_dir / "slow"
    marker.write_text("")
    marker.chmod(0o644)
    first = slow_recipe(pg_dir, "r1", 0)
    # r1's second file sleeps while the marker exists: the build is cut there
    Path(first["prepare"]["files"][1]).write_text(
        f"select pg_sleep(case when pg_stat_file('{marker}', true) is null then 0 else 60 end);\n"
        "create table done (x int);\n"
    )
    port, admin_port = free_port(), free_port()
    path = write_config(
        pg_dir,
        {"r1": first, "r2": slow_recipe(pg_dir, "r2", 0), "r3": slow_recipe(pg_dir, "r3", 0)},
        listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin_port}"},
        builds={"concurrency": 1},
    )  # fmt: skip
    log_path = pg_dir / "serve.log"
    clones = pg_dir / "store" / "data" / "clones"
    serve = start_serve(path, log_path)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await asyncio.to_thread(wait_listening, serve, port)
        token = read_token(pg_dir / "store")
        assert token
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:

            async def fire(alias: str, priority: str) -> None:
                url = f"http://127.0.0.1:{admin_port}/v1/aliases/{alias}/prepare"
                async with http.post(url, headers=headers, params={"priority": priority}) as r:
                    await r.read()

            async def queue() -> list[dict[str, Any]]:
                url = f"http://127.0.0.1:{admin_port}/v1/queue"
                async with http.get(url, headers=headers) as r:
                    return list(await r.json())

            tasks.append(asyncio.create_task(fire("r1", "prewarm")))
            async with asyncio.timeout(60):
                while not any(r["state"] == "running" for r in await queue()):
                    await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(fire("r2", "ci")))
            tasks.append(asyncio.create_task(fire("r3", "prewarm")))
            async with asyncio.timeout(60):
                while len(rows := await queue()) < 3:
                    await asyncio.sleep(0.05)
                # r1 is inside its slow file: its first file's state is complete
                while "psql" not in kinds_of(pg_dir / "store", "r1"):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            before = {r["alias"]: r for r in rows}
            assert [before[a]["state"] for a in ("r1", "r2", "r3")] == [
                "running",
                "queued",
                "queued",
            ]
            assert before["r3"]["position"] == 0 and before["r2"]["position"] == 1
            os.kill(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
            for t in tasks:
                with contextlib.suppress(Exception):
                    await t
        marker.unlink()

        async with running(path) as (proxy, dsn):
            assert proxy.builder is not None
            jobs = {j.alias: j for j in proxy.builder.jobs.values()}
            # The same jobs, resumed: r1 (it was running) first, then r3 (prewarm), then r2 (ci).
            assert {a: j.id for a, j in jobs.items()} == {a: r["job"] for a, r in before.items()}
            async with asyncio.timeout(60):
                while not all(j.done for j in jobs.values()):
                    await asyncio.sleep(0.05)
            assert [jobs[a].status for a in ("r1", "r2", "r3")] == ["succeeded"] * 3
            starts = {
                a: next(e.ts for e in j.events if e.message.startswith("resumed after a restart"))
                for a, j in jobs.items()
            }
            ran = {
                a: [e.ts for e in j.events if e.kind == "step.start"][-1] for a, j in jobs.items()
            }
            assert sorted(ran, key=ran.__getitem__) == ["r1", "r3", "r2"], (starts, ran)
            # r1 went on from its last complete state: only its second file ran again.
            messages = [e.message for e in jobs["r1"].events]
            cut = messages.index("resumed after a restart: rebuilding from its last complete state")
            assert [m for m in messages[cut:] if m.startswith("applying")] == [
                "applying sql/r1/01.sql (2/2)"
            ]
            # Its events up to its build's start are kept, in one log with the new ones.
            assert messages[0] == "preparing r1" and cut > 0
            assert [e.seq for e in jobs["r1"].events] == list(range(len(messages)))
            r3 = [e.message for e in jobs["r3"].events]
            assert r3[:2] == ["preparing r3", "resumed after a restart"], r3
            assert r3[2].startswith("queued: 0 builds ahead"), r3  # behind r1 again
            stored = {j["id"]: j for j in await proxy.meta.jobs()}
            assert [stored[jobs[a].id]["status"] for a in ("r1", "r2", "r3")] == ["succeeded"] * 3
            assert await proxy.builder.queue_rows.pending() == []
            conn = await asyncpg.connect(f"{dsn}/r1", timeout=60)
            try:
                assert await conn.fetchval("select name from t") == "r1"
                assert await conn.fetchval("select count(*) from done") == 0
            finally:
                await conn.close()
    except BaseException:
        sys.stderr.write(f"--- sqlrs serve log ---\n{log_path.read_text(errors='replace')}\n")
        raise
    finally:
        for t in tasks:
            t.cancel()
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=10)
        for pid in processes_under(clones):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
