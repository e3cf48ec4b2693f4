"""Hypothesis invariants of the pgwire machines: garbage gives only protocol errors, chunking
never changes the outcome, and builders round-trip through the parsers."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.instance import InstanceReady, InstanceStartup, InstanceState
from taidon_proxy.pgwire.startup import FrontendStartup, StartupState
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)

pytestmark = pytest.mark.property
SETTINGS = settings(deadline=None, max_examples=200)

# --- strategies ------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12).filter(
    lambda s: "\x00" not in s and not s.startswith("_pq_.")
)
values = st.text(max_size=20).filter(lambda s: "\x00" not in s)
param_dicts = st.dictionaries(names, values, max_size=5)


@st.composite
def startup_packets(draw: st.DrawFn) -> bytes:
    params = draw(param_dicts)
    if draw(st.booleans()):
        params["user"] = draw(values)
    if draw(st.booleans()):
        params["_pq_." + draw(names)] = draw(values)
    version = draw(st.sampled_from([(3, 0), (3, 0), (3, 2), (2, 0), (1234, 5681)]))
    return m.startup_message(params, version=version)


def _mutate(data: bytes, pos: int, value: int) -> bytes:
    if not data:
        return data
    pos %= len(data)
    return data[:pos] + bytes([value]) + data[pos + 1 :]


pieces = st.one_of(
    st.just(m.ssl_request()),
    st.just(m.gssenc_request()),
    startup_packets(),
    st.builds(
        m.cancel_request, st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=4)
    ),
    st.builds(m.password_message, values),
    st.builds(m.sasl_response, st.binary(max_size=40)),
    st.builds(m.query, values),
    st.binary(max_size=12),
)


@st.composite
def plausible_client(draw: st.DrawFn) -> bytes:
    """A mostly valid conversation, so the deep states are reached too."""
    parts = []
    if draw(st.booleans()):
        parts.append(m.gssenc_request())
    if draw(st.booleans()):
        parts.append(m.ssl_request())
    params = draw(param_dicts)
    params["user"] = draw(values.filter(bool))
    parts.append(m.startup_message(params, version=(3, draw(st.sampled_from([0, 0, 2])))))
    parts.extend(draw(st.lists(st.builds(m.sasl_response, st.binary(max_size=40)), max_size=3)))
    parts.append(draw(st.binary(max_size=20)))
    return b"".join(parts)


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        data = draw(plausible_client())
    else:
        data = b"".join(draw(st.lists(pieces, max_size=6)))
    if draw(st.integers(0, 3)) == 0:
        data = _mutate(data, draw(st.integers(0, 10_000)), draw(st.integers(0, 255)))
    return data


instance_pieces = st.one_of(
    st.just(m.authentication_ok()),
    st.builds(lambda c: b"R" + struct.pack("!ii", 8, c), st.integers(0, 12)),
    st.builds(m.parameter_status, names, values),
    st.builds(m.backend_key_data, st.integers(0, 2**31 - 1), st.binary(min_size=4, max_size=4)),
    st.builds(m.notice_response, values),
    st.builds(m.error_response, st.just("3D000"), values),
    st.builds(m.ready_for_query, st.sampled_from([b"I", b"T", b"E"])),
    st.binary(max_size=12),
)


@st.composite
def plausible_instance(draw: st.DrawFn) -> bytes:
    notices = st.lists(st.builds(m.notice_response, values), max_size=2)
    parts = [*draw(notices), m.authentication_ok()]
    parts.extend(m.parameter_status(n, v) for n, v in draw(st.lists(st.tuples(names, values))))
    parts.extend(draw(notices))
    parts.append(m.backend_key_data(draw(st.integers(0, 2**31 - 1)), b"abcd"))
    if draw(st.booleans()):
        parts.append(m.error_response("57P03", "the database system is starting up"))
    parts.append(m.ready_for_query(b"I"))
    parts.append(draw(st.binary(max_size=20)))
    return b"".join(parts)


@st.composite
def instance_streams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        data = draw(plausible_instance())
    else:
        data = b"".join(draw(st.lists(instance_pieces, max_size=7)))
    if draw(st.integers(0, 3)) == 0:
        data = _mutate(data, draw(st.integers(0, 10_000)), draw(st.integers(0, 255)))
    return data


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


Outcome = list[object]

# --- drivers --------------------------------------------------------------------------------


def drive_frontend(chunks: list[bytes], *, accept_ssl: bool = False) -> Outcome:
    """Feed chunks, answering every event with a fixed policy; record events and the error."""
    fs = FrontendStartup(tls_available=True)
    out: Outcome = []
    remaining = b""
    passwords = 0
    try:
        for chunk in chunks:
            fs.receive_data(chunk)
            while (event := fs.next_event()) is not None:
                out.append(event)
                if isinstance(event, SSLRequested):
                    fs.answer_ssl(accept_ssl)
                    if accept_ssl:
                        fs.tls_established()
                elif isinstance(event, GSSENCRequested):
                    fs.answer_gssenc()
                elif isinstance(event, StartupReceived):
                    fs.expect_password()
                elif isinstance(event, PasswordReceived):
                    passwords += 1
                    if passwords < 2:
                        fs.expect_password()
                    else:
                        fs.auth_done()
                else:
                    assert isinstance(event, CancelRequested)
            if fs.state is StartupState.DONE:
                remaining += fs.take_remaining()
    except RemoteProtocolError as exc:
        assert fs.state is StartupState.ERROR
        out.append(("error", exc.sqlstate, exc.message))
    out.append(("remaining", remaining))
    return out


def drive_instance(chunks: list[bytes]) -> Outcome:
    inst = InstanceStartup({"user": "app"})
    out: Outcome = []
    remaining = b""
    try:
        for chunk in chunks:
            inst.receive_data(chunk)
            while (event := inst.next_event()) is not None:
                out.append(event)
            if inst.state is InstanceState.READY:
                remaining += inst.take_remaining()
    except RemoteProtocolError as exc:
        out.append(("error", exc.sqlstate, exc.message))
    out.append(("remaining", remaining))
    return out


def drive_framer(chunks: list[bytes]) -> Outcome:
    framer = m.MessageFramer(max_length=64)
    out: Outcome = []
    try:
        for chunk in chunks:
            framer.receive_data(chunk)
            while (msg := framer.next_message()) is not None:
                out.append(msg)
    except RemoteProtocolError as exc:
        out.append(("error", exc.sqlstate, exc.message))
    else:
        out.append(("remaining", framer.take_remaining()))
    return out


DRIVERS: dict[str, tuple[Callable[[list[bytes]], Outcome], st.SearchStrategy[bytes]]] = {
    "frontend": (drive_frontend, client_streams()),
    "frontend_tls": (lambda c: drive_frontend(c, accept_ssl=True), client_streams()),
    "instance": (drive_instance, instance_streams()),
    "framer": (drive_framer, instance_streams()),
}

# --- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DRIVERS))
@SETTINGS
@given(data=st.data())
def test_garbage_gives_only_events_or_protocol_errors(name: str, data: st.DataObject) -> None:
    driver, streams = DRIVERS[name]
    raw = data.draw(st.one_of(st.binary(max_size=64), streams))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=8))
    driver(chunked(raw, cuts))  # anything but RemoteProtocolError escapes and fails the test


@pytest.mark.parametrize("name", ["frontend", "instance", "framer"])
@SETTINGS
@given(data=st.data())
def test_chunking_never_changes_the_outcome(name: str, data: st.DataObject) -> None:
    driver, streams = DRIVERS[name]
    raw = data.draw(streams)
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=8))
    whole = driver([raw] if raw else [])
    assert driver(chunked(raw, cuts)) == whole
    assert driver([bytes([b]) for b in raw]) == whole


@SETTINGS
@given(params=param_dicts, user=values.filter(bool), minor=st.integers(0, 3))
def test_startup_message_round_trip(params: dict[str, str], user: str, minor: int) -> None:
    params["user"] = user
    fs = FrontendStartup(tls_available=False)
    fs.receive_data(m.startup_message(params, version=(3, minor)))
    event = fs.next_event()
    assert event == StartupReceived(
        major=3, minor=minor, params=params, protocol_options={}, needs_negotiation=minor > 0
    )


@SETTINGS
@given(pid=st.integers(-(2**31), 2**31 - 1), secret=st.binary(min_size=4, max_size=4))
def test_cancel_request_round_trip(pid: int, secret: bytes) -> None:
    fs = FrontendStartup(tls_available=False)
    fs.receive_data(m.cancel_request(pid, secret))
    assert fs.next_event() == CancelRequested(pid=pid, secret=secret)


@SETTINGS
@given(
    sqlstate=st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    message=values,
    severity=st.sampled_from(["ERROR", "FATAL", "PANIC"]),
    detail=st.none() | values,
    hint=st.none() | values,
    extra=st.dictionaries(st.sampled_from("WsPqtcdnFLR"), values, max_size=3),
)
def test_error_response_round_trip(
    sqlstate: str,
    message: str,
    severity: str,
    detail: str | None,
    hint: str | None,
    extra: dict[str, str],
) -> None:
    raw = m.error_response(
        sqlstate, message, severity=severity, detail=detail, hint=hint, extra=extra
    )
    framer = m.MessageFramer(max_length=10_000)
    framer.receive_data(raw)
    msg = framer.next_message()
    assert msg is not None and msg[0] == b"E"
    expected = {"S": severity, "V": severity, "C": sqlstate, "M": message, **extra}
    if detail is not None:
        expected["D"] = detail
    if hint is not None:
        expected["H"] = hint
    assert m.parse_error_fields(msg[1]) == expected


@SETTINGS
@given(st.lists(st.tuples(names, values), max_size=5), st.binary(max_size=30))
def test_instance_parameters_forwarded_raw(pairs: list[tuple[str, str]], tail: bytes) -> None:
    stream = m.authentication_ok() + b"".join(m.parameter_status(n, v) for n, v in pairs)
    stream += m.backend_key_data(1, b"abcd") + m.ready_for_query(b"I") + tail
    out = drive_instance([stream])
    raws = [e.raw for e in out if hasattr(e, "raw") and not isinstance(e, InstanceReady)]
    assert raws == [m.parameter_status(n, v) for n, v in pairs]
    assert out[-1] == ("remaining", tail)
