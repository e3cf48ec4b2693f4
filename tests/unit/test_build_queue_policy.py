"""The build queue's policy (which build starts next) and its asyncio gate, without builds."""

from __future__ import annotations

import asyncio

import pytest

from taidon_proxy.config import Config
from taidon_proxy.prepare import queue as q
from taidon_proxy.prepare.queue import BuildQueue, Entry, Priority, Requester


def entry(job: str, team: str | None, priority: Priority = Priority.PREWARM, seq: int = 0,
          *, running: bool = False, resumed: bool = False) -> Entry:  # fmt: skip
    return Entry(job, "shop", None, team, priority, seq, 0.0, resumed, running)


def limits(**per_team: int) -> object:
    return lambda team: per_team.get(team or "")


def test_global_concurrency_and_team_limits() -> None:
    entries = [entry("a1", "a", seq=0), entry("a2", "a", seq=1), entry("b1", "b", seq=2)]
    # a may run one at a time: its second build is passed over for b's
    picked = q.pick(entries, 2, limits(a=1))  # type: ignore[arg-type]
    assert [e.job_id for e in picked] == ["a1", "b1"]
    # globally one at a time: only the oldest
    assert [e.job_id for e in q.pick(entries, 1, limits())] == ["a1"]  # type: ignore[arg-type]
    # nothing starts while the limit is taken by running builds
    running = [entry("r", "a", running=True), entry("r2", "b", running=True), *entries]
    assert q.pick(running, 2, limits()) == []  # type: ignore[arg-type]


def test_priorities_then_fair_share_then_arrival() -> None:
    entries = [
        entry("ci", None, Priority.CI, seq=0),
        entry("warm", None, Priority.PREWARM, seq=1),
        entry("conn", None, Priority.INTERACTIVE, seq=2),
    ]
    assert [e.job_id for e in q.order(entries)] == ["conn", "warm", "ci"]
    # same priority: the team running fewer builds goes first, whatever arrived first
    fair = [entry("busy", "a", running=True), entry("a2", "a", seq=1), entry("b1", "b", seq=5)]
    assert [e.job_id for e in q.order(fair)] == ["b1", "a2"]
    assert q.positions(fair) == {"b1": 0, "a2": 1}
    # a build that ran when the proxy was killed goes before everything
    conn = entry("conn", None, Priority.INTERACTIVE, seq=0)
    back = [conn, entry("cut", None, seq=9, resumed=True)]
    assert [e.job_id for e in q.order(back)] == ["cut", "conn"]


def test_messages() -> None:
    assert q.queued_message(2, "x") == "queued: 2 builds ahead; x"
    assert q.queued_message(1, "x") == "queued: 1 build ahead; x"
    assert q.priority_of(0) is Priority.INTERACTIVE and q.priority_of(7) is Priority.PREWARM


def config(concurrency: int = 4, **team_builds: int) -> Config:
    teams = {t: {"members": [f"u-{t}"], "quotas": {"builds": n}} for t, n in team_builds.items()}
    return Config.model_validate({"builds": {"concurrency": concurrency}, "teams": teams})


async def _hold(queue: BuildQueue, e: Entry, release: asyncio.Event, log: list[str],
                notices: list[str] | None = None) -> None:  # fmt: skip
    async with queue.slot(e, notices.append if notices is not None else None):
        log.append(f"start {e.job_id}")
        await release.wait()
        log.append(f"end {e.job_id}")


def test_gate_serialises_a_team_and_tells_positions() -> None:
    async def main() -> None:
        queue = BuildQueue(lambda: config(4, a=1))
        log: list[str] = []
        go = {j: asyncio.Event() for j in ("a1", "a2", "a3", "b1")}
        notices: dict[str, list[str]] = {j: [] for j in go}
        tasks = []
        for job, team in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
            e = queue.enqueue(job, "shop", None, Requester(team))
            tasks.append(asyncio.create_task(_hold(queue, e, go[job], log, notices[job])))
        await asyncio.sleep(0.01)
        assert log == ["start a1", "start b1"]
        assert queue.running_by_team() == {"a": 1, "b": 1}
        assert notices["a2"] == ['queued: 0 builds ahead; team "a" runs 1 of its 1 builds at once']
        assert notices["a3"][0].startswith("queued: 1 build ahead")
        assert notices["a1"] == notices["b1"] == []
        view = queue.view("a3")
        assert view is not None and view["state"] == "queued" and view["position"] == 1
        go["a1"].set()
        await asyncio.sleep(0.01)
        assert log[-2:] == ["end a1", "start a2"]
        # a3's new position (0) comes at most once a second: not yet, then on time
        assert len(notices["a3"]) == 1
        await asyncio.sleep(q.NOTICE_INTERVAL + 0.1)
        assert notices["a3"][-1].startswith("queued: 0 builds ahead")
        for ev in go.values():
            ev.set()
        await asyncio.gather(*tasks)
        assert queue.entries == {} and queue.running_by_team() == {}

    asyncio.run(main())


