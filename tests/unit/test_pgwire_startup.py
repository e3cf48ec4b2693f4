"""Unit tests for the server-side startup state machine: every transition and error path."""

from __future__ import annotations

import struct

import pytest

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.startup import TRANSITIONS, FrontendStartup, StartupState, Trigger
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)

pytestmark = pytest.mark.unit

STARTUP = m.startup_message({"user": "app", "database": "shop"})


def machine(tls: bool = False, **kwargs: int) -> FrontendStartup:
    return FrontendStartup(tls_available=tls, **kwargs)


def fed(data: bytes, *, tls: bool = False) -> FrontendStartup:
    fs = machine(tls)
    fs.receive_data(data)
    return fs


def expect_error(fs: FrontendStartup, text: str, sqlstate: str = "08P01") -> None:
    with pytest.raises(RemoteProtocolError, match=text) as info:
        fs.next_event()
    assert info.value.sqlstate == sqlstate
    assert fs.state is StartupState.ERROR
    # Every later call raises the same error.
    with pytest.raises(RemoteProtocolError, match=text):
        fs.next_event()
    with pytest.raises(RemoteProtocolError, match=text):
        fs.receive_data(b"x")


def raw_packet(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(payload), code) + payload


def test_plain_startup_then_trust_auth() -> None:
    fs = fed(STARTUP + b"Q\x00\x00\x00\x05x\x00")
    event = fs.next_event()
    assert event == StartupReceived(
        major=3,
        minor=0,
        params={"user": "app", "database": "shop"},
        protocol_options={},
        needs_negotiation=False,
    )
    assert fs.state is StartupState.AUTHENTICATING
    assert fs.next_event() is None
    fs.auth_done()
    assert fs.state is StartupState.DONE
    assert fs.next_event() is None
    fs.receive_data(b"more")
    assert fs.take_remaining() == b"Q\x00\x00\x00\x05x\x00more"
    assert fs.take_remaining() == b""


def test_incomplete_packet_waits() -> None:
    fs = machine()
    for i in range(len(STARTUP) - 1):
        fs.receive_data(STARTUP[i : i + 1])
        assert fs.next_event() is None
    fs.receive_data(STARTUP[-1:])
    assert isinstance(fs.next_event(), StartupReceived)


def test_ssl_refused_then_startup() -> None:
    fs = fed(m.ssl_request())
    assert fs.next_event() == SSLRequested()
    assert fs.state is StartupState.SSL_REQUESTED
    assert fs.next_event() is None  # paused until the shell answers
    assert fs.answer_ssl(False) == b"N"
    assert fs.state is StartupState.SSL_REFUSED
    fs.receive_data(STARTUP)
    assert isinstance(fs.next_event(), StartupReceived)
    assert not fs.tls


def test_ssl_refused_with_pipelined_startup_is_allowed() -> None:
    fs = fed(m.ssl_request() + STARTUP)
    assert fs.next_event() == SSLRequested()
    assert fs.answer_ssl(False) == b"N"
    assert isinstance(fs.next_event(), StartupReceived)


def test_ssl_accepted_then_tls_then_startup() -> None:
    fs = fed(m.ssl_request(), tls=True)
    assert fs.next_event() == SSLRequested()
    assert fs.answer_ssl(True) == b"S"
    assert fs.state is StartupState.AWAITING_TLS
    assert fs.next_event() is None
    fs.tls_established()
    assert fs.tls
    assert fs.state is StartupState.AWAITING_STARTUP
    fs.receive_data(STARTUP)
    assert isinstance(fs.next_event(), StartupReceived)


def test_ssl_accept_without_tls_is_our_bug() -> None:
    fs = fed(m.ssl_request(), tls=False)
    fs.next_event()
    with pytest.raises(LocalProtocolError, match="no TLS"):
        fs.answer_ssl(True)


def test_data_buffered_before_ssl_accept_is_fatal() -> None:
    fs = fed(m.ssl_request() + STARTUP, tls=True)
    assert fs.next_event() == SSLRequested()
    with pytest.raises(RemoteProtocolError, match="unencrypted data after SSL request"):
        fs.answer_ssl(True)
    assert fs.state is StartupState.ERROR
    with pytest.raises(RemoteProtocolError):
        fs.tls_established()


