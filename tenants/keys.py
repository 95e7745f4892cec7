"""API key material: generation, hashing and constant-time checks.

A key is `pg-` + 32 random bytes (urlsafe base64, 43 characters). Only its SHA-256 (hex) is stored
and looked up; the plaintext exists once, in the response that issues it. SHA-256 without salt is
enough here: the key has 256 bits of entropy, so there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from .models import ApiKey

KEY_PREFIX = "pg-"
KEY_RANDOM_BYTES = 32
DISPLAY_CHARS = 7  # "pg-" + 4 random characters, shown in listings


def generate_key() -> str:
    """A new secret API key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    """SHA-256 hex of a presented or issued key (any string, even empty, is hashed)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key_id() -> str:
    """Public identifier of a key, used in admin URLs."""
    return "key_" + secrets.token_hex(8)


def new_api_key(
    tenant_id: str, now: datetime, name: str | None, expires_at: datetime | None
) -> tuple[str, ApiKey]:
    """Generate a key and the record to store for it; returns (plaintext, record)."""
    key = generate_key()
    record = ApiKey(
        key_id=new_key_id(),
        tenant_id=tenant_id,
        key_hash=hash_key(key),
        prefix=key[:DISPLAY_CHARS],
        name=name,
        created_at=now,
        expires_at=expires_at,
    )
    return key, record


def digests_match(expected_hex: str, presented_hex: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(expected_hex.encode(), presented_hex.encode())


def check_admin_key(presented: str | None, admin_key: str | None) -> bool:
    """True when `presented` equals the configured admin key (constant time; False if unset)."""
    if not admin_key:
        hash_key(presented or "")  # same work either way
        return False
    return digests_match(hash_key(admin_key), hash_key(presented or ""))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
