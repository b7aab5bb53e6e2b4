"""Brute-force protection for logging in (the portal's and the admin's login forms).

After OVERAGE_LOGIN_MAX_FAILURES failed attempts for one username from one client
address within OVERAGE_LOGIN_WINDOW_SECONDS, further attempts for that pair are refused
for OVERAGE_LOGIN_LOCKOUT_SECONDS without checking the password, and the login page
answers 429 with Retry-After and says why. One address failing for many usernames
(credential stuffing) is refused too after OVERAGE_LOGIN_MAX_FAILURES_PER_ADDRESS.
Keyed by username and address together, so nobody can lock a customer out of their own
account from elsewhere by failing on purpose.

Built the way django-axes is (a gate authentication backend that refuses while locked
out, failures counted from Django's `user_login_failed` signal, a middleware that turns
the refusal into a 429), on the cache rather than a new dependency with its own tables:
the counters are short-lived, and Redis (production) shares them between processes.
If the cache is unreachable, logins go on unthrottled and a warning is logged: an
outage of Redis must not lock every customer out of the portal.
"""

import hashlib
import logging
import math
import time

from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver

logger = logging.getLogger(__name__)
_PREFIX = "login-throttle"


class LoginLockedOut(PermissionDenied):
    """Refused without checking the password: too many recent failures."""


def client_address(request) -> str:
    """REMOTE_ADDR, or the header a trusted proxy sets (OVERAGE_LOGIN_IP_HEADER, e.g.
    HTTP_X_REAL_IP): behind a proxy every REMOTE_ADDR is the proxy's."""
    header = settings.OVERAGE_LOGIN_IP_HEADER
    value = request.META.get(header, "") if header else ""
    return (value.split(",")[0].strip() or request.META.get("REMOTE_ADDR", "")) if request is not None else ""


def _keys(username: str, address: str) -> tuple[str, str]:
    """Cache keys of the (username, address) pair and of the address alone; hashed, so
    a username of any length or alphabet makes a valid key."""
    pair = hashlib.sha256(f"{username.strip().lower()}\0{address}".encode()).hexdigest()
    return f"{_PREFIX}:pair:{pair}", f"{_PREFIX}:addr:{hashlib.sha256(address.encode()).hexdigest()}"


def locked_until(username: str, address: str) -> float | None:
    """When the lockout of this pair (or address) ends, or None if it is not locked."""
    pair, addr = _keys(username, address)
    try:
        ends = cache.get_many([f"{pair}:lock", f"{addr}:lock"])
    except Exception as error:  # noqa: BLE001 - any cache failure: fail open
        _warn_cache_down(error)
        return None
    latest = max(ends.values(), default=None)
    return latest if latest is not None and latest > time.time() else None


def record_failure(username: str, address: str) -> None:
    pair, addr = _keys(username, address)
    window = settings.OVERAGE_LOGIN_WINDOW_SECONDS
    try:
        for key, limit in ((pair, settings.OVERAGE_LOGIN_MAX_FAILURES),
                           (addr, settings.OVERAGE_LOGIN_MAX_FAILURES_PER_ADDRESS)):
            cache.add(f"{key}:failures", 0, timeout=window)
            try:
                failures = cache.incr(f"{key}:failures")
            except ValueError:  # expired between add and incr
                cache.add(f"{key}:failures", 1, timeout=window)
                failures = 1
            if failures >= limit:
                lockout = settings.OVERAGE_LOGIN_LOCKOUT_SECONDS
                cache.set(f"{key}:lock", time.time() + lockout, timeout=lockout)
                cache.delete(f"{key}:failures")
                logger.warning("Login locked for %s s after %s failures (%s)", lockout, failures,
                               "username and address" if key == pair else f"address {address}")
    except Exception as error:  # noqa: BLE001
        _warn_cache_down(error)


def forget_failures(username: str, address: str) -> None:
    """A successful login clears the pair's failures (not the address's)."""
    pair, _ = _keys(username, address)
    try:
        cache.delete(f"{pair}:failures")
    except Exception as error:  # noqa: BLE001
        _warn_cache_down(error)


_last_warning = [float("-inf")]


def _warn_cache_down(error: Exception) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= 60:  # once a minute, not once per login
        _last_warning[0] = now
        logger.warning("Login throttling is off: the cache is unreachable (%s: %s)", type(error).__name__, error)


class LoginThrottleBackend:
    """First in AUTHENTICATION_BACKENDS: authenticates nobody, but refuses (and so stops
    Django trying the other backends) while the pair is locked out."""

    def authenticate(self, request, username=None, **credentials):
        if request is None or username is None:
            return None
        ends = locked_until(username, client_address(request))
        if ends is not None:
            request.login_locked_out = ends  # for the middleware
            request.login_retry_minutes = max(1, math.ceil((ends - time.time()) / 60))  # for the page
            raise LoginLockedOut
        return None

    # No get_user(): sessions (and the test client's force_login, which picks the first
    # backend that has one) belong to the backend that authenticated the user.


@receiver(user_login_failed, dispatch_uid="portal.login_throttle.failed")
def _count_failure(sender, credentials, request=None, **kwargs):
    username = credentials.get("username")
    if request is None or username is None or getattr(request, "login_locked_out", None):
        return  # an attempt refused while locked out does not extend the lockout
    record_failure(username, client_address(request))


@receiver(user_logged_in, dispatch_uid="portal.login_throttle.logged_in")
def _forget_failures(sender, request, user, **kwargs):
    if request is not None:
        forget_failures(user.get_username(), client_address(request))


class LoginLockoutMiddleware:
    """A login page answering a locked-out attempt gets 429 and Retry-After (the page
    itself, templates/registration/login.html, says why)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        ends = getattr(request, "login_locked_out", None)
        if ends is not None and response.status_code == 200:
            response.status_code = 429
            response["Retry-After"] = str(max(1, math.ceil(ends - time.time())))
        return response

