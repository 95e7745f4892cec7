"""The admin API under `/admin` (tenants, keys, quotas, usage) and `prefixgate admin`."""
