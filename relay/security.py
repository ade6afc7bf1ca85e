"""Relay access keys and per-request tokens: generation, hashing, constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web


def new_token() -> str:
    """A fresh random token: 192 bits, URL-safe."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, expected_hash: str | None) -> bool:
    if not token or not expected_hash:
        return False
    return hmac.compare_digest(hash_token(token), expected_hash)


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def relay_key(request: web.Request) -> str | None:
    """The relay access key a client sent: `X-RapidAPI-Key`, else `Authorization: Bearer`."""
    return request.headers.get("X-RapidAPI-Key") or bearer(request)


def key_allowed(key: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time check of `key` against every configured key."""
    if not key:
        return False
    found = False
    candidate = key.encode()
    for k in keys:
        found |= hmac.compare_digest(candidate, k.encode())
    return found