def test_data_received_while_awaiting_tls_is_fatal() -> None:
    fs = fed(m.ssl_request(), tls=True)
    fs.next_event()
    fs.answer_ssl(True)
    with pytest.raises(RemoteProtocolError, match="unencrypted data after SSL request"):
        fs.receive_data(b"\x16")
    assert fs.state is StartupState.ERROR


def test_empty_receive_is_a_no_op_even_awaiting_tls() -> None:
    fs = fed(m.ssl_request(), tls=True)
    fs.next_event()
    fs.answer_ssl(True)
    fs.receive_data(b"")
    fs.tls_established()


@pytest.mark.parametrize("accept", [False, True])
def test_second_ssl_request_is_fatal(accept: bool) -> None:
    fs = fed(m.ssl_request(), tls=True)
    fs.next_event()
    fs.answer_ssl(accept)
    if accept:
        fs.tls_established()
    fs.receive_data(m.ssl_request())
    expect_error(fs, "unexpected SSLRequest")


def test_gssenc_refused_then_ssl_then_startup() -> None:
    fs = fed(m.gssenc_request())
    assert fs.next_event() == GSSENCRequested()
    assert fs.state is StartupState.GSSENC_REQUESTED
    assert fs.answer_gssenc() == b"N"
    assert fs.state is StartupState.GSSENC_REFUSED
    fs.receive_data(m.ssl_request())
    assert fs.next_event() == SSLRequested()
    assert fs.state is StartupState.SSL_REQUESTED_LAST
    assert fs.answer_ssl(False) == b"N"
    assert fs.state is StartupState.AWAITING_STARTUP
    fs.receive_data(m.gssenc_request())
    expect_error(fs, "unexpected GSSENCRequest")


def test_ssl_refused_then_gssenc_refused_then_startup() -> None:
    fs = fed(m.ssl_request())
    fs.next_event()
    fs.answer_ssl(False)
    fs.receive_data(m.gssenc_request())
    assert fs.next_event() == GSSENCRequested()
    assert fs.state is StartupState.GSSENC_REQUESTED_LAST
    fs.answer_gssenc()
    assert fs.state is StartupState.AWAITING_STARTUP
    fs.receive_data(STARTUP)
    assert isinstance(fs.next_event(), StartupReceived)


def test_gssenc_refused_then_ssl_accepted() -> None:
    fs = fed(m.gssenc_request(), tls=True)
    fs.next_event()
    fs.answer_gssenc()
    fs.receive_data(m.ssl_request())
    fs.next_event()
    assert fs.answer_ssl(True) == b"S"
    fs.tls_established()
    fs.receive_data(STARTUP)
    assert isinstance(fs.next_event(), StartupReceived)


def test_gssenc_after_tls_is_fatal() -> None:
    fs = fed(m.ssl_request(), tls=True)
    fs.next_event()
    fs.answer_ssl(True)
    fs.tls_established()
    fs.receive_data(m.gssenc_request())
    expect_error(fs, "unexpected GSSENCRequest")


def test_second_gssenc_is_fatal() -> None:
    fs = fed(m.gssenc_request())
    fs.next_event()
    fs.answer_gssenc()
    fs.receive_data(m.gssenc_request())
    expect_error(fs, "unexpected GSSENCRequest")


@pytest.mark.parametrize("request_bytes", [m.ssl_request(), m.gssenc_request()])
def test_negotiation_request_with_payload_is_fatal(request_bytes: bytes) -> None:
    code = request_bytes[4:8]
    fs = fed(struct.pack("!i", 12) + code + b"xxxx")
    expect_error(fs, "invalid length of")


def test_cancel_request() -> None:
    fs = fed(m.cancel_request(1234, b"\x00\x01\x02\x03"))
    assert fs.next_event() == CancelRequested(pid=1234, secret=b"\x00\x01\x02\x03")
    assert fs.state is StartupState.CANCELLED
    assert fs.next_event() is None


def test_cancel_after_tls_is_allowed() -> None:
    fs = fed(m.ssl_request(), tls=True)
    fs.next_event()
    fs.answer_ssl(True)
    fs.tls_established()
    fs.receive_data(m.cancel_request(5, b"abcd"))
    assert fs.next_event() == CancelRequested(pid=5, secret=b"abcd")


def test_anything_after_cancel_is_fatal() -> None:
    fs = fed(m.cancel_request(1, b"abcd") + b"x")
    assert isinstance(fs.next_event(), CancelRequested)
    expect_error(fs, "after CancelRequest")
    fs2 = fed(m.cancel_request(1, b"abcd"))
    fs2.next_event()
    with pytest.raises(RemoteProtocolError, match="after CancelRequest"):
        fs2.receive_data(STARTUP)


