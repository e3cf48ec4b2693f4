"""Unit tests for the SCRAM-SHA-256 server, verifiers and SASLprep."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.errors import LocalProtocolError, RemoteProtocolError
from taidon_proxy.pgwire.saslprep import prepare_password, saslprep
from taidon_proxy.pgwire.scram import (
    ScramPhase,
    ScramServer,
    make_verifier,
    parse_sasl_initial_response,
    parse_verifier,
)

pytestmark = pytest.mark.unit

# RFC 7677 section 3 example exchange.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SALT = b"0123456789abcdef"


def client_final(password: str, client_first: bytes, server_first: bytes, gs2: bytes) -> bytes:
    """A minimal RFC 5802 client computation, independent of the server code."""
    attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", prepare_password(password), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    without_proof = b"c=" + base64.b64encode(gs2) + b",r=" + attrs["r"].encode()
    bare = client_first[len(gs2) :]
    auth = bare + b"," + server_first + b"," + without_proof
    sig = hmac.new(stored, auth, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


def test_rfc7677_vector() -> None:
    verifier = make_verifier("pencil", salt=RFC_SALT)
    server = ScramServer(verifier, nonce=RFC_SERVER_NONCE, user="user")
    assert server.handle_initial("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.phase is ScramPhase.DONE


def test_rfc7677_vector_with_wrong_password_fails() -> None:
    server = ScramServer(make_verifier("pencil2", salt=RFC_SALT), nonce=RFC_SERVER_NONCE, user="u")
    server.handle_initial("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    with pytest.raises(RemoteProtocolError) as info:
        server.handle_final(RFC_CLIENT_FINAL)
    assert info.value.sqlstate == "28P01"
    assert info.value.message == 'password authentication failed for user "u"'
    assert server.phase is ScramPhase.FAILED


@pytest.mark.parametrize("gs2", [b"n,,", b"y,,"])
@pytest.mark.parametrize("password", ["s3cret", "pässwörd", "I\u00adX", ""])
def test_round_trip_with_independent_client(gs2: bytes, password: str) -> None:
    server = ScramServer(make_verifier(password, salt=SALT), nonce="srvnonce", user="app")
    first = gs2 + b"n=,r=clientnonce"
    server_first = server.handle_initial("SCRAM-SHA-256", first)
    final = client_final(password, first, server_first, gs2)
    assert server.handle_final(final).startswith(b"v=")


def test_unknown_user_mock_exchange_fails_at_the_end() -> None:
    server = ScramServer(None, nonce="srv", user="ghost", mock_secret=b"k")
    first = server.handle_initial("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert first.startswith(b"r=abcsrv,s=") and first.endswith(b",i=4096")
    again = ScramServer(None, nonce="srv", user="ghost", mock_secret=b"k")
    assert again.handle_initial("SCRAM-SHA-256", b"n,,n=,r=abc") == first  # stable salt
    other = ScramServer(None, nonce="srv", user="other", mock_secret=b"k")
    assert other.handle_initial("SCRAM-SHA-256", b"n,,n=,r=abc") != first
    with pytest.raises(RemoteProtocolError, match='user "ghost"') as info:
        server.handle_final(client_final("x", b"n,,n=,r=abc", first, b"n,,"))
    assert info.value.sqlstate == "28P01"


def test_make_verifier_format_and_parse() -> None:
    text = make_verifier("pencil", salt=RFC_SALT, iterations=10)
    assert text.startswith("SCRAM-SHA-256$10:W22ZaJ0SNY7soEsUEjb6gQ==$")
    v = parse_verifier(text)
    assert (v.iterations, v.salt) == (10, RFC_SALT)
    assert "pencil" not in repr(v) and base64.b64encode(v.stored_key).decode() not in repr(v)
    with pytest.raises(ValueError):
        make_verifier("x", salt=b"")
    with pytest.raises(ValueError):
        make_verifier("x", salt=SALT, iterations=0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abcdef",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$4096:c2Fsd!==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
    ],
)
def test_invalid_verifiers_are_rejected_without_echo(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_verifier(text)
    assert str(info.value) == "invalid SCRAM-SHA-256 verifier"
    with pytest.raises(ValueError):
        ScramServer(text, nonce="n")


@pytest.mark.parametrize("nonce", ["", "a,b", "a b", "é"])
def test_invalid_server_nonce(nonce: str) -> None:
    with pytest.raises(ValueError):
        ScramServer(None, nonce=nonce)


def test_parse_sasl_initial_response() -> None:
    payload = m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")[5:]
    assert parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", b"n,,n=,r=x")


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"SCRAM-SHA-256", "unterminated"),
        (b"SCRAM-SHA-256\x00\x00\x00", "truncated"),
        (b"SCRAM-SHA-256\x00\xff\xff\xff\xff", "without client data"),
        (b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc", "truncated"),
        (b"SCRAM-SHA-256\x00\x00\x00\x00\x01abc", "trailing"),
        (b"SCRAM-SHA-256\x00\xff\xff\xff\xfeabc", "truncated"),
        (b"\xff\x00\x00\x00\x00\x00", "UTF-8"),
    ],
)
def test_parse_sasl_initial_response_errors(payload: bytes, text: str) -> None:
    with pytest.raises(RemoteProtocolError, match=text):
        parse_sasl_initial_response(payload)


@pytest.mark.parametrize(
    ("mechanism", "data", "text", "sqlstate"),
    [
        ("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=a", "invalid SASL", "08P01"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=a", "channel binding", "08P01"),
        ("SCRAM-SHA-256", b"x,,n=,r=a", "channel-binding flag", "08P01"),
        ("SCRAM-SHA-256", b"n,a=admin,n=,r=a", "authorization identity", "0A000"),
        ("SCRAM-SHA-256", b"n,,m=ext,n=,r=a", "unsupported SCRAM extension", "0A000"),
        ("SCRAM-SHA-256", b"n,,n=", "incomplete", "08P01"),
        ("SCRAM-SHA-256", b"n,,r=a,n=", "expected attribute 'n'", "08P01"),
        ("SCRAM-SHA-256", b"n,,n=,x=a", "expected attribute 'r'", "08P01"),
        ("SCRAM-SHA-256", b"n,,n=,r=", "invalid client nonce", "08P01"),
        ("SCRAM-SHA-256", b"n,,n=,r=a\x01", "invalid client nonce", "08P01"),
        ("SCRAM-SHA-256", b"n,,n=\xff,r=a", "UTF-8", "08P01"),
    ],
)
def test_client_first_errors(mechanism: str, data: bytes, text: str, sqlstate: str) -> None:
    server = ScramServer(make_verifier("pw", salt=SALT, iterations=1), nonce="s")
    with pytest.raises(RemoteProtocolError, match=text) as info:
        server.handle_initial(mechanism, data)
    assert info.value.sqlstate == sqlstate
    assert server.phase is ScramPhase.FAILED
    with pytest.raises(LocalProtocolError):
        server.handle_final(b"")


def test_client_first_extensions_are_ignored() -> None:
    server = ScramServer(make_verifier("pw", salt=SALT, iterations=1), nonce="s")
    first = b"n,,n=app,r=abc,x=ext"
    server_first = server.handle_initial("SCRAM-SHA-256", first)
    assert server_first.startswith(b"r=abcs,")


def _final_with(replace: tuple[bytes, bytes]) -> tuple[ScramServer, bytes]:
    server = ScramServer(make_verifier("pw", salt=SALT, iterations=1), nonce="s")
    first = b"n,,n=,r=abc"
    final = client_final("pw", first, server.handle_initial("SCRAM-SHA-256", first), b"n,,")
    return server, final.replace(*replace)


@pytest.mark.parametrize(
    ("replace", "text"),
    [
        ((b",p=", b",q="), "proof is missing"),
        ((b"c=biws,", b""), "incomplete"),
        ((b"c=biws", b"c=eSws"), "channel binding check failed"),
        ((b"c=biws", b"c=bi!s"), "base64"),
        ((b"c=biws", b"x=biws"), "expected attribute 'c'"),
        ((b"r=abcs", b"r=abcX"), "nonce does not match"),
        ((b"r=abcs", b"x=abcs"), "expected attribute 'r'"),
        ((b",p=", b",p=AAAA,p="), "unexpected attribute"),
        ((b",p=", b",x,p="), "unexpected attribute"),
        ((b",p=", b",p=AA,AA"), "base64"),
    ],
)
def test_client_final_errors(replace: tuple[bytes, bytes], text: str) -> None:
    server, final = _final_with(replace)
    with pytest.raises(RemoteProtocolError, match=text):
        server.handle_final(final)
    assert server.phase is ScramPhase.FAILED


def test_client_final_short_proof() -> None:
    server, final = _final_with((b"", b""))
    head = final.rpartition(b",p=")[0]
    with pytest.raises(RemoteProtocolError, match="invalid client proof"):
        server.handle_final(head + b",p=AAAA")


def test_client_final_with_tampered_proof_fails_auth() -> None:
    server, final = _final_with((b"", b""))
    head, _, proof = final.rpartition(b",p=")
    bad = bytearray(base64.b64decode(proof))
    bad[0] ^= 1
    with pytest.raises(RemoteProtocolError) as info:
        server.handle_final(head + b",p=" + base64.b64encode(bytes(bad)))
    assert info.value.sqlstate == "28P01"


def test_calls_out_of_order_are_local_errors() -> None:
    server = ScramServer(make_verifier("pw", salt=SALT, iterations=1), nonce="s")
    with pytest.raises(LocalProtocolError):
        server.handle_final(b"c=biws")
    server.handle_initial("SCRAM-SHA-256", b"n,,n=,r=a")
    with pytest.raises(LocalProtocolError):
        server.handle_initial("SCRAM-SHA-256", b"n,,n=,r=a")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to space
        ("\u0007", None),  # prohibited control character
        ("\u0627\u0031", None),  # bidi: RandAL not at the end
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),
        ("\u0627a\u0628", None),  # bidi: RandAL mixed with L
    ],
)
def test_saslprep_rfc4013_examples(text: str, expected: str | None) -> None:
    assert saslprep(text) == expected


def test_prepare_password_falls_back_to_raw_like_postgres() -> None:
    assert prepare_password("a\u0007") == b"a\x07"  # ASCII is never prepared
    assert prepare_password("\u00e9\u0007") == "\u00e9\u0007".encode()
    assert prepare_password("I\u00adX") == b"IX"


def test_several_verifiers_with_one_salt_each_fit_their_password() -> None:
    """A user's access tokens share a salt: the proof is tried against each verifier."""
    verifiers = [make_verifier(pw, salt=SALT) for pw in ("first", "second")]
    first = b"n,,n=,r=clientnonce"
    for i, pw in enumerate(("first", "second", "third")):
        server = ScramServer(verifiers, nonce="srvnonce", user="ana")
        server_first = server.handle_initial("SCRAM-SHA-256", first)
        final = client_final(pw, first, server_first, b"n,,")
        if i < 2:
            assert server.handle_final(final).startswith(b"v=")
            assert server.matched == i
        else:
            with pytest.raises(RemoteProtocolError, match='user "ana"'):
                server.handle_final(final)
    with pytest.raises(LocalProtocolError, match="share salt"):
        ScramServer([verifiers[0], make_verifier("x", salt=b"other-salt-16byt")], nonce="n")
