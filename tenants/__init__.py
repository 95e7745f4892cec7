"""Tenants: API keys, quotas enforced atomically in Redis (or in process), and usage.

The gateway builds one `TenantService` (`build_service(settings.tenants_config())`) and calls it;
see `service.py` for the per-request flow and `README.md` for the window semantics.
"""

from .config import TenantsConfig, build_service, build_store
from .errors import (
    AuthenticationError,
    ConflictError,
    InvalidError,
    KeyNotFound,
    NotFoundError,
    PrefixLimitExceeded,
    PrefixNotFound,
    StoreUnavailable,
    TenantNotFound,
    TenantsError,
)
from .failover import FailureMode, StoreStats
from .keys import bearer_token, check_admin_key
from .memory_store import MemoryStore
from .models import (
    DEFAULT_TENANT_ID,
    ApiKey,
    IssuedKey,
    KeyCreate,
    MinuteUsage,
    PeriodUsage,
    Prefix,
    PrefixSpec,
    Quota,
    Tenant,
    TenantCreate,
    TenantUpdate,
    Usage,
)
from .quotas import AdmissionDecision, Limit
from .redis_store import RedisStore
from .service import Caller, PrefixRegistration, TenantService
from .store import Store, Ticket

__all__ = [
    "DEFAULT_TENANT_ID",
    "AdmissionDecision",
    "ApiKey",
    "AuthenticationError",
    "Caller",
    "ConflictError",
    "FailureMode",
    "InvalidError",
    "IssuedKey",
    "KeyCreate",
    "KeyNotFound",
    "Limit",
    "MemoryStore",
    "MinuteUsage",
    "NotFoundError",
    "PeriodUsage",
    "Prefix",
    "PrefixLimitExceeded",
    "PrefixNotFound",
    "PrefixRegistration",
    "PrefixSpec",
    "Quota",
    "RedisStore",
    "Store",
    "StoreStats",
    "StoreUnavailable",
    "Tenant",
    "TenantCreate",
    "TenantNotFound",
    "TenantService",
    "TenantUpdate",
    "TenantsConfig",
    "TenantsError",
    "Ticket",
    "Usage",
    "bearer_token",
    "build_service",
    "build_store",
    "check_admin_key",
]
