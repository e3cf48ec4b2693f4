"""Sans-IO Postgres wire protocol core: bytes in, typed events out, typed messages to bytes."""

from taidon_proxy.pgwire.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from taidon_proxy.pgwire.instance import (
    InstanceAuthOk,
    InstanceBackendKey,
    InstanceError,
    InstanceEvent,
    InstanceNotice,
    InstanceParameterStatus,
    InstanceReady,
    InstanceStartup,
    InstanceState,
)
from taidon_proxy.pgwire.messages import MessageFramer, parse_error_fields
from taidon_proxy.pgwire.scram import (
    ScramServer,
    make_verifier,
    parse_sasl_initial_response,
    parse_verifier,
)
from taidon_proxy.pgwire.startup import FrontendStartup, StartupState
from taidon_proxy.pgwire.startup_events import (
    CancelRequested,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupEvent,
    StartupReceived,
)

__all__ = [
    "CancelRequested",
    "FrontendStartup",
    "GSSENCRequested",
    "InstanceAuthOk",
    "InstanceBackendKey",
    "InstanceError",
    "InstanceEvent",
    "InstanceNotice",
    "InstanceParameterStatus",
    "InstanceReady",
    "InstanceStartup",
    "InstanceState",
    "LocalProtocolError",
    "MessageFramer",
    "PasswordReceived",
    "ProtocolError",
    "RemoteProtocolError",
    "SSLRequested",
    "ScramServer",
    "StartupEvent",
    "StartupReceived",
    "StartupState",
    "make_verifier",
    "parse_error_fields",
    "parse_sasl_initial_response",
    "parse_verifier",
]
