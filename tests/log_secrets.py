"""Every log line any test makes the proxy write is checked for the secrets the tests use.

Tests register what is secret (passwords they send, tokens they are given); the proxy's own
hooks register the admin tokens and access tokens it creates and the keys of every SCRAM
verifier it loads.
A line that contains one fails the test that was running (tests/conftest.py). Logs of
`sqlrs serve` subprocesses are not seen here: the tests that start one check its output.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog

MIN_LEN = 6  # shorter values ("bad", "x") would match ordinary words
_secrets: set[str] = set()
leaks: list[str] = []


def register(*values: str) -> None:
    _secrets.update(v for v in values if len(v) >= MIN_LEN)


def check(line: str) -> None:
    for s in _secrets:
        if s in line:
            leaks.append(f"a secret ({s[:4]}…) in a log line: {line[:200]}")


class _CheckingLogger(structlog.PrintLogger):
    def msg(self, message: str) -> None:
        check(message)
        super().msg(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _Factory:
    def __call__(self, *args: Any) -> _CheckingLogger:
        out: TextIO = sys.stdout  # looked up per logger: pytest swaps it per test
        return _CheckingLogger(out)


def install() -> None:
    """Route structlog through the checker and register the proxy's own secrets."""
    from taidon_proxy.admin import auth as admin_auth
    from taidon_proxy.admin import server as admin_server
    from taidon_proxy.net import auth as net_auth
    from taidon_proxy.store import tokens

    structlog.configure(logger_factory=_Factory())

    ensure = admin_auth.ensure_token

    def ensure_and_register(store: Any) -> str:
        token = ensure(store)
        register(token)
        return token

    admin_server.ensure_token = ensure_and_register  # type: ignore[assignment]

    init = net_auth.Authenticator.__init__

    def init_and_register(self: net_auth.Authenticator, cfg: Any, *args: Any, **kw: Any) -> None:
        init(self, cfg, *args, **kw)
        for verifier in cfg.users.values():  # checked by init: SCRAM-SHA-256$i:salt$SK:SK
            register(verifier, *verifier.split("$")[2].split(":"))

    net_auth.Authenticator.__init__ = init_and_register  # type: ignore[method-assign]

    create = tokens.TokenStore.create

    async def create_and_register(self: tokens.TokenStore, *args: Any, **kw: Any) -> Any:
        made = await create(self, *args, **kw)
        register(made.token)
        return made

    tokens.TokenStore.create = create_and_register  # type: ignore[method-assign]
