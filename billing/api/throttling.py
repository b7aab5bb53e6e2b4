"""Rate limits per API key, by the scope the endpoint needs.

A key may send OVERAGE_API_RATES[scope] requests per window to the endpoints of that
scope: ingestion (events, entitlement checks) high, reads medium, admin writes low. A
batch of events is one request. The counters live in the cache (Redis in production, so
every web process shares them).

Fixed windows, one counter each: two cache calls per request (INCR and, once per
window, ADD), where DRF's SimpleRateThrottle reads and rewrites a list of every
request's timestamp, which at ingestion rates is thousands of floats per request. The
price is that a key may burst to twice its rate across a window boundary.

When the cache cannot be reached the request is let through and a warning logged: a
rate limit protects the API, and must not be the thing that takes ingestion down while
Redis restarts (the entitlement checks go on from PostgreSQL then, see positions.py).
"""

import logging
import math
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle

from billing.models import ApiKey
from config.env import parse_rate

logger = logging.getLogger(__name__)

# Set in the WSGI environ by the entitlement check's fast lane (billing/api/fast_lane.py)
# when it has already counted the request: (allowed, wait). A client cannot set it (its
# headers arrive as HTTP_* keys).
LANE_DECISION = "overage.rate_limit_decision"


class ApiKeyRateThrottle(BaseThrottle):
    cache_prefix = "throttle:api"
    # At most one "cache down" warning per process per this many seconds: during an
    # outage every request would log one.
    warn_every_seconds = 60
    _last_warning = float("-inf")

    def __init__(self):
        self._wait = None

    @staticmethod
    def scope_of(request, view) -> str | None:
        """The scope HasApiKeyScope checked for this request."""
        return getattr(view, "required_scopes", {}).get(request.method) or getattr(view, "required_scope", None)

    def allow_request(self, request, view) -> bool:
        decided = request.META.get(LANE_DECISION)
        if decided is not None:  # counted once already, by the fast lane
            allowed, self._wait = decided
            return allowed
        api_key = request.auth
        scope = self.scope_of(request, view)
        if not isinstance(api_key, ApiKey) or scope is None:
            return True  # refused before this by authentication or permission
        limit = parse_rate(settings.OVERAGE_API_RATES.get(scope))
        if limit is None:
            return True
        count_allowed, window = limit
        now = time.time()
        window_start = int(now // window) * window
        key = f"{self.cache_prefix}:{scope}:{api_key.pk}:{window}:{window_start}"
        try:
            count = self._increment(key, timeout=window + 1)
        except Exception as error:  # noqa: BLE001 - any cache failure: fail open
            self._warn_cache_down(error)
            return True
        if count <= count_allowed:
            return True
        self._wait = max(1, math.ceil(window_start + window - now))
        return False

    @staticmethod
    def _increment(key: str, timeout: int) -> int:
        try:
            return cache.incr(key)
        except ValueError:  # the window's first request (Django's incr needs the key)
            if cache.add(key, 1, timeout=timeout):
                return 1
            return cache.incr(key)  # another request created it meanwhile

    @classmethod
    def _warn_cache_down(cls, error: Exception) -> None:
        now = time.monotonic()
        if now - cls._last_warning >= cls.warn_every_seconds:
            cls._last_warning = now
            logger.warning("API rate limits are off: the cache is unreachable (%s: %s); requests are let through",
                           type(error).__name__, error)

    def wait(self) -> int | None:
        return self._wait
