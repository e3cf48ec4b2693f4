"""The sans-IO boundary tracker: finds the commit after each databasechangelog insert."""

from __future__ import annotations

import struct

import pytest

from taidon_proxy.prepare.liquibase.wire import SSL_REQUEST, BoundaryTracker, WireError

pytestmark = pytest.mark.unit


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def startup() -> bytes:
    body = struct.pack("!i", 196608) + b"user\x00postgres\x00\x00"
    return struct.pack("!i", len(body) + 4) + body


def parse(sql: str) -> bytes:
    return msg(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")


def rfq(status: bytes) -> bytes:
    return msg(b"Z", status)


INSERT = (
    "INSERT INTO public.databasechangelog (ID, AUTHOR, FILENAME, DATEEXECUTED, ORDEREXECUTED,"
    " MD5SUM) VALUES ('1', 'ann', 'db/master.xml', NOW(), 1, '9:abc')"
)


def test_boundary_is_the_idle_ready_after_the_insert() -> None:
    t = BoundaryTracker()
    assert t.feed_client(startup()).forward == startup()
    t.feed_client(parse("create table item (id int)") + msg(b"S", b""))
    assert not t.feed_server(rfq(b"T"))
    t.feed_client(parse(INSERT) + msg(b"S", b""))
    assert not t.feed_server(rfq(b"T"))  # still inside the changeset's transaction
    t.feed_client(parse("COMMIT") + msg(b"S", b""))
    assert t.feed_server(msg(b"C", b"COMMIT\x00") + rfq(b"I"))
    assert t.boundaries == 1
    assert not t.feed_server(rfq(b"I"))  # one boundary per insert


def test_lock_table_and_failed_insert_are_not_boundaries() -> None:
    t = BoundaryTracker()
    t.feed_client(startup())
    t.feed_client(parse("UPDATE public.databasechangeloglock SET LOCKED = TRUE WHERE ID = 1"))
    t.feed_client(parse("INSERT INTO public.databasechangeloglock (ID, LOCKED) VALUES (1, FALSE)"))
    assert not t.feed_server(rfq(b"I"))
    t.feed_client(parse(INSERT))
    assert not t.feed_server(msg(b"E", b"SERROR\x00\x00") + rfq(b"I"))
    assert t.boundaries == 0


def test_simple_query_and_quoted_names_count() -> None:
    t = BoundaryTracker()
    t.feed_client(startup())
    t.feed_client(msg(b"Q", b'  insert into "public"."databasechangelog" (id) values (1)\x00'))
    assert t.feed_server(rfq(b"I"))


def test_byte_by_byte_is_the_same_as_whole() -> None:
    stream_c = startup() + parse(INSERT) + msg(b"S", b"") + parse("COMMIT") + msg(b"S", b"")
    t = BoundaryTracker()
    forwarded = b"".join(t.feed_client(bytes([b])).forward for b in stream_c)
    assert forwarded == stream_c
    server = msg(b"1", b"") + rfq(b"T") + msg(b"C", b"COMMIT\x00") + rfq(b"I")
    hits = [t.feed_server(bytes([b])) for b in server]
    assert hits.count(True) == 1 and hits[-1]


def test_ssl_request_is_refused_by_the_relay_not_forwarded() -> None:
    t = BoundaryTracker()
    ssl = struct.pack("!ii", 8, SSL_REQUEST)
    chunk = t.feed_client(ssl[:3])
    assert chunk.forward == b"" and chunk.reply == b""
    chunk = t.feed_client(ssl[3:])
    assert chunk.forward == b"" and chunk.reply == b"N"
    assert t.feed_client(startup()).forward == startup()


def test_long_messages_stream_through_with_a_bounded_head() -> None:
    t = BoundaryTracker()
    t.feed_client(startup())
    big = parse("insert into item values ('" + "x" * 2_000_000 + "')")
    assert t.feed_client(big).forward == big
    t.feed_client(parse(INSERT))
    assert t.feed_server(rfq(b"I"))


def test_a_bad_length_is_a_wire_error() -> None:
    t = BoundaryTracker()
    t.feed_client(startup())
    with pytest.raises(WireError):
        t.feed_client(b"P" + struct.pack("!i", 2))
    with pytest.raises(WireError):
        BoundaryTracker().feed_server(b"Z" + struct.pack("!i", -5))
