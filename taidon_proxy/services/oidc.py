"""OIDC login (the team server): a nonce per sign-in, the ID token checked against the
issuer's keys, its groups mapped to teams, and a proxy access token in exchange.

The CLI runs the provider's flows itself (a public native client: authorization code with
PKCE on a loopback redirect, or the device flow) with the nonce this service issued, then
hands over the ID token. Nothing the CLI says is believed: the signature (the issuer's JWKS),
`iss`, `aud` (and `azp`), `exp`/`iat`/`nbf` within the configured leeway, and the nonce,
which is single-use and expires, are all checked here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

from taidon_proxy.config import Config, OidcConfig
from taidon_proxy.services.access import Forbidden, Permission, Principal, principal_for
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.errors import Refusal
from taidon_proxy.services.team import Team
from taidon_proxy.store.tokens import NewToken

log = structlog.get_logger("taidon.oidc")

LOGIN_SECONDS = 600.0  # a sign-in started must finish within this (a device flow included)
MAX_PENDING = 1000  # the oldest go first: unauthenticated starts cannot fill memory
METADATA_SECONDS = 3600.0
JWKS_SECONDS = 600.0
JWKS_REFETCH_SECONDS = 10.0  # an unknown key id refetches the keys, at most this often
# Asymmetric only: an HMAC "signature" would be keyed by the client id's secret, not the issuer.
SIGNING_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                "EdDSA")  # fmt: skip
MAX_ID_TOKEN = 16384
MAX_DOCUMENT = 1 << 20
FETCH_SECONDS = 10.0
FLOWS = ("code", "device", "dashboard")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,62}$")  # a Postgres role, unquoted or not

# Fetch a JSON document from the provider (raises when it cannot).
Fetch = Callable[[str], Awaitable[dict[str, Any]]]
# POST a form to the provider (url, form, client secret or None) and read its JSON answer.
Post = Callable[[str, dict[str, str], str | None], Awaitable[dict[str, Any]]]


class ProviderDown(Refusal):
    """The provider did not answer or answered nonsense: sign-in is unavailable (503)."""

    def __init__(self, issuer: str, why: str) -> None:
        super().__init__(
            "unavailable",
            f"the OIDC provider {issuer} is not reachable ({why}); sign-in is unavailable,"
            " tokens already issued keep working",
        )


def refused(why: str) -> Refusal:
    """An ID token or sign-in we do not accept: 401, saying why the token failed (which the
    caller can see in it anyway), never anything about users or aliases."""
    return Refusal("unauthorized", f"ID token refused: {why}")


@dataclass
class _Provider:
    issuer: str
    metadata: dict[str, Any]
    fetched: float
    keys: KeySet | None = None
    keys_fetched: float = 0.0


@dataclass
class _Pending:
    nonce: str
    started: float
    expires: float
    verifier: str = ""  # the dashboard's flows: the PKCE verifier and the redirect URI
    redirect_uri: str = ""


@dataclass
class OidcLogin:
    config: Callable[[], Config]
    team: Team
    audit: Audit
    fetch: Fetch
    clock: Callable[[], float] = time.time
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _provider: _Provider | None = None
    post: Post | None = None  # None: post_form
    _seen: dict[str, float] = field(default_factory=dict)  # ID tokens accepted, until expiry

    def settings(self) -> OidcConfig:
        cfg = self.config().oidc
        if cfg is None or not self.team.enabled:
            raise Refusal("unsupported", "OIDC login is not configured (oidc: and teams:)")
        return cfg

    # --- the provider -----------------------------------------------------------------------

    async def _get(self, issuer: str, url: str) -> dict[str, Any]:
        try:
            return await self.fetch(url)
        except Refusal:
            raise
        except Exception as e:  # the fetcher's network errors, whatever their class
            log.warning("oidc.provider_down", url=url, error=str(e))
            raise ProviderDown(issuer, _reason(e)) from None

    async def provider(self, *, fresh_keys: bool = False) -> _Provider:
        """The issuer's discovery document and keys, cached; refetched when stale."""
        cfg = self.settings()
        now = self.clock()
        p = self._provider
        if p is None or p.issuer != cfg.issuer or now - p.fetched > METADATA_SECONDS:
            url = cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            meta = await self._get(cfg.issuer, url)
            if meta.get("issuer") != cfg.issuer:
                raise ProviderDown(
                    cfg.issuer, f"its discovery document names issuer {meta.get('issuer')!r}"
                )
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(key), str):
                    raise ProviderDown(cfg.issuer, f"its discovery document has no {key}")
            p = self._provider = _Provider(cfg.issuer, meta, now)
        stale = now - p.keys_fetched > (JWKS_REFETCH_SECONDS if fresh_keys else JWKS_SECONDS)
        if p.keys is None or stale:
            doc = await self._get(cfg.issuer, str(p.metadata["jwks_uri"]))
            try:
                p.keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]  # checked by it
            except (JoseError, ValueError, TypeError, KeyError) as e:
                raise ProviderDown(cfg.issuer, f"its JWKS is not a key set: {e}") from None
            p.keys_fetched = now
        return p

    # --- a sign-in --------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """What the CLI needs to run a flow: the endpoints, the client id, and a fresh nonce."""
        cfg = self.settings()
        p = await self.provider()
        now = self.clock()
        self._prune(now)
        login_id = secrets.token_urlsafe(24)
        nonce = secrets.token_urlsafe(24)
        self._pending[login_id] = _Pending(nonce, now, now + LOGIN_SECONDS)
        meta = p.metadata
        return {
            "login_id": login_id,
            "nonce": nonce,
            "expires_in": LOGIN_SECONDS,
            "issuer": cfg.issuer,
            "client_id": cfg.client_id,
            "scopes": cfg.scopes,
            "authorization_endpoint": meta["authorization_endpoint"],
            "token_endpoint": meta["token_endpoint"],
            "device_authorization_endpoint": meta.get("device_authorization_endpoint"),
        }

    async def finish(
        self, login_id: str, id_token: str, flow: str = "code"
    ) -> tuple[NewToken, Principal]:
        """Exchange a verified ID token for a proxy token; every refusal is audited."""
        cfg = self.settings()
        pending = self._pending.pop(login_id, None)  # single use, whatever happens next
        if pending is not None and pending.verifier:
            pending = None  # a dashboard sign-in's state is no CLI sign-in
        user, teams, claims = await self._accept(cfg, pending, flow, lambda: id_token)
        new, principal = await self.team.login_token(
            user, teams, cfg.issuer, str(claims["sub"]), cfg.token_ttl
        )
        self.audit.record(
            "login", actor=user, method="oidc", flow=_flow(flow), issuer=cfg.issuer,
            subject=str(claims["sub"]), teams=list(principal.teams), access_id=new.row.id,
            expires=new.row.expires,
        )  # fmt: skip
        return new, principal

    async def _accept(
        self,
        cfg: OidcConfig,
        pending: _Pending | None,
        flow: str,
        id_token: Callable[[], str | Awaitable[str]],
    ) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """The user, its mapped teams and the claims of a sign-in's verified ID token."""
        try:
            if pending is None or pending.expires <= self.clock():
                raise refused("the sign-in is unknown or expired (start again)")
            given = id_token()
            text = given if isinstance(given, str) else await given
            claims = await self.verify(cfg, text, pending, device=flow == "device")
            user = claims.get(cfg.username_claim)
            if not isinstance(user, str) or not user:
                raise refused(f"it has no {cfg.username_claim} claim")
            if not _USER.match(user):
                raise refused(f"its {cfg.username_claim} is not usable as a user name")
            teams = self.teams_for(cfg, claims.get(cfg.groups_claim))
            if principal_for(self.config(), user, teams) is None:
                raise Forbidden(
                    f'permission denied: user "{user}" is in no team (none of its groups'
                    " maps to one in oidc.groups)",
                    Permission.CONNECT,
                )
        except (Refusal, Forbidden) as e:
            self.audit.record(
                "login_failure", actor="anonymous", method="oidc", flow=_flow(flow),
                issuer=cfg.issuer, reason=e.message,
            )  # fmt: skip
            raise
        return user, teams, claims

    # --- the dashboard: the proxy runs the code flow itself, with its own callback ----------

    async def web_start(self, redirect_uri: str) -> tuple[str, str]:
        """The provider URL a browser is sent to, and the state its callback must bring."""
        cfg = self.settings()
        p = await self.provider()
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        now = self.clock()
        self._prune(now)
        self._pending[state] = _Pending(
            secrets.token_urlsafe(24), now, now + LOGIN_SECONDS, verifier, redirect_uri
        )
        query = {
            "response_type": "code", "client_id": cfg.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(cfg.scopes), "state": state, "nonce": self._pending[state].nonce,
            "code_challenge": create_s256_code_challenge(verifier),
            "code_challenge_method": "S256",
        }  # fmt: skip
        endpoint = str(p.metadata["authorization_endpoint"])
        sep = "&" if "?" in endpoint else "?"
        return endpoint + sep + urllib.parse.urlencode(query), state

    async def web_finish(self, state: str, code: str) -> Principal:
        """The callback: the code exchanged at the token endpoint (PKCE), its ID token
        checked like any other; the principal for a dashboard session."""
        cfg = self.settings()
        pending = self._pending.pop(state, None)

        async def exchange() -> str:
            assert pending is not None
            p = await self.provider()
            form = {"grant_type": "authorization_code", "code": code,
                    "redirect_uri": pending.redirect_uri, "code_verifier": pending.verifier,
                    "client_id": cfg.client_id}  # fmt: skip
            url = str(p.metadata["token_endpoint"])
            try:
                answer = await (self.post or post_form)(url, form, cfg.client_secret)
            except Exception as e:
                raise ProviderDown(cfg.issuer, _reason(e)) from None
            token = answer.get("id_token")
            if not isinstance(token, str):
                why = answer.get("error", "no id_token in its answer")
                raise refused(f"the provider did not give one ({why})")
            return token

        if pending is not None and not pending.verifier:
            pending = None  # a CLI sign-in's id is no dashboard state
        user, teams, claims = await self._accept(cfg, pending, "dashboard", exchange)
        principal = principal_for(self.config(), user, teams)
        assert principal is not None  # _accept refused a user in no team
        self.audit.record(
            "login", actor=user, method="oidc", flow="dashboard", issuer=cfg.issuer,
            subject=str(claims["sub"]), teams=list(principal.teams),
        )  # fmt: skip
        return principal

    def _prune(self, now: float) -> None:
        for k in [k for k, v in self._pending.items() if v.expires <= now]:
            del self._pending[k]
        while len(self._pending) >= MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    async def verify(
        self, cfg: OidcConfig, id_token: str, pending: _Pending, *, device: bool = False
    ) -> dict[str, Any]:
        """The ID token's claims, once signature, issuer, audience, times and nonce hold.

        The device flow (RFC 8628) has no nonce parameter, so its ID token may come without
        one (one that is there must match); it must then be issued after the sign-in started.
        Any ID token is accepted once only."""
        if not id_token or len(id_token) > MAX_ID_TOKEN or id_token.count(".") != 2:
            raise refused("not a signed JWT")
        p = await self.provider()
        algs = [a for a in p.metadata.get("id_token_signing_alg_values_supported", ["RS256"])
                if a in SIGNING_ALGS]  # fmt: skip
        token = await self._decode(id_token, p, algs)
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.clock()),
            leeway=int(cfg.leeway),
            iss={"essential": True, "value": cfg.issuer},
            aud={"essential": True},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": not device, "value": pending.nonce},
        )
        try:
            registry.validate(token.claims)
        except ExpiredTokenError:
            raise refused("it has expired") from None
        except MissingClaimError as e:
            raise refused(f"it has no {e.claim} claim") from None
        except InvalidClaimError as e:
            why = {
                "iss": f"its issuer is not {cfg.issuer}",
                "nonce": "its nonce is not this sign-in's",
                "iat": "it was issued in the future (beyond the clock-skew leeway)",
                "nbf": "it is not valid yet (beyond the clock-skew leeway)",
            }.get(e.claim, f"its {e.claim} claim is invalid")
            raise refused(why) from None
        except JoseError as e:
            raise refused(f"{e.error}") from None
        fresh = float(token.claims["iat"]) >= pending.started - cfg.leeway
        if "nonce" not in token.claims and not fresh:  # a nonce binds it to the sign-in
            raise refused("it was issued before this sign-in started")
        digest = hashlib.sha256(id_token.encode()).hexdigest()
        now = self.clock()
        for k in [k for k, until in self._seen.items() if until < now]:
            del self._seen[k]
        if digest in self._seen:
            raise refused("it was used already")
        aud = token.claims["aud"]
        audiences = [aud] if isinstance(aud, str) else list(aud)
        if cfg.client_id not in audiences:
            raise refused(f"its audience is not this proxy's client id ({cfg.client_id})")
        azp = token.claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != cfg.client_id:
            raise refused("its authorized party (azp) is not this proxy's client id")
        while len(self._seen) >= MAX_PENDING:
            del self._seen[next(iter(self._seen))]
        self._seen[digest] = float(token.claims["exp"]) + cfg.leeway
        return dict(token.claims)

    async def _decode(self, id_token: str, p: _Provider, algs: list[str]) -> jwt.Token:
        for attempt in (0, 1):
            assert p.keys is not None
            try:
                return jwt.decode(id_token, p.keys, algorithms=algs)
            except InvalidKeyIdError:
                if attempt == 0:  # the issuer may have rotated its keys since we read them
                    p = await self.provider(fresh_keys=True)
            except BadSignatureError:
                raise refused("its signature does not match the issuer's keys") from None
            except JoseError as e:
                raise refused(f"not a valid JWT of the issuer ({e.error})") from None
            except (ValueError, TypeError, KeyError, UnicodeError):
                raise refused("not a signed JWT") from None
        raise refused("it is signed with a key the issuer does not publish")

    @staticmethod
    def teams_for(cfg: OidcConfig, groups: object) -> tuple[str, ...]:
        """The teams the groups claim maps to (a string counts as one group)."""
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list):
            return ()
        return tuple(
            sorted({cfg.groups[g] for g in groups if isinstance(g, str) and g in cfg.groups})
        )


