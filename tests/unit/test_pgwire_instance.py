"""Unit tests for the proxy-to-instance startup machine."""

from __future__ import annotations

import struct

import pytest

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.instance import (
    TRANSITIONS,
    InstanceAuthOk,
    InstanceBackendKey,
    InstanceError,
    InstanceNotice,
    InstanceParameterStatus,
    InstanceReady,
    InstanceStartup,
    InstanceState,
)

pytestmark = pytest.mark.unit

PARAMS = {"user": "app", "database": "shop", "application_name": "t"}
HAPPY = (
    m.authentication_ok()
    + m.parameter_status("server_version", "15.18")
    + m.notice_response("hello")
    + m.backend_key_data(4242, b"\x00\x01\x02\x03")
    + m.ready_for_query(b"I")
)


def drain(inst: InstanceStartup) -> list[object]:
    out: list[object] = []
    while (event := inst.next_event()) is not None:
        out.append(event)
    return out


def expect_error(inst: InstanceStartup, text: str) -> None:
    with pytest.raises(RemoteProtocolError, match=text) as info:
        drain(inst)
    assert info.value.sqlstate == "08P01"
    assert inst.state is InstanceState.ERROR
    with pytest.raises(RemoteProtocolError, match=text):
        inst.next_event()
    with pytest.raises(RemoteProtocolError, match=text):
        inst.receive_data(b"x")
    with pytest.raises(RemoteProtocolError, match=text):
        inst.take_remaining()


def test_initial_bytes_is_startup_message() -> None:
    assert InstanceStartup(PARAMS).initial_bytes() == m.startup_message(PARAMS)


def test_protocol_options_are_not_forwarded() -> None:
    with pytest.raises(LocalProtocolError):
        InstanceStartup({"user": "a", "_pq_.x": "1"})


def test_happy_path_and_remaining() -> None:
    inst = InstanceStartup(PARAMS)
    inst.receive_data(HAPPY + b"T\x00\x00")
    events = drain(inst)
    assert events == [
        InstanceAuthOk(),
        InstanceParameterStatus(
            "server_version", "15.18", m.parameter_status("server_version", "15.18")
        ),
        InstanceNotice(
            m.notice_response("hello"), m.parse_error_fields(m.notice_response("hello")[5:])
        ),
        InstanceBackendKey(4242, b"\x00\x01\x02\x03"),
        InstanceReady(b"I", m.ready_for_query(b"I")),
    ]
    assert "\\x00\\x01" not in repr(events[3])
    assert inst.state is InstanceState.READY
    inst.receive_data(b"more")
    assert inst.next_event() is None
    assert inst.take_remaining() == b"T\x00\x00more"


def test_byte_at_a_time() -> None:
    inst = InstanceStartup(PARAMS)
    events: list[object] = []
    for b in HAPPY:
        inst.receive_data(bytes([b]))
        events.extend(drain(inst))
    assert len(events) == 5 and isinstance(events[-1], InstanceReady)


def test_notice_before_auth_ok() -> None:
    inst = InstanceStartup(PARAMS)
    inst.receive_data(m.notice_response("early") + m.authentication_ok())
    events = drain(inst)
    assert isinstance(events[0], InstanceNotice)
    assert events[1] == InstanceAuthOk()


@pytest.mark.parametrize("before_auth", [True, False])
def test_error_response_then_nothing(before_auth: bool) -> None:
    err = m.error_response("3D000", 'database "x" does not exist')
    inst = InstanceStartup(PARAMS)
    inst.receive_data(err if before_auth else m.authentication_ok() + err)
    events = drain(inst)
    assert events[-1] == InstanceError(fields=m.parse_error_fields(err[5:]), raw=err)
    assert inst.state is InstanceState.FAILED
    with pytest.raises(LocalProtocolError):
        inst.take_remaining()
    inst.receive_data(m.ready_for_query())
    expect_error(inst, "after a startup ErrorResponse")


@pytest.mark.parametrize(
    ("code", "name"),
    [(3, "cleartext password"), (5, "MD5 password"), (10, "SASL"), (7, "GSSAPI"), (99, "unknown")],
)
def test_auth_requests_other_than_ok_are_refused(code: int, name: str) -> None:
    inst = InstanceStartup(PARAMS)
    inst.receive_data(b"R" + struct.pack("!ii", 8, code))
    expect_error(inst, f"instance requested {name} authentication \\(code {code}\\)")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (m.parameter_status("a", "b"), "unexpected message type b'S' in state AWAITING_AUTH"),
        (m.ready_for_query(), "unexpected message type b'Z'"),
        (m.negotiate_protocol_version(0, []), "unexpected message type b'v'"),
        (m.authentication_ok() * 2, "unexpected message type b'R' in state AUTHENTICATED"),
        (m.authentication_ok() + b"D\x00\x00\x00\x04", "unexpected message type b'D'"),
        (b"R\x00\x00\x00\x0c\x00\x00\x00\x00xxxx", "trailing"),
        (b"R\x00\x00\x00\x06\x00\x00", "truncated"),
        (m.authentication_ok() + b"S\x00\x00\x00\x06a\x00", "unterminated"),
        (m.authentication_ok() + b"S\x00\x00\x00\x09a\x00b\x00x", "trailing"),
        (m.authentication_ok() + b"K\x00\x00\x00\x0a\x00\x00\x00\x01ab", "truncated"),
        (m.authentication_ok() + b"K\x00\x00\x00\x0d\x00\x00\x00\x01abcde", "trailing"),
        (m.authentication_ok() + b"Z\x00\x00\x00\x05X", "invalid ReadyForQuery"),
        (m.authentication_ok() + b"Z\x00\x00\x00\x04", "invalid ReadyForQuery"),
        (m.authentication_ok() + b"N\x00\x00\x00\x06M\x00", "truncated"),
        (b"R\x00\x00\x00\x03", "invalid message: invalid message length"),
        (b"E\x00\x01\x00\x05", "too long"),
    ],
)
def test_violations(data: bytes, text: str) -> None:
    inst = InstanceStartup(PARAMS)
    inst.receive_data(data)
    expect_error(inst, text)


def test_take_remaining_before_ready_is_local_error() -> None:
    inst = InstanceStartup(PARAMS)
    with pytest.raises(LocalProtocolError):
        inst.take_remaining()


def test_transition_table_covers_states() -> None:
    sources = {s for s, _ in TRANSITIONS}
    assert sources == {InstanceState.AWAITING_AUTH, InstanceState.AUTHENTICATED}
    assert set(TRANSITIONS.values()) == {
        InstanceState.AWAITING_AUTH,
        InstanceState.AUTHENTICATED,
        InstanceState.FAILED,
        InstanceState.READY,
    }
