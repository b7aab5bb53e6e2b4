"""The production cache (config.cache.RedisCache over a real Redis): cached credit
positions stay right, and the process keeps one redis-py client per pool instead of
building one per call."""

from decimal import Decimal

import pytest
import time_machine
from django.core.cache import caches

from tests.billing.test_positions import NOW, acme, check, event  # noqa: F401 - fixture
from tests.redis_support import redis_up, redis_url

REDIS_URL = redis_url(14)



pytestmark = [pytest.mark.django_db,
              pytest.mark.skipif(not redis_up(REDIS_URL), reason="needs Redis on 127.0.0.1:6379")]


@pytest.fixture
def redis_cache(settings):
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": REDIS_URL}}
    settings.OVERAGE_POSITION_CACHE_SECONDS = 30
    cache = caches["default"]
    cache.clear()
    yield cache
    cache.clear()


def test_one_client_serves_every_call(redis_cache):
    redis_cache.set_many({"a": 1, "b": Decimal("2.5")})
    assert redis_cache.get_many(["a", "b", "c"]) == {"a": 1, "b": Decimal("2.5")}
    client = redis_cache._cache.get_client(write=False)
    assert redis_cache._cache.get_client(write=True) is client
    redis_cache.delete("a")
    assert redis_cache.get("a") is None


@time_machine.travel(NOW, tick=False)
def test_checks_from_positions_cached_in_redis_follow_every_event(acme, redis_cache, django_assert_num_queries):
    assert check().credits_remaining == Decimal("10000")
    with django_assert_num_queries(0):
        assert check().credits_remaining == Decimal("10000")  # from Redis
    assert any(key for key in redis_cache._cache.get_client().keys("*"))
    event("e1", "999")  # 9 990 credits
    assert check().credits_remaining == Decimal("10")
    event("e2", "2")  # 20 credits: 10 overage
    decision = check()
    assert decision.credits_remaining == Decimal("0") and decision.reason == "overage"
