"""The test Redis: each test session gets its own database number and key prefix on it."""

import os
import secrets

REDIS_URL = os.environ.get("QADISTILL_TEST_REDIS", "redis://127.0.0.1:6379")


def private_broker(prefix: str) -> dict[str, str]:
    """Settings fields for a broker no other test session shares: a random Redis database and key prefix."""
    return {
        "broker_url": f"{REDIS_URL}/{secrets.randbelow(15) + 1}",
        "broker_key_prefix": f"{prefix}-{secrets.token_hex(4)}:",
    }