def test_cancel_request_wrong_length_is_fatal() -> None:
    fs = fed(raw_packet(m.CANCEL_REQUEST_CODE, b"\x00\x00\x00\x01abcdefgh"))
    expect_error(fs, "invalid length of cancel request packet")


def test_direct_tls_byte_is_a_clear_error() -> None:
    fs = fed(b"\x16")
    expect_error(fs, "TLS handshake without SSLRequest")


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 0x7FFFFFFF, -8])
def test_startup_length_bounds(length: int) -> None:
    fs = fed(struct.pack("!i", length))
    expect_error(fs, "invalid length of startup packet")


def test_custom_max_startup_length() -> None:
    fs = machine(max_startup_length=len(STARTUP) - 1)
    fs.receive_data(STARTUP[:4])
    expect_error(fs, "invalid length of startup packet")


@pytest.mark.parametrize(
    ("version", "shown"),
    [((2, 0), "2.0"), ((4, 0), "4.0"), ((1234, 5681), "1234.5681"), ((0, 0), "0.0")],
)
def test_unsupported_protocol(version: tuple[int, int], shown: str) -> None:
    fs = fed(m.startup_message({"user": "a"}, version=version))
    expect_error(fs, f"unsupported frontend protocol {shown}: server supports 3.0", "0A000")


def test_newer_minor_needs_negotiation() -> None:
    fs = fed(m.startup_message({"user": "a", "_pq_.x": "1", "_pq_.y": "2"}, version=(3, 2)))
    event = fs.next_event()
    assert isinstance(event, StartupReceived)
    assert (event.major, event.minor) == (3, 2)
    assert event.params == {"user": "a"}
    assert event.protocol_options == {"_pq_.x": "1", "_pq_.y": "2"}
    assert event.needs_negotiation


def test_protocol_options_alone_need_negotiation() -> None:
    fs = fed(m.startup_message({"user": "a", "_pq_.x": "1"}))
    event = fs.next_event()
    assert isinstance(event, StartupReceived)
    assert event.needs_negotiation


def test_repeated_parameter_last_wins() -> None:
    body = b"\x00\x03\x00\x00user\x00a\x00user\x00b\x00\x00"
    fs = fed(struct.pack("!i", len(body) + 4) + body)
    event = fs.next_event()
    assert isinstance(event, StartupReceived)
    assert event.params == {"user": "b"}


@pytest.mark.parametrize(
    "params",
    [{"database": "x"}, {"user": ""}, {}],
)
def test_user_is_required(params: dict[str, str]) -> None:
    fs = fed(m.startup_message(params))
    expect_error(fs, "no PostgreSQL user name specified in startup packet", "28000")


@pytest.mark.parametrize(
    "payload",
    [
        b"user\x00a\x00",  # no final terminator
        b"user\x00a",  # unterminated value
        b"user\x00",  # name without value
        b"user\x00a\x00\x00trailing",  # data after the terminator
    ],
)
def test_bad_layout(payload: bytes) -> None:
    fs = fed(raw_packet(3 << 16, payload))
    expect_error(fs, "invalid startup packet layout")


def test_version_only_packet_has_no_user() -> None:
    fs = fed(raw_packet(3 << 16))
    expect_error(fs, "invalid startup packet layout")


@pytest.mark.parametrize("payload", [b"user\x00\xff\x00\x00", b"\xc3\x00a\x00user\x00a\x00\x00"])
def test_parameters_must_be_utf8(payload: bytes) -> None:
    fs = fed(raw_packet(3 << 16, payload))
    expect_error(fs, "not valid UTF-8")


def test_password_exchange() -> None:
    fs = fed(STARTUP)
    fs.next_event()
    with pytest.raises(LocalProtocolError):
        fs.take_remaining()
    fs.expect_password()
    assert fs.state is StartupState.AWAITING_PASSWORD
    assert fs.next_event() is None
    msg = m.password_message("secret")
    fs.receive_data(msg[:3])
    assert fs.next_event() is None
    fs.receive_data(msg[3:])
    event = fs.next_event()
    assert event == PasswordReceived(payload=b"secret\x00")
    assert "secret" not in repr(event)
    assert fs.state is StartupState.AUTHENTICATING
    fs.expect_password()
    fs.receive_data(m.sasl_response(b"final"))
    assert fs.next_event() == PasswordReceived(payload=b"final")
    fs.auth_done()
    assert fs.take_remaining() == b""


