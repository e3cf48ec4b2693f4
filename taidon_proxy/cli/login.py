"""`sqlrs login [--device] [--no-browser]` and `sqlrs logout`: a person signs in through the
team server's OpenID provider and keeps a proxy token for later commands.

The CLI is a public native client (RFC 8252): authorization code with PKCE (S256) on a
loopback redirect (127.0.0.1, a random port), or the device flow (RFC 8628) with `--device`.
The proxy issues the nonce, checks the ID token itself and answers with its own token.
"""

from __future__ import annotations

import http.server
import os
import sys
import threading
import time
import urllib.parse
import webbrowser
from typing import Any

import click
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from requests import RequestException

from taidon_proxy.cli import credentials, render
from taidon_proxy.cli.client import AdminClient
from taidon_proxy.cli.context import as_json, client
from taidon_proxy.cli.errors import EXIT_AUTH, EXIT_FAILED, CliError

CALLBACK = "/callback"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
HTTP_TIMEOUT = 30.0
PAGE = b"<!doctype html><title>sqlrs login</title><p>%s</p>"


@click.command()
@click.option("--device", is_flag=True, help="Device flow: for a machine without a browser.")
@click.option("--no-browser", is_flag=True, help="Print the URL only; do not open a browser.")
@click.option(
    "--timeout", default=300.0, show_default=True, help="Seconds to wait for the sign-in."
)
@click.pass_context
def login(ctx: click.Context, device: bool, no_browser: bool, timeout: float) -> None:
    """Sign in through the proxy's OpenID provider; later commands use the token it gives.

    \b
    Examples:
      sqlrs login                 # a browser signs you in (the URL is printed too)
      sqlrs login --device        # on a headless machine: a code to enter elsewhere
    """
    api = client(ctx)
    start = api.call_as(None, "POST", "/v1/login/oidc/start")
    secret = api.config.oidc.client_secret if api.config.oidc is not None else None
    oauth = OAuth2Session(
        start["client_id"],
        client_secret=secret,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        scope=" ".join(start["scopes"]),
        code_challenge_method="S256",
        default_timeout=HTTP_TIMEOUT,
    )
    issuer = start["issuer"]
    try:
        # Before anyone is sent to it: is the provider there at all?
        oauth.get(
            issuer.rstrip("/") + "/.well-known/openid-configuration",
            withhold_token=True,
            timeout=HTTP_TIMEOUT,
        ).raise_for_status()
        if device:
            tokens = _device(oauth, start, timeout)
        else:
            tokens = _code(oauth, start, timeout, open_browser=not no_browser)
    except (RequestException, OSError) as e:
        raise CliError(
            f"cannot reach the OIDC provider {issuer}: {type(e).__name__}",
            EXIT_FAILED,
            hint="tokens you already hold keep working; try again when it is back",
        ) from None
    except OAuthError as e:
        raise CliError(f"the OIDC provider refused the sign-in: {e.error}", EXIT_AUTH) from None
    id_token = tokens.get("id_token")
    if not isinstance(id_token, str):
        raise CliError("the OIDC provider answered without an ID token (scope openid?)")
    made = api.call_as(
        None,
        "POST",
        "/v1/login/oidc",
        {
            "login_id": start["login_id"],
            "id_token": id_token,
            "flow": "device" if device else "code",
        },
    )
    credentials.put(
        api.base,
        {k: made[k] for k in ("token", "id", "user", "teams", "role", "expires")}
        | {"issuer": issuer},
    )
    if as_json(ctx):
        render.emit_json({k: v for k, v in made.items() if k != "token"})
        return
    teams = ", ".join(made["teams"])
    click.echo(
        f"signed in as {made['user']} (teams: {teams}; role {made['role']}); token {made['id']}"
        f" expires in {render.duration(made['expires'] - time.time())},"
        f" kept in {credentials.path()}",
        err=True,
    )


