"""Tests that need a real Redis (CI has one; a laptop without it skips them)."""

import os

import redis


def redis_url(db: int) -> str:
    """A Redis database of its own for a test module, on the server REDIS_URL names."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + f"/{db}"


def redis_up(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False
