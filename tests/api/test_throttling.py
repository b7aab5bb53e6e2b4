"""Rate limits per API key and scope: 429 with Retry-After and the API's error body;
counted in the cache, and let through (logged) when the cache is down."""

import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import redis
import time_machine
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from billing.api.throttling import ApiKeyRateThrottle, parse_rate
from billing.services.api_keys import api_key_create
from tests.factories import utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 6, 10, 12, 0, 0)
CHECK = "/api/v1/entitlements/check"


def keyed(scopes=None) -> APIClient:
    _, key = api_key_create(name="throttled", scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def low_limits(settings):
    settings.OVERAGE_API_RATES = {"ingest": "5/min", "read": "3/min", "admin": "2/min"}


def check(client):
    # The throttle runs before the view: an empty body (400) counts like any request.
    return client.post(CHECK, {}, format="json")


@time_machine.travel(NOW + timedelta(seconds=20), tick=False)
def test_over_the_limit_is_429_with_retry_after_and_the_error_body(low_limits):
    client = keyed(["ingest"])

    assert [check(client).status_code for _ in range(5)] == [400] * 5
    refused = check(client)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert set(refused.json()["error"]) == {"code", "message", "field"}
    assert refused["Retry-After"] == "40"  # the minute's window ends 40 s from now


def test_the_window_reopens_after_retry_after(low_limits):
    client = keyed(["ingest"])
    with time_machine.travel(NOW, tick=False):
        for _ in range(5):
            check(client)
        assert check(client).status_code == 429
    with time_machine.travel(NOW + timedelta(seconds=59), tick=False):
        assert check(client).status_code == 429
    with time_machine.travel(NOW + timedelta(seconds=60), tick=False):
        assert check(client).status_code == 400


@time_machine.travel(NOW, tick=False)
def test_each_key_has_its_own_allowance(low_limits):
    first, second = keyed(["ingest"]), keyed(["ingest"])
    for _ in range(5):
        check(first)

    assert check(first).status_code == 429
    assert check(second).status_code == 400


@time_machine.travel(NOW, tick=False)
def test_each_scope_has_its_own_allowance_and_rate(low_limits):
    """An all-scopes key that used up its admin requests can still ingest and read."""
    client = keyed()
    assert [client.post("/api/v1/features", {}, format="json").status_code for _ in range(3)] == [400, 400, 429]

    assert [client.get("/api/v1/plans").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [check(client).status_code for _ in range(6)] == [400] * 5 + [429]


@time_machine.travel(NOW, tick=False)
def test_requests_refused_for_their_key_or_scope_are_not_counted(low_limits):
    client = keyed(["read"])
    for _ in range(10):
        assert check(client).status_code == 403  # insufficient_scope, before the throttle
    assert APIClient().get("/api/v1/plans").status_code == 401

    assert client.get("/api/v1/plans").status_code == 200


@time_machine.travel(NOW, tick=False)
def test_a_rate_of_off_means_no_limit(settings):
    settings.OVERAGE_API_RATES = {"ingest": "off", "read": "1/min", "admin": "1/min"}
    client = keyed(["ingest"])

    assert {check(client).status_code for _ in range(50)} == {400}


def test_default_limits_are_highest_for_ingestion_and_lowest_for_admin():
    rates = {scope: parse_rate(rate) for scope, rate in django_settings.OVERAGE_API_RATES.items()}
    per_second = {scope: count / seconds for scope, (count, seconds) in rates.items()}

    assert per_second["ingest"] > per_second["read"] > per_second["admin"]
    assert per_second["ingest"] >= 1000  # a busy integrator's single events and checks


@pytest.mark.parametrize("rate, parsed", [
    ("6000/min", (6000, 60)), ("10/s", (10, 1)), ("100/10s", (100, 10)), ("5/hour", (5, 3600)),
    ("1/day", (1, 86400)), ("off", None), ("", None),
])
def test_rates_are_parsed(rate, parsed):
    assert parse_rate(rate) == parsed


@pytest.mark.parametrize("rate", ["6000", "6000/fortnight", "-1/min", "0/min", "many/min"])
def test_a_bad_rate_is_refused(rate):
    with pytest.raises(ValueError):
        parse_rate(rate)


def settings_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(sorted(settings.OVERAGE_API_RATES.items()))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("OVERAGE_RATE_")}
    return subprocess.run([sys.executable, "-c", code], env={**base, "DJANGO_SETTINGS_MODULE": "config.settings",
                                                              **env},
                          capture_output=True, text=True, timeout=60, cwd=django_settings.BASE_DIR)


def test_limits_come_from_the_environment():
    done = settings_in_subprocess({"OVERAGE_RATE_INGEST": "6000/min", "OVERAGE_RATE_READ": "50/s",
                                   "OVERAGE_RATE_ADMIN": "off"})

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('admin', 'off'), ('ingest', '6000/min'), ('read', '50/s')]"


def test_a_mistyped_limit_stops_the_start():
    done = settings_in_subprocess({"OVERAGE_RATE_ADMIN": "60 per minute"})

    assert done.returncode != 0
    assert "OVERAGE_RATE_ADMIN must be a rate" in done.stderr


# --- The cache ----------------------------------------------------------------------------

@pytest.fixture
def cache_down(settings, monkeypatch):
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    monkeypatch.setattr(ApiKeyRateThrottle, "_last_warning", float("-inf"))  # one warning per minute


@time_machine.travel(NOW, tick=False)
def test_with_the_cache_down_the_api_answers_unthrottled_and_says_so_once(low_limits, cache_down, caplog):
    """Fail open: a rate limit exists to protect the API, and must not take ingestion down
    while Redis restarts. One warning per process per minute, not one per request."""
    client = keyed(["ingest"])
    with caplog.at_level(logging.WARNING, logger="billing.api.throttling"):
        statuses = [check(client).status_code for _ in range(8)]
        plans = keyed(["read"]).get("/api/v1/plans")

    assert statuses == [400] * 8 and plans.status_code == 200
    warnings = [r for r in caplog.records if r.name == "billing.api.throttling"]
    assert len(warnings) == 1 and "cache is unreachable" in warnings[0].getMessage()


def redis_or_skip(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis at {url}")


@time_machine.travel(NOW, tick=False)
def test_counted_in_redis_the_limit_holds_across_processes(low_limits, settings):
    """Two web processes share the Redis counter: a second process's first request after
    the first process used up the allowance is refused (a fresh client of its own)."""
    url = "redis://127.0.0.1:6379/13"
    redis_or_skip(url)
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": url}}
    redis.Redis.from_url(url).flushdb()
    _, key = api_key_create(name="shared", scopes=["ingest"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    for _ in range(5):
        assert check(client).status_code == 400

    # What another process would see: the counter in Redis, read by a client of its own.
    counters = {k.decode(): int(redis.Redis.from_url(url).get(k)) for k in redis.Redis.from_url(url).keys("*throttle*")}
    assert list(counters.values()) == [5]
    assert 0 < redis.Redis.from_url(url).ttl(next(iter(counters))) <= 61
    assert check(client).status_code == 429
    redis.Redis.from_url(url).flushdb()
