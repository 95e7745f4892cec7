"""Key material: format, hashing, display prefix, admin key and bearer parsing."""

from __future__ import annotations

import hashlib

from tenants.keys import bearer_token, check_admin_key, generate_key, hash_key, new_api_key
from tenants.periods import utc


def test_key_format_and_hash() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("pg-") and len(key) == 3 + 43
        assert set(key[3:]) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
    key = next(iter(keys))
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_key("")) == 64 and hash_key("\udcff") != hash_key("")


def test_new_api_key_stores_no_secret() -> None:
    key, record = new_api_key("acme", utc(0), "ci", None)
    dumped = record.model_dump_json()
    assert key not in dumped and key[3:] not in dumped
    assert record.key_hash == hash_key(key) and record.prefix == key[:7]
    assert record.key_id.startswith("key_") and "key_hash" not in record.public()
    assert key not in repr(record)


def test_admin_key() -> None:
    assert check_admin_key("s3cret", "s3cret")
    assert not check_admin_key("s3cre", "s3cret")
    assert not check_admin_key(None, "s3cret")
    assert not check_admin_key("anything", None)
    assert not check_admin_key("", "")


def test_bearer_token() -> None:
    assert bearer_token("Bearer pg-abc") == "pg-abc"
    assert bearer_token("bearer   pg-abc ") == "pg-abc"
    assert bearer_token("Basic xyz") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
