"""Models: quota validation and PATCH semantics."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tenants import Quota, TenantUpdate


def test_quota_fields_are_optional_positive_ints() -> None:
    assert Quota().limits() == {}
    q = Quota(requests_per_minute=1, tokens_per_month=10**15)
    assert q.limits() == {"requests_per_minute": 1, "tokens_per_month": 10**15}
    for bad in (0, -1, 10**15 + 1, True, 1.0, "3"):
        with pytest.raises(ValidationError):
            Quota(requests_per_minute=bad)
    with pytest.raises(ValidationError):
        Quota.model_validate({"max_kv_cache_blocks": 3})
    assert set(Quota.model_fields) == {
        "requests_per_minute",
        "tokens_per_minute",
        "max_concurrent_requests",
        "tokens_per_day",
        "tokens_per_month",
        "max_tokens_per_request",
        "max_prefixes",
        "max_pinned_blocks",
        "max_kv_blocks",
        "priority",
        "weight",
    }


def test_priority_and_weight_are_bounded_ints_null_means_default() -> None:
    q = Quota(priority=-3, weight=4)
    assert (q.priority, q.weight) == (-3, 4)
    assert Quota().priority is None and Quota().weight is None
    for field, bad in (("priority", 1001), ("priority", 1.5), ("weight", 0), ("weight", 1001)):
        with pytest.raises(ValidationError):
            Quota.model_validate({field: bad})


def test_quota_from_json_accepts_null_as_unlimited() -> None:
    q = Quota.model_validate_json('{"tokens_per_day": null, "requests_per_minute": 60}')
    assert q.limits() == {"requests_per_minute": 60}


def test_tenant_update_changes_only_sent_fields() -> None:
    assert TenantUpdate.model_validate({}).changes() == {}
    assert TenantUpdate.model_validate({"name": None}).changes() == {"name": None}
    assert TenantUpdate.model_validate({"quota": None, "disabled": False}).changes() == {
        "disabled": False
    }