async def fetch_json(url: str) -> dict[str, Any]:
    """A provider document over HTTP(S): bounded in time and size, a JSON object or an error."""
    timeout = aiohttp.ClientTimeout(total=FETCH_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as r:
        if r.status != 200:
            raise OSError(f"HTTP {r.status} from {url}")
        raw = await r.content.read(MAX_DOCUMENT + 1)
        if len(raw) > MAX_DOCUMENT:
            raise OSError(f"{url}: document over {MAX_DOCUMENT} bytes")
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise OSError(f"{url}: not a JSON object")
        return doc


async def post_form(url: str, form: dict[str, str], secret: str | None) -> dict[str, Any]:
    """The token endpoint's JSON answer (an OAuth error answer too); bounded like fetch."""
    timeout = aiohttp.ClientTimeout(total=FETCH_SECONDS)
    auth = aiohttp.BasicAuth(form["client_id"], secret) if secret else None
    async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
        url, data=form, auth=auth
    ) as r:  # fmt: skip
        raw = await r.content.read(MAX_DOCUMENT + 1)
        doc = json.loads(raw) if len(raw) <= MAX_DOCUMENT else None
        if not isinstance(doc, dict):
            raise OSError(f"HTTP {r.status} from {url}: not a JSON object")
        return doc


def _flow(flow: str) -> str:
    return flow if flow in FLOWS else "other"


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text[:200]