def test_cancelled_waiter_frees_its_place_and_promotion_overtakes() -> None:
    async def main() -> None:
        queue = BuildQueue(lambda: config(1))
        log: list[str] = []
        go = {j: asyncio.Event() for j in ("run", "warm", "ci", "gone")}
        order = [("run", Priority.PREWARM), ("warm", Priority.PREWARM), ("ci", Priority.CI),
                 ("gone", Priority.PREWARM)]  # fmt: skip
        tasks = {}
        for job, prio in order:
            e = queue.enqueue(job, "shop", None, Requester(None, prio))
            tasks[job] = asyncio.create_task(_hold(queue, e, go[job], log))
        await asyncio.sleep(0.01)
        assert q.positions(queue.entries.values()) == {"warm": 0, "gone": 1, "ci": 2}
        tasks["gone"].cancel()
        await asyncio.sleep(0.01)
        assert "gone" not in queue.entries
        queue.promote("ci", Priority.INTERACTIVE)  # a connection now waits for the ci build
        assert q.positions(queue.entries.values()) == {"ci": 0, "warm": 1}
        for job in ("run", "ci", "warm"):
            go[job].set()
            await asyncio.sleep(0.01)
        assert [x for x in log if x.startswith("start")] == ["start run", "start ci", "start warm"]
        await asyncio.gather(tasks["run"], tasks["ci"], tasks["warm"])
        with pytest.raises(asyncio.CancelledError):
            await tasks["gone"]

    asyncio.run(main())


def test_a_full_team_queue_refuses_exactly_past_its_quota() -> None:
    async def main() -> None:
        cfg = Config.model_validate(
            {"builds": {"concurrency": 4},
             "teams": {"a": {"members": ["u"], "quotas": {"builds": 1, "queued": 2}}}}
        )  # fmt: skip
        queue = BuildQueue(lambda: cfg)
        refused: list[tuple[str | None, str]] = []
        queue.on_refused = lambda team, quota: refused.append((team, quota))
        entries = []
        for i in range(3):  # one runs, two wait
            entries.append(queue.enqueue(f"j{i}", "shop", None, Requester("a")))
        with pytest.raises(q.QueueFull) as e:
            queue.enqueue("j3", "shop", None, Requester("a"))
        assert e.value.sqlstate == "53300"
        assert e.value.message == 'quota exceeded: queued builds for team "a": 2 waiting, limit 2'
        assert "j3" not in queue.entries and refused == [("a", "queued")]
        # another team, and a build resumed after a restart, are not held to it
        queue.enqueue("other", "shop", None, Requester("b"))
        queue.enqueue("back", "shop", None, Requester("a"), resumed=True)
        for job in [*queue.entries]:
            queue.discard(job)
        assert queue.entries == {}

    asyncio.run(main())


def test_raising_the_limit_starts_waiting_builds_at_a_kick() -> None:
    async def main() -> None:
        cfg = [config(1)]
        queue = BuildQueue(lambda: cfg[0])
        log: list[str] = []
        go = asyncio.Event()
        tasks = [
            asyncio.create_task(_hold(queue, queue.enqueue(j, "s", None, Requester()), go, log))
            for j in ("x", "y")
        ]
        await asyncio.sleep(0.01)
        assert log == ["start x"]
        cfg[0] = config(2)  # a reload
        queue.kick()
        await asyncio.sleep(0.01)
        assert log == ["start x", "start y"]
        go.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