def _code(
    oauth: OAuth2Session, start: dict[str, Any], timeout: float, *, open_browser: bool
) -> dict[str, Any]:
    """Authorization code + PKCE with the redirect to a one-shot server on 127.0.0.1."""
    got: dict[str, str] = {}
    done = threading.Event()

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != CALLBACK or done.is_set():
                self.send_error(404)
                return
            got.update(urllib.parse.parse_qsl(url.query))
            ok = "code" in got
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            text = b"Signed in; you can close this tab." if ok else b"The sign-in failed."
            self.wfile.write(PAGE % text)
            done.set()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the redirect carries the code: never print it

    server = http.server.HTTPServer(("127.0.0.1", 0), Callback)
    redirect = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        verifier = generate_token(64)
        uri, state = oauth.create_authorization_url(
            start["authorization_endpoint"],
            redirect_uri=redirect,
            code_verifier=verifier,
            nonce=start["nonce"],
        )
        click.echo(f"Open this URL to sign in:\n  {uri}", err=True)
        if open_browser and _has_display():
            webbrowser.open(uri)
        if not done.wait(timeout):
            raise CliError(f"no sign-in within {timeout:g}s; run sqlrs login again", EXIT_AUTH)
    finally:
        server.shutdown()
        server.server_close()
    if got.get("state") != state:
        raise CliError("the sign-in's answer does not match its request (state)", EXIT_AUTH)
    if "error" in got or "code" not in got:
        raise CliError(f"the OIDC provider refused the sign-in: {got.get('error')}", EXIT_AUTH)
    token: dict[str, Any] = oauth.fetch_token(
        start["token_endpoint"],
        grant_type="authorization_code",
        code=got["code"],
        redirect_uri=redirect,
        code_verifier=verifier,
    )
    return token


def _device(oauth: OAuth2Session, start: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The device flow: a code to enter on another machine, then polling the token endpoint."""
    endpoint = start.get("device_authorization_endpoint")
    if not endpoint:
        raise CliError("the OIDC provider offers no device flow; run sqlrs login without --device")
    data = {"client_id": start["client_id"], "scope": oauth.scope, "nonce": start["nonce"]}
    r = oauth.post(endpoint, data=data, withhold_token=True, timeout=HTTP_TIMEOUT)
    answer = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
    if r.status_code != 200 or "device_code" not in answer:
        raise CliError(
            f"the OIDC provider refused the device flow: {answer.get('error', r.status_code)}"
        )
    shown = answer.get("verification_uri_complete") or answer["verification_uri"]
    click.echo(f"On any device, open {shown}", err=True)
    click.echo(f"and enter the code: {answer['user_code']}", err=True)
    sys.stderr.flush()
    interval = float(answer.get("interval", 5))
    deadline = time.monotonic() + min(timeout, float(answer.get("expires_in", timeout)))
    while time.monotonic() < deadline:
        time.sleep(interval)
        try:
            token: dict[str, Any] = oauth.fetch_token(
                start["token_endpoint"], grant_type=DEVICE_GRANT, device_code=answer["device_code"]
            )
            return token
        except OAuthError as e:
            if e.error == "authorization_pending":
                continue
            if e.error == "slow_down":
                interval += 5
                continue
            raise
    raise CliError(f"no sign-in within {timeout:g}s; run sqlrs login --device again", EXIT_AUTH)


def _has_display() -> bool:
    return sys.platform == "darwin" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


@click.command()
@click.pass_context
def logout(ctx: click.Context) -> None:
    """Revoke the token `sqlrs login` stored for this proxy, and forget it.

    Example: sqlrs logout
    """
    api: AdminClient = client(ctx)
    entry = credentials.get(api.base)
    if entry is None:
        credentials.drop(api.base)  # an expired one, if any
        click.echo(f"not signed in to {api.base}", err=True)
        return
    try:
        api.call_as(str(entry["token"]), "DELETE", f"/v1/tokens/{entry['id']}")
    except CliError as e:
        if e.exit_code != EXIT_AUTH:  # refused: it had expired or was revoked already
            raise
    credentials.drop(api.base)
    click.echo(f"signed out of {api.base}; token {entry['id']} revoked", err=True)
