"""Tenancy at the HTTP edge: API-key authentication, quota hooks, `/v1/usage`."""
