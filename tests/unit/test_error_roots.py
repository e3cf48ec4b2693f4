"""One error root for the proxy: every error class of ours derives from TaidonError, and the
two leaf libraries' roots are translated at their named places."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import taidon_proxy
from snapshots.base import SnapshotError
from taidon_proxy.admin.errors import ApiError, from_domain
from taidon_proxy.cli.errors import EXIT_NOT_FOUND, CliError
from taidon_proxy.errors import (
    AuthFailed,
    ProtocolMisuse,
    ProtocolViolation,
    TaidonError,
    from_protocol,
)
from taidon_proxy.pgwire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from taidon_proxy.runtimes.base import InstanceStartError, RuntimeError_

pytestmark = pytest.mark.unit

# Raised and caught inside one module; no edge meets them.
INTERNAL = {
    "taidon_proxy.cli.yaml_edit.EditError",  # turned into a CliError by its caller
    "taidon_proxy.prepare.liquibase.wire.WireError",  # the Liquibase relay's own framing
    "taidon_proxy.prepare.liquibase.adapter._Stale",  # control flow inside one build
    # Raised in the project's interpreter, where pytool_entry turns it into the answer line.
    "taidon_proxy.prepare.django.runner.Failed",
    "taidon_proxy.prepare.adopt._WouldBuild",  # control flow inside one adoption check
}


def _our_exception_classes() -> list[type[BaseException]]:
    found = []
    for mod in pkgutil.walk_packages(taidon_proxy.__path__, "taidon_proxy."):
        if mod.name.startswith("taidon_proxy.pgwire") or mod.name.endswith(
            ("._splice", "__main__")
        ):
            continue  # pgwire is a leaf library with its own root (checked below)
        module = importlib.import_module(mod.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == mod.name:
                found.append(cls)
    return found


def test_every_error_class_of_the_proxy_derives_from_the_one_root() -> None:
    classes = _our_exception_classes()
    assert len(classes) > 10
    strays = [
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if not issubclass(c, TaidonError) and f"{c.__module__}.{c.__qualname__}" not in INTERNAL
    ]
    assert strays == []


def test_runtime_api_and_cli_errors_are_domain_errors_with_their_own_codes() -> None:
    assert issubclass(InstanceStartError, RuntimeError_)
    assert issubclass(RuntimeError_, TaidonError)
    api = ApiError(404, "not_found", 'state "x" does not exist')
    assert isinstance(api, TaidonError) and api.status == 404 and api.message.startswith("state")
    assert from_domain(api) is api
    cli = CliError("no such alias", EXIT_NOT_FOUND)
    assert isinstance(cli, TaidonError) and cli.exit_code == EXIT_NOT_FOUND
    assert cli.message == "no such alias"


@pytest.mark.parametrize(
    ("exc", "kind", "sqlstate"),
    [
        (RemoteProtocolError("invalid message length"), ProtocolViolation, "08P01"),
        (RemoteProtocolError("unsupported", sqlstate="0A000"), ProtocolViolation, "0A000"),
        (RemoteProtocolError('password authentication failed for user "u"', sqlstate="28P01"),
         AuthFailed, "28P01"),
        (RemoteProtocolError("no PostgreSQL user name specified", sqlstate="28000"),
         AuthFailed, "28000"),
        (LocalProtocolError("handle_final() in SCRAM phase DONE"), ProtocolMisuse, "XX000"),
    ],
)  # fmt: skip
def test_pgwire_errors_are_translated_keeping_sqlstate_and_message(
    exc: ProtocolError, kind: type[TaidonError], sqlstate: str
) -> None:
    ours = from_protocol(exc)
    assert type(ours) is kind
    assert (ours.sqlstate, ours.message) == (sqlstate, exc.message)


def test_the_leaf_libraries_keep_their_own_roots() -> None:
    assert not issubclass(ProtocolError, TaidonError)
    assert not issubclass(SnapshotError, TaidonError)
