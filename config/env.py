"""Strict readers for settings taken from the environment.

Each fails loudly on a value it cannot parse: a billing system must not start with a
silently misread setting.
"""

import os
import re
from functools import lru_cache
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
               "d": 86400, "day": 86400}
_RATE = re.compile(rf"([1-9][0-9]*)/([1-9][0-9]*)?({'|'.join(_RATE_UNITS)})")


@lru_cache(maxsize=64)  # read on every throttled API request: parse each setting once
def parse_rate(rate: str | None) -> tuple[int, int] | None:
    """'6000/min' → (6000, 60), '100/10s' → (100, 10); None, '', 'off' or 'none' → None
    (no limit). Raises ValueError on anything else."""
    if rate is None or rate.strip().lower() in ("", "off", "none"):
        return None
    match = _RATE.fullmatch(rate.strip())
    if match is None:
        raise ValueError(f"a rate is 'N/s', 'N/min', 'N/h' or 'N/day' (or 'off'), got {rate!r}")
    count, multiple, unit = match.groups()
    return int(count), _RATE_UNITS[unit] * int(multiple or 1)


def env_rate(name: str, default: str) -> str:
    """A request rate such as '6000/min' (see `parse_rate`), or 'off'; an empty or
    mistyped value stops the start rather than the limit."""
    value = env_str(name, default).strip()
    try:
        if not value:
            raise ValueError(value)
        parse_rate(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a rate such as '6000/min' or 'off', got {value!r}") from None
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def email_settings_from_url(url: str) -> dict:
    """Turn an EMAIL_URL such as ``smtp+tls://user:pass@smtp.example.com:587`` into
    Django EMAIL_* settings. Schemes: console, locmem, dummy, smtp, smtp+tls, smtp+ssl."""
    parsed = urlparse(url)
    backends = {
        "console": "django.core.mail.backends.console.EmailBackend",
        "locmem": "django.core.mail.backends.locmem.EmailBackend",
        "dummy": "django.core.mail.backends.dummy.EmailBackend",
        "smtp": "django.core.mail.backends.smtp.EmailBackend",
        "smtp+tls": "django.core.mail.backends.smtp.EmailBackend",
        "smtp+ssl": "django.core.mail.backends.smtp.EmailBackend",
    }
    if parsed.scheme not in backends:
        raise ImproperlyConfigured(
            f"EMAIL_URL scheme must be one of {sorted(backends)}, got {parsed.scheme!r}"
        )
    result = {"EMAIL_BACKEND": backends[parsed.scheme]}
    if parsed.scheme.startswith("smtp"):
        query = parse_qs(parsed.query)
        result.update(
            EMAIL_HOST=parsed.hostname or "localhost",
            EMAIL_PORT=parsed.port or 25,
            EMAIL_HOST_USER=unquote(parsed.username or ""),
            EMAIL_HOST_PASSWORD=unquote(parsed.password or ""),
            EMAIL_USE_TLS=parsed.scheme == "smtp+tls" or query.get("tls") == ["1"],
            EMAIL_USE_SSL=parsed.scheme == "smtp+ssl" or query.get("ssl") == ["1"],
        )
    return result
