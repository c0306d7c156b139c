"""API keys: generated with 256 random bits, stored only as SHA-256; and, optionally per key, an
access key / secret key pair for seed 001-style JWT auth.

A JWT client (SenseTime's AK/SK scheme, unchanged) sends ``Authorization: Bearer <JWT>``: header
``{"alg": "HS256", "typ": "JWT"}``, claims ``iss`` = its access key, ``exp`` and (optionally, as
seed 001 has it) ``nbf``, signed with its secret key. The rules, each refused with a 401:

- the algorithm is HS256 and nothing else (no ``none``, no RSA/EC key confusion);
- ``iss`` names an access key of a key that is not revoked; the signature verifies with its
  secret key;
- ``exp`` is required and not past; ``nbf`` and ``iat``, when present, are not in the future; both
  with ``LEEWAY`` seconds for clock skew;
- ``exp`` is at most ``MAX_TOKEN_LIFETIME`` ahead: a token is a short-lived credential (seed 001
  signs each for 30 minutes), and one that never expires would be a second, unrevocable-in-
  practice key that leaks through every log and proxy that sees headers.

Every key has a role (contract v1.1): a ``client`` key (the default) acts for its client only; an
``admin`` key (``AIORCH_ADMIN_KEYS``, or ``aiorch keys create NAME --admin``, stored in
``api_keys.admin``) acts for its own client too, and may also read, list, cancel and delete every
client's jobs. A JWT has the role of the key whose access key signs it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from types import ModuleType

from sqlalchemy import select

from models.db import Database, utcnow
from models.jobs import ApiKey

KEY_PREFIX = "aio_"
ACCESS_KEY_PREFIX = "ak_"
SECRET_KEY_PREFIX = "sk_"
JWT_ALGORITHM = "HS256"
# Seconds of clock difference tolerated between a client and us on exp, nbf and iat.
LEEWAY = 5
# The furthest ahead a token's exp may be (seconds from now).
MAX_TOKEN_LIFETIME = 24 * 3600
# One message for an unknown access key, a revoked key and a bad signature, so a caller cannot
# tell which access keys exist.
INVALID_TOKEN = "The token's access key or signature is not valid."


@dataclass(frozen=True)
class Caller:
    """Who a request's key speaks for: its client, and whether it is an admin key."""

    client_id: str
    admin: bool = False


class TokenRefused(Exception):
    """A bearer token that is a JWT, refused; the message says why, for the client to fix."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _pyjwt() -> ModuleType:
    """PyJWT, imported on the first token only: importing it loads ``cryptography`` (about 10 MB
    of RSS in every API process), and a request with a plain API key never needs it."""
    import jwt

    return jwt


def _jwt_header(token: str) -> dict[str, object] | None:
    """The header of ``token`` when it is shaped like a JWT, else None (then it is a plain key:
    ours have no dots, and no plain key decodes to a JSON header)."""
    if token.count(".") != 2:
        return None
    jwt = _pyjwt()
    try:
        return jwt.get_unverified_header(token)
    except jwt.DecodeError:
        return None


class KeyRing:
    """Resolves a presented key to its caller: static keys from settings (``AIORCH_API_KEYS``,
    ``AIORCH_ADMIN_KEYS``), then the database; a JWT through the access key it names."""

    def __init__(
        self,
        db: Database,
        static_keys: tuple[tuple[str, str], ...] = (),
        admin_keys: tuple[tuple[str, str], ...] = (),
    ):
        self.db = db
        # Static keys are hashed too, so the comparison below is the same constant-time one.
        self.static = [(Caller(client), hash_key(key)) for client, key in static_keys] + [
            (Caller(client, admin=True), hash_key(key)) for client, key in admin_keys
        ]

    def client_for(self, key: str) -> str | None:
        """The client ``key`` belongs to, or None. A JWT that is refused raises ``TokenRefused``."""
        caller = self.caller_for(key)
        return None if caller is None else caller.client_id

    def caller_for(self, key: str) -> Caller | None:
        """The client and role of ``key``, or None. A JWT that is refused raises ``TokenRefused``."""
        if not key:
            return None
        header = _jwt_header(key)
        if header is not None:
            return self.caller_for_token(key, header)
        digest = hash_key(key)
        for caller, stored in self.static:
            if hmac.compare_digest(digest, stored):
                return caller
        with self.db.session() as session:
            row = session.execute(
                select(ApiKey.client_id, ApiKey.admin).where(
                    ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else Caller(str(row.client_id), bool(row.admin))

    def caller_for_token(self, token: str, header: dict[str, object]) -> Caller:
        """The caller of a seed 001-style JWT (module docstring), or ``TokenRefused``."""
        if header.get("alg") != JWT_ALGORITHM:
            raise TokenRefused(f"The token must be signed with {JWT_ALGORITHM}.")
        jwt = _pyjwt()
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise TokenRefused("The token is not a valid JWT.") from None
        access_key = unverified.get("iss")
        if not isinstance(access_key, str) or not access_key:
            raise TokenRefused("The token has no iss claim (your access key).")
        with self.db.session() as session:
            row = session.execute(
                select(ApiKey.client_id, ApiKey.secret_key, ApiKey.admin).where(
                    ApiKey.access_key == access_key,
                    ApiKey.secret_key.is_not(None),
                    ApiKey.revoked_at.is_(None),
                )
            ).first()
        if row is None or not row.secret_key:
            raise TokenRefused(INVALID_TOKEN)
        caller, secret_key = Caller(str(row.client_id), bool(row.admin)), str(row.secret_key)
        try:
            claims = jwt.decode(
                token,
                secret_key,
                algorithms=[JWT_ALGORITHM],
                leeway=LEEWAY,
                options={"require": ["exp", "iss"]},
            )
        except jwt.InvalidSignatureError:
            raise TokenRefused(INVALID_TOKEN) from None
        except jwt.ExpiredSignatureError:
            raise TokenRefused("The token has expired (exp); sign a new one.") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("The token is not valid yet (nbf or iat is in the future).") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"The token has no {exc.claim} claim.") from None
        except jwt.InvalidTokenError as exc:
            # Malformed claims (a non-integer exp, say): PyJWT's message names the claim.
            raise TokenRefused(f"The token is not valid: {exc}") from None
        if int(claims["exp"]) > time.time() + MAX_TOKEN_LIFETIME + LEEWAY:
            raise TokenRefused(
                f"The token's exp is more than {MAX_TOKEN_LIFETIME} s ahead; sign tokens that expire sooner."
            )
        return caller

    def create(
        self, client_id: str, label: str | None = None, jwt_auth: bool = False, admin: bool = False
    ) -> tuple[ApiKey, str]:
        """A new key for ``client_id``; returns the row and the key (shown once, stored hashed).
        With ``jwt_auth`` the row also holds a new access key / secret key pair; with ``admin`` it
        is an admin key."""
        key = generate_key()
        row = ApiKey(client_id=client_id, key_hash=hash_key(key), prefix=key[:10], label=label, admin=admin)
        if jwt_auth:
            row.access_key = ACCESS_KEY_PREFIX + secrets.token_urlsafe(18)
            row.secret_key = SECRET_KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.session() as session:
            session.add(row)
        return row, key

    def list(self) -> list[ApiKey]:
        with self.db.session() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))

    def revoke(self, key_id: int) -> bool:
        with self.db.session() as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def any_configured(self) -> bool:
        if self.static:
            return True
        with self.db.session() as session:
            return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
