"""Hostile input at volume for the protocol core: the startup machine, SCRAM, the instance side.

Each input is a structured message stream (valid packets, then mutated: truncated, bytes
flipped, lengths set to the edges, garbage spliced in) cut into random chunks, fed to one
sans-IO machine the way the network shell drives it. The only thing allowed out is a
RemoteProtocolError (the peer's fault: an ErrorResponse on the wire); anything else, our
LocalProtocolError included, is a defect and stops the run with the input that caused it.

    .venv/bin/python -m fuzz.pgwire --inputs 1000000          # the long run (docs/reliability.md)
    .venv/bin/python -m fuzz.pgwire --inputs 20000 --seed 7   # what the suite runs

Inputs come from `random.Random(seed)`: a failure is replayed by its seed and index.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from taidon_proxy.pgwire import messages
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.instance import InstanceReady, InstanceStartup
from taidon_proxy.pgwire.scram import (
    MECHANISM,
    ScramServer,
    make_verifier,
    parse_sasl_initial_response,
)
from taidon_proxy.pgwire.startup import FrontendStartup
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)

EDGE_LENGTHS = [0, 1, 3, 4, 5, 7, 8, 9, 16, 10000, 10001, 65536, 2**31 - 1, -1, -8, -(2**31)]
WORDS = [b"user", b"database", b"options", b"application_name", b"_pq_.x", b"replication", b""]
VALUES = [b"postgres", b"one", b"-c taidon.label=x", b"\xff\xfe", b"a" * 300, b"", b"x\x00y"]
PASSWORD = "fuzz-secret"
VERIFIER = make_verifier(PASSWORD, salt=b"0123456789abcdef", iterations=16)


# --- generating -----------------------------------------------------------------------------


def _startup_body(rng: random.Random) -> bytes:
    major, minor = rng.choice([(3, 0), (3, 0), (3, 2), (3, 9), (2, 0), (4, 0), (1234, 5679)])
    body = struct.pack("!hh", major, minor)
    for _ in range(rng.randrange(4)):
        body += rng.choice(WORDS) + b"\0" + rng.choice(VALUES) + b"\0"
    if rng.random() < 0.9:
        body += b"\0"
    return body


def _packet(rng: random.Random) -> bytes:
    """One frontend packet of the startup phase, mostly well formed."""
    pick = rng.random()
    if pick < 0.15:
        return messages.ssl_request()
    if pick < 0.22:
        return messages.gssenc_request()
    if pick < 0.30:
        size = rng.choice([16, 16, 12, 20])
        return struct.pack("!ii", size, 80877102) + rng.randbytes(size - 8)
    if pick < 0.65:
        body = _startup_body(rng)
        return struct.pack("!i", len(body) + 4) + body
    if pick < 0.85:
        payload = rng.randbytes(rng.randrange(40))
        return b"p" + struct.pack("!i", len(payload) + 4) + payload
    return rng.randbytes(rng.randrange(1, 24))  # a TLS record, a typed message, noise


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
        what = rng.random()
        if not out:
            break
        if what < 0.35:  # flip a byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif what < 0.55:  # a length field at the edges
            at = rng.randrange(len(out))
            out[at : at + 4] = struct.pack("!i", rng.choice(EDGE_LENGTHS))
        elif what < 0.75:  # truncate
            del out[rng.randrange(len(out)) :]
        elif what < 0.9:  # splice in noise
            at = rng.randrange(len(out) + 1)
            out[at:at] = rng.randbytes(rng.randrange(1, 12))
        else:  # duplicate a run (a second StartupMessage, a repeated request)
            a = rng.randrange(len(out))
            out[a:a] = out[a : a + rng.randrange(1, 40)]
    return bytes(out)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """The stream as the network may deliver it: whole, byte by byte, or in random cuts."""
    mode = rng.random()
    if mode < 0.4 or len(data) < 2:
        return [data]
    if mode < 0.5:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- driving: what the network shell does with each machine ---------------------------------


def drive_startup(rng: random.Random) -> None:
    data = _mutate(rng, b"".join(_packet(rng) for _ in range(rng.randrange(1, 5))))
    tls = rng.random() < 0.5
    fe = FrontendStartup(tls_available=tls, max_buffer=rng.choice([64, 65536]))
    for chunk in _chunks(rng, data):
        fe.receive_data(chunk)
        while (ev := fe.next_event()) is not None:
            if isinstance(ev, SSLRequested):
                accept = tls and rng.random() < 0.5
                fe.answer_ssl(accept)
                if accept:
                    fe.tls_established()
            elif isinstance(ev, GSSENCRequested):
                fe.answer_gssenc()
            elif isinstance(ev, CancelRequested):
                return
            elif isinstance(ev, StartupReceived):
                if rng.random() < 0.3:
                    fe.auth_done()
                    fe.take_remaining()
                    return
                fe.expect_password()
            elif isinstance(ev, PasswordReceived):
                fe.auth_done()
                fe.take_remaining()
                return


def _gs2(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return "n,,"
    return rng.choice(["y,,", "p=tls-server-end-point,,", "n,a=x,", "", "n,"])


def _client_first(rng: random.Random, gs2: str, nonce: str) -> bytes:
    text = f"{gs2}n={rng.choice(['', 'u', '=2C'])},r={nonce}"
    if rng.random() < 0.1:
        text += ",e=ext"
    return text.encode()


def drive_scram(rng: random.Random) -> None:
    known = rng.random() < 0.7
    server = ScramServer(
        VERIFIER if known else None, nonce="srvnonce" + str(rng.randrange(10**6)),
        user="fuzz", mock_secret=b"m",
    )  # fmt: skip
    mechanism = MECHANISM if rng.random() < 0.8 else rng.choice(["SCRAM-SHA-256-PLUS", "", "x"])
    gs2 = _gs2(rng)
    first = _mutate(rng, _client_first(rng, gs2, "clientnonce" + str(rng.randrange(100))))
    wire = mechanism.encode() + b"\0" + struct.pack("!i", len(first)) + first
    mech, data = parse_sasl_initial_response(_mutate(rng, wire) if rng.random() < 0.3 else wire)
    server_first = server.handle_initial(mech, data).decode()
    attrs = dict(p.split("=", 1) for p in server_first.split(",") if "=" in p)
    nonce = attrs.get("r", "")
    final_bare = f"c={base64.b64encode(gs2.encode()).decode()},r={nonce}"
    proof = base64.b64encode(_proof(server_first, data, final_bare) if known else rng.randbytes(32))
    final = f"{final_bare},p={proof.decode()}".encode()
    server.handle_final(_mutate(rng, final))


def _proof(server_first: str, client_first: bytes, final_bare: str) -> bytes:
    """A correct client proof (so the mutations reach the paths after verification)."""
    attrs = dict(p.split("=", 1) for p in server_first.split(",") if "=" in p)
    salted = hashlib.pbkdf2_hmac(
        "sha256", PASSWORD.encode(), base64.b64decode(attrs.get("s", "")), int(attrs.get("i", 1))
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    bare = client_first.decode(errors="replace").split(",", 2)[-1]
    auth = f"{bare},{server_first},{final_bare}".encode()
    signature = hmac.digest(stored, auth, "sha256")
    return bytes(a ^ b for a, b in zip(client_key, signature, strict=True))


def _backend_message(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.2:
        return messages.authentication_ok()
    if pick < 0.25:
        return messages.authentication_sasl([MECHANISM])
    if pick < 0.5:
        return messages.parameter_status(rng.choice(["server_version", "TimeZone", ""]), "15.8")
    if pick < 0.6:
        return messages.backend_key_data(rng.randrange(2**31), rng.randbytes(4))
    if pick < 0.7:
        return messages.notice_response("hello")
    if pick < 0.78:
        return messages.error_response("57P03", "the database system is starting up")
    if pick < 0.9:
        status = rng.choice([b"I", b"T", b"E", b"X", b""])  # the last two: invalid
        return b"Z" + struct.pack("!i", len(status) + 4) + status
    kind = bytes([rng.randrange(256)])
    body = rng.randbytes(rng.randrange(12))
    return kind + struct.pack("!i", len(body) + 4) + body


def drive_instance(rng: random.Random) -> None:
    start = [messages.authentication_ok()] if rng.random() < 0.7 else []
    stream = start + [_backend_message(rng) for _ in range(rng.randrange(1, 8))]
    data = _mutate(rng, b"".join(stream))
    inst = InstanceStartup({"user": "postgres", "database": "one"}, max_message_length=4096)
    for chunk in _chunks(rng, data):
        inst.receive_data(chunk)
        while (ev := inst.next_event()) is not None:
            if isinstance(ev, InstanceReady):
                inst.take_remaining()
                return


TARGETS: dict[str, Callable[[random.Random], None]] = {
    "startup": drive_startup,
    "scram": drive_scram,
    "instance": drive_instance,
}


# --- running --------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    inputs: int
    refused: int  # inputs that ended in a RemoteProtocolError (the expected refusals)
    seconds: float
    rss_growth_kib: int


class Defect(Exception):
    """An input made a machine raise something other than RemoteProtocolError."""


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def run(target: str, inputs: int, seed: int) -> Result:
    drive = TARGETS[target]
    refused = 0
    base = _rss_kib()
    peak = base
    started = time.perf_counter()
    for i in range(inputs):
        rng = random.Random(f"{seed}:{target}:{i}")
        try:
            drive(rng)
        except RemoteProtocolError:
            refused += 1
        except Exception as e:
            raise Defect(f"{target} input {i} (seed {seed}): {type(e).__name__}: {e}") from e
        if i % 10000 == 0:
            peak = max(peak, _rss_kib())
    return Result(target, inputs, refused, time.perf_counter() - started, peak - base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="in all, split over targets")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", action="append", choices=sorted(TARGETS))
    args = ap.parse_args(argv)
    targets = args.only or list(TARGETS)
    each = -(-args.inputs // len(targets))  # at least --inputs in all
    total = 0
    print(f"{'target':<9} {'inputs':>9} {'refused':>9} {'inputs/s':>9} {'rss +KiB':>9}")
    for t in targets:
        try:
            r = run(t, each, args.seed)
        except Defect as e:
            print(f"DEFECT: {e}", file=sys.stderr)
            return 1
        total += r.inputs
        rate = r.inputs / r.seconds
        print(f"{t:<9} {r.inputs:>9} {r.refused:>9} {rate:>9.0f} {r.rss_growth_kib:>9}")
    print(f"total {total} inputs, seed {args.seed}: only protocol errors came out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
