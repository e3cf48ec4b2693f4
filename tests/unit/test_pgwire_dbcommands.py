"""CREATE/DROP DATABASE recognition and the maintenance connection's wire filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.instances.virtual import pattern_regex
from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.boundaries import BoundaryTracker
from taidon_proxy.pgwire.dbcommands import CreateDatabase, DropDatabase, recognize
from taidon_proxy.pgwire.maintenance import (
    BIND_COMPLETE,
    NO_DATA,
    NO_PARAMETERS,
    PARSE_COMPLETE,
    Forward,
    MaintenanceFilter,
    Outcome,
    Reply,
    Run,
    WaitServer,
    command_complete,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ('CREATE DATABASE "test_shop" ', CreateDatabase("test_shop")),
        ("create database Test_Shop;", CreateDatabase("test_shop")),
        ('CREATE DATABASE "Test_Shop"', CreateDatabase("Test_Shop")),
        ('CREATE DATABASE "a""b"', CreateDatabase('a"b')),
        ('CREATE DATABASE "test_shop_1" WITH TEMPLATE "test_shop"',
         CreateDatabase("test_shop_1", template="test_shop")),
        ("CREATE DATABASE x TEMPLATE = template0 ENCODING 'UTF8' CONNECTION LIMIT = -1",
         CreateDatabase("x", template="template0",
                        options={"encoding": "UTF8", "connection_limit": "-1"})),
        ("CREATE DATABASE x WITH ENCODING = 'unicode' OWNER app", CreateDatabase(
            "x", options={"encoding": "unicode", "owner": "app"})),
        ("CREATE DATABASE x TEMPLATE DEFAULT", CreateDatabase("x")),
        ("  /* a /* nested */ comment */ CREATE -- line\n DATABASE\tx ; -- done",
         CreateDatabase("x")),
        ("DROP DATABASE test_shop", DropDatabase("test_shop")),
        ('drop database if exists "shop_test";', DropDatabase("shop_test", if_exists=True)),
        ("DROP DATABASE x WITH (FORCE)", DropDatabase("x", force=True)),
        ("DROP DATABASE x (force)", DropDatabase("x", force=True)),
        ("DROP DATABASE if", DropDatabase("if")),
        ("CREATE DATABASE ÄB", CreateDatabase("Äb")),  # only ASCII folds, as the server does
    ],
)  # fmt: skip
def test_recognized(sql: str, expected: object) -> None:
    assert recognize(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "", ";", "SELECT 1", "CREATE DATABASE", "DROP DATABASE", "CREATE TABLE x (a int)",
        "CREATE DATABASE x; SELECT 1", "DROP DATABASE a, b", "CREATE DATABASE x FOO bar",
        "CREATE DATABASE x TEMPLATE", "CREATE DATABASE x TEMPLATE y TEMPLATE z",
        'CREATE DATABASE ""', "CREATE DATABASE /* open", "CREATE DATABASE 'x'",
        "DROP DATABASE x WITH (FORCE", "DROP DATABASE x WITH (SPEED)", "DROP DATABASE x y",
        "CREATE DATABASE " + "a" * 64, 'CREATE DATABASE "unterminated',
        "EXPLAIN CREATE DATABASE x", "CREATE DATABASE x ENCODING 'UTF8", "DROP DATABASE $1",
    ],
)  # fmt: skip
def test_not_recognized(sql: str) -> None:
    assert recognize(sql) is None


def test_patterns_map_names_to_aliases() -> None:
    assert pattern_regex("test_{alias}_{n}", "shop").match("test_shop_12")
    assert not pattern_regex("test_{alias}_{n}", "shop").match("test_shop_")
    assert not pattern_regex("test_{alias}", "s.p").match("test_sxp")  # alias is literal
    assert pattern_regex("{alias}_test-{n}", "shop").match("shop_test-0")


def test_pattern_config_needs_alias() -> None:
    cfg = parse_config("test_databases: ['ci_{alias}']\n", source=Path("/x/t.yaml"))
    assert cfg.test_databases == ["ci_{alias}"]
    with pytest.raises(ConfigError, match="alias"):
        parse_config("test_databases: ['ci_db']\n", source=Path("/x/t.yaml"))


# --- the filter ------------------------------------------------------------------------------


def drain(f: MaintenanceFilter) -> list[object]:
    out: list[object] = []
    while (ev := f.next_event()) is not None and not isinstance(ev, WaitServer | Run):
        out.append(ev)
    if ev is not None:
        out.append(ev)
    return out


def test_simple_query_is_forwarded_unless_ours() -> None:
    f = MaintenanceFilter()
    f.receive_data(m.query("select 1"))
    assert drain(f) == [Forward(m.query("select 1"))]
    # The server still owes the ReadyForQuery of `select 1`: ours waits for it.
    f.receive_data(m.query("CREATE DATABASE test_shop"))
    assert f.next_event() == WaitServer()
    f.server_data(command_complete("SELECT 1")[:3])
    assert f.next_event() == WaitServer()
    f.server_data(command_complete("SELECT 1")[3:] + m.ready_for_query(b"I"))
    ev = f.next_event()
    assert ev == Run(CreateDatabase("test_shop"), simple=True)
    assert isinstance(ev, Run)
    reply = f.reply(ev, Outcome.ok("CREATE DATABASE"))
    assert reply == command_complete("CREATE DATABASE") + m.ready_for_query(b"I")
    err = f.reply(ev, Outcome.error("42P04", 'database "test_shop" already exists'))
    assert err.startswith(b"E") and b"C42P04\x00" in err and b"SERROR\x00" in err
    assert err.endswith(m.ready_for_query(b"I"))


def test_inside_a_transaction_the_server_decides() -> None:
    f = MaintenanceFilter()
    f.receive_data(m.query("BEGIN"))
    assert drain(f) == [Forward(m.query("BEGIN"))]
    f.server_data(command_complete("BEGIN") + m.ready_for_query(b"T"))
    f.receive_data(m.query("CREATE DATABASE test_shop"))
    assert drain(f) == [Forward(m.query("CREATE DATABASE test_shop"))]


def test_server_databases_are_not_ours() -> None:
    f = MaintenanceFilter(ours=lambda c: c.name != "template1")
    f.receive_data(m.query("DROP DATABASE template1"))
    assert drain(f) == [Forward(m.query("DROP DATABASE template1"))]


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def parse(sql: str, name: bytes = b"") -> bytes:
    return _msg(b"P", name + b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")


def bind(stmt: bytes = b"", portal: bytes = b"") -> bytes:
    return _msg(b"B", portal + b"\x00" + stmt + b"\x00" + b"\x00\x00\x00\x00\x00\x00")


def describe(what: bytes, name: bytes = b"") -> bytes:
    return _msg(b"D", what + name + b"\x00")


def execute(portal: bytes = b"") -> bytes:
    return _msg(b"E", portal + b"\x00" + b"\x00\x00\x00\x00")


SYNC = _msg(b"S", b"")


def test_extended_batch_of_ours() -> None:
    f = MaintenanceFilter()
    sql = 'DROP DATABASE IF EXISTS "test_shop"'
    f.receive_data(parse(sql, b"s1") + describe(b"S", b"s1") + SYNC)
    assert drain(f) == [Reply(PARSE_COMPLETE), Reply(NO_PARAMETERS + NO_DATA),
                        Reply(m.ready_for_query(b"I"))]  # fmt: skip
    f.receive_data(bind(b"s1") + execute() + SYNC)
    events = drain(f)
    assert events[0] == Reply(BIND_COMPLETE)
    run = events[1]
    assert run == Run(DropDatabase("test_shop", if_exists=True), simple=False)
    assert isinstance(run, Run)
    assert f.reply(run, Outcome.ok("DROP DATABASE")) == command_complete("DROP DATABASE")
    assert drain(f) == [Reply(m.ready_for_query(b"I"))]


def test_extended_error_skips_to_sync() -> None:
    f = MaintenanceFilter()
    f.receive_data(parse("DROP DATABASE nope") + bind() + describe(b"P") + execute())
    f.receive_data(execute() + SYNC)
    events = drain(f)
    assert events[:3] == [Reply(PARSE_COMPLETE), Reply(BIND_COMPLETE), Reply(NO_DATA)]
    run = events[3]
    assert isinstance(run, Run)
    f.reply(run, Outcome.error("3D000", 'database "nope" does not exist'))
    assert drain(f) == [Reply(m.ready_for_query(b"I"))]  # the second Execute is discarded


def test_mixed_batch_goes_to_the_server() -> None:
    f = MaintenanceFilter()
    f.receive_data(parse("select 1") + parse("CREATE DATABASE test_shop", b"s") + SYNC)
    events = drain(f)
    assert all(isinstance(e, Forward) for e in events) and len(events) == 3


def test_large_messages_stream_through_unread() -> None:
    f = MaintenanceFilter(inspect_limit=16)
    q = m.query("CREATE DATABASE test_shop -- " + "x" * 40)
    f.receive_data(q[:10])
    first = f.next_event()
    assert isinstance(first, Forward)
    f.receive_data(q[10:])
    rest = f.next_event()
    assert isinstance(rest, Forward) and first.data + rest.data == q
    assert not f.server_idle  # a Query: one ReadyForQuery owed


def test_the_server_tracker_counts_ready_across_chunks() -> None:
    stream = command_complete("SELECT 1") + m.ready_for_query(b"T") + m.ready_for_query(b"I")
    for size in range(1, len(stream) + 1):
        t = BoundaryTracker(frozenset(b"Z"))
        for i in range(0, len(stream), size):
            t.feed(stream[i : i + size])
        assert t.counted == 2 and t.ready_status == b"I" and t.at_boundary
