"""Shared fixtures and hypothesis settings."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

from tests.backends import backend, shared_backend  # noqa: E402,F401 - the contract-suite fixtures
from tests.postgres_servers import own_postgres, pg_schema, postgres_url  # noqa: E402,F401
from tests.redis_servers import redis_cluster_url, redis_url  # noqa: E402,F401
