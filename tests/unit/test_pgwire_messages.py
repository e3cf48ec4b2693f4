"""Unit tests for pgwire message builders, ErrorResponse parsing and the framer."""

from __future__ import annotations

import struct

import pytest

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError

pytestmark = pytest.mark.unit


def split(msg: bytes) -> tuple[bytes, bytes]:
    kind, length = struct.unpack("!ci", msg[:5])
    assert length == len(msg) - 1
    return kind, msg[5:]


def test_error_response_fields_in_order() -> None:
    msg = m.error_response(
        "3D000", 'database "x" does not exist', detail="d", hint="h", extra={"W": "where"}
    )
    kind, body = split(msg)
    assert kind == b"E"
    assert body == (
        b'SFATAL\x00VFATAL\x00C3D000\x00Mdatabase "x" does not exist\x00Dd\x00Hh\x00Wwhere\x00\x00'
    )
    assert m.parse_error_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "3D000",
        "M": 'database "x" does not exist',
        "D": "d",
        "H": "h",
        "W": "where",
    }


def test_error_response_omits_absent_fields_and_encodes_utf8() -> None:
    _, body = split(m.error_response("08P01", "größe", severity="ERROR"))
    assert body == "SERROR\x00VERROR\x00C08P01\x00Mgröße\x00\x00".encode()


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"sqlstate": "123", "message": "x"}, "SQLSTATE"),
        ({"sqlstate": "08P01", "message": "a\x00b"}, "NUL"),
        ({"sqlstate": "08P01", "message": "x", "extra": {"M": "dup"}}, "duplicate"),
        ({"sqlstate": "08P01", "message": "x", "extra": {"WW": "long"}}, "invalid"),
    ],
)
def test_error_response_rejects_our_mistakes(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(LocalProtocolError, match=text):
        m.error_response(**kwargs)  # type: ignore[arg-type]


def test_notice_response() -> None:
    kind, body = split(m.notice_response("applying changeset 7/42", detail="shop"))
    assert kind == b"N"
    assert m.parse_error_fields(body) == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "00000",
        "M": "applying changeset 7/42",
        "D": "shop",
    }


def test_authentication_messages() -> None:
    assert m.authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.authentication_cleartext_password() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert m.authentication_sasl(["SCRAM-SHA-256"]) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert m.authentication_sasl_continue(b"r=abc") == b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc"
    assert m.authentication_sasl_final(b"v=x") == b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x"
    with pytest.raises(LocalProtocolError):
        m.authentication_sasl([])
    with pytest.raises(LocalProtocolError):
        m.authentication_sasl([""])


def test_negotiate_protocol_version() -> None:
    msg = m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"])
    kind, body = split(msg)
    assert kind == b"v"
    assert body == b"\x00\x00\x00\x00\x00\x00\x00\x02_pq_.a\x00_pq_.b\x00"
    assert split(m.negotiate_protocol_version(0, []))[1] == bytes(8)


def test_backend_key_parameter_status_ready() -> None:
    assert m.backend_key_data(42, b"\x01\x02\x03\x04") == (
        b"K\x00\x00\x00\x0c\x00\x00\x00\x2a\x01\x02\x03\x04"
    )
    with pytest.raises(LocalProtocolError):
        m.backend_key_data(1, b"abc")
    assert m.parameter_status("TimeZone", "UTC") == b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"
    assert m.ready_for_query(b"I") == b"Z\x00\x00\x00\x05I"
    assert m.ready_for_query(b"T")[-1:] == b"T"
    with pytest.raises(LocalProtocolError):
        m.ready_for_query(b"X")


def test_startup_message_layout() -> None:
    msg = m.startup_message({"user": "app", "database": "shop"})
    body = b"\x00\x03\x00\x00user\x00app\x00database\x00shop\x00\x00"
    assert msg == struct.pack("!i", len(body) + 4) + body
    assert m.startup_message({"user": "a"}, version=(3, 2))[4:8] == b"\x00\x03\x00\x02"
    with pytest.raises(LocalProtocolError):
        m.startup_message({"": "x"})
    with pytest.raises(LocalProtocolError):
        m.startup_message({"user": "a\x00b"})


def test_frontend_requests() -> None:
    assert m.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert m.cancel_request(7, b"abcd") == (b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07abcd")
    assert m.terminate() == b"X\x00\x00\x00\x04"
    assert m.query("select 1") == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert m.password_message("pw") == b"p\x00\x00\x00\x07pw\x00"
    assert m.sasl_initial_response("M", b"xy") == b"p\x00\x00\x00\x0cM\x00\x00\x00\x00\x02xy"
    assert m.sasl_response(b"c=1") == b"p\x00\x00\x00\x07c=1"


@pytest.mark.parametrize(
    "body",
    [b"", b"SFATAL\x00", b"SFATAL", b"SFATAL\x00\x00extra", b"M"],
)
def test_parse_error_fields_rejects_malformed(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.parse_error_fields(body)
    assert info.value.sqlstate == "08P01"


def test_parse_error_fields_is_lenient_about_encoding() -> None:
    assert m.parse_error_fields(b"M\xff\x00\x00") == {"M": "\ufffd"}


def test_framer_yields_messages_from_chunks() -> None:
    stream = m.parameter_status("a", "b") + m.ready_for_query() + m.terminate()
    framer = m.MessageFramer(max_length=100)
    out = []
    for byte in stream:
        framer.receive_data(bytes([byte]))
        while (msg := framer.next_message()) is not None:
            out.append(msg)
    assert out == [(b"S", b"a\x00b\x00"), (b"Z", b"I"), (b"X", b"")]
    assert framer.buffered == 0


def test_framer_take_remaining_returns_unframed_tail() -> None:
    framer = m.MessageFramer(max_length=100)
    framer.receive_data(m.ready_for_query() + b"Q\x00\x00")
    assert framer.next_message() == (b"Z", b"I")
    assert framer.next_message() is None
    assert framer.take_remaining() == b"Q\x00\x00"
    assert framer.buffered == 0


def test_framer_rejects_too_long_from_header_alone() -> None:
    framer = m.MessageFramer(max_length=10)
    framer.receive_data(b"Q\x00\x00\x00\x0f")  # body 11 bytes, none of it sent
    with pytest.raises(RemoteProtocolError, match="too long"):
        framer.next_message()
    with pytest.raises(RemoteProtocolError, match="too long"):
        framer.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match="too long"):
        framer.next_message()


def test_framer_accepts_exactly_max_length() -> None:
    framer = m.MessageFramer(max_length=3)
    framer.receive_data(b"Q\x00\x00\x00\x07abc")
    assert framer.next_message() == (b"Q", b"abc")


@pytest.mark.parametrize("length", [0, 3, -1])
def test_framer_rejects_short_length(length: int) -> None:
    framer = m.MessageFramer(max_length=10)
    framer.receive_data(b"Q" + struct.pack("!i", length))
    with pytest.raises(RemoteProtocolError, match="invalid message length"):
        framer.next_message()


def test_framer_compacts_its_buffer() -> None:
    framer = m.MessageFramer(max_length=10)
    for _ in range(1000):
        framer.receive_data(m.ready_for_query())
        assert framer.next_message() == (b"Z", b"I")
    assert len(framer._buf) < 20