def test_password_wrong_type_is_fatal() -> None:
    fs = fed(STARTUP)
    fs.next_event()
    fs.expect_password()
    fs.receive_data(m.query("select 1"))
    expect_error(fs, "expected password response, got message type b'Q'")


@pytest.mark.parametrize("length", [3, 8192 + 5, 0x7FFFFFFF])
def test_password_length_bounds(length: int) -> None:
    fs = fed(STARTUP)
    fs.next_event()
    fs.expect_password()
    fs.receive_data(b"p" + struct.pack("!i", length))
    expect_error(fs, "invalid length of password packet")


def test_password_max_length_accepted() -> None:
    fs = fed(STARTUP)
    fs.next_event()
    fs.expect_password()
    fs.receive_data(b"p" + struct.pack("!i", 8192 + 4) + b"x" * 8192)
    event = fs.next_event()
    assert isinstance(event, PasswordReceived)
    assert len(event.payload) == 8192


def test_buffer_is_bounded() -> None:
    fs = machine(max_buffer=100)
    fs.receive_data(b"\x00" * 60)
    with pytest.raises(RemoteProtocolError, match="too much data"):
        fs.receive_data(b"\x00" * 41)
    assert fs.state is StartupState.ERROR


@pytest.mark.parametrize(
    ("call", "state_setup"),
    [
        ("answer_ssl_false", "start"),
        ("answer_gssenc", "start"),
        ("tls_established", "start"),
        ("expect_password", "start"),
        ("auth_done", "start"),
        ("answer_gssenc", "ssl_requested"),
        ("answer_ssl_false", "gssenc_requested"),
        ("auth_done", "awaiting_password"),
        ("expect_password", "awaiting_password"),
        ("expect_password", "done"),
        ("auth_done", "done"),
        ("answer_ssl_false", "authenticating"),
    ],
)
def test_shell_calls_in_wrong_state_are_local_errors(call: str, state_setup: str) -> None:
    fs = machine()
    if state_setup == "ssl_requested":
        fs.receive_data(m.ssl_request())
        fs.next_event()
    elif state_setup == "gssenc_requested":
        fs.receive_data(m.gssenc_request())
        fs.next_event()
    elif state_setup in ("authenticating", "awaiting_password", "done"):
        fs.receive_data(STARTUP)
        fs.next_event()
        if state_setup == "awaiting_password":
            fs.expect_password()
        if state_setup == "done":
            fs.auth_done()
    before = fs.state
    actions = {
        "answer_ssl_false": lambda: fs.answer_ssl(False),
        "answer_gssenc": fs.answer_gssenc,
        "tls_established": fs.tls_established,
        "expect_password": fs.expect_password,
        "auth_done": fs.auth_done,
    }
    with pytest.raises(LocalProtocolError):
        actions[call]()
    assert fs.state is before


def test_every_state_except_terminal_ones_has_a_transition() -> None:
    sources = {s for s, _ in TRANSITIONS}
    targets = set(TRANSITIONS.values())
    terminal = {StartupState.DONE, StartupState.CANCELLED, StartupState.ERROR}
    assert sources | terminal == set(StartupState)
    assert targets | {StartupState.START, StartupState.ERROR} == set(StartupState)
    assert {t for _, t in TRANSITIONS} == set(Trigger)


def test_direct_tls_goes_straight_to_the_startup_packet() -> None:
    from taidon_proxy.pgwire import messages
    from taidon_proxy.pgwire.errors import RemoteProtocolError
    from taidon_proxy.pgwire.startup import FrontendStartup, StartupState
    from taidon_proxy.pgwire.startup_events import StartupReceived

    m = FrontendStartup(tls_available=True)
    m.direct_tls_established()
    assert m.tls and m.state is StartupState.AWAITING_STARTUP
    m.receive_data(messages.startup_message({"user": "u", "database": "d"}))
    assert isinstance(m.next_event(), StartupReceived)
    # Inside direct TLS an SSLRequest is a protocol violation, as after an accepted one.
    m2 = FrontendStartup(tls_available=True)
    m2.direct_tls_established()
    m2.receive_data(messages.ssl_request())
    with pytest.raises(RemoteProtocolError):
        m2.next_event()
