"""Relay access keys and per-request tokens: generation, hashing, constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from .config import ApiKey


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


def find_key(key: str | None, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The configured key equal to `key`, compared in constant time against every key."""
    if not key:
        return None
    found = None
    candidate = key.encode()
    for k in keys:
        if hmac.compare_digest(candidate, k.key.encode()):
            found = k
    return found
