"""The entitlement check's fast lane: `POST /api/v1/entitlements/check` answered without
Django's URL routing, middleware stack and DRF's request cycle.

Integrators ask before every call they serve, so the check's cost per request sets how
many a machine can answer. Through the full stack a check cost about 1 ms of CPU, of
which the decision itself (a Redis read of two tokens and `plan_charge`) was a fifth.

The lane serves only the plain, successful case, with the same code the API view runs:
`ApiKeyAuthentication`, `HasApiKeyScope`, `ApiKeyRateThrottle`, `validated_check`,
`check_entitlement`, `entitlement_result`, DRF's JSON renderer, and Django's security
common and clickjacking middleware for the response headers. Anything else — no or a bad key,
a missing scope, a throttled key, a host or scheme Django would refuse or redirect, a
body that is not plain JSON, a validation error, a reservation, an unknown customer —
goes to the full stack untouched (the body re-wound), which answers it exactly as
before. Tests send every such request both ways and compare status, headers and body.
"""

import io
import logging
from types import SimpleNamespace

from django.conf import settings
from django.core import signals
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils import timezone
from django.urls import resolve
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.renderers import JSONRenderer

from billing.api import serializers as s
from billing.api.auth import ApiKeyAuthentication, CachedApiKeyAuthentication, HasApiKeyScope
from billing.api.negotiation import ACCEPTS_JSON
from billing.api.throttling import LANE_DECISION, ApiKeyRateThrottle
from billing.errors import BillingError, NeedsDatabase
from billing.services.entitlements import check_entitlement

logger = logging.getLogger(__name__)

CHECK_PATH = "/api/v1/entitlements/check"
EVENTS_PATH = "/api/v1/events"
# A check's body is under 600 bytes; anything larger is the full stack's to read.
MAX_BODY_BYTES = 4096
# The middleware whose effect on a plain check the lane reproduces (the portal-only ones
# pass API requests through). Any other stack disables the lane: a middleware added
# later (CORS, request ids, an IP allowlist) must not be bypassed without anyone noticing.
MIDDLEWARE = (
    "billing.api.middleware.ApiBodySizeLimit",
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "config.middleware.AuthenticationMiddleware",
    "config.middleware.LoginLockoutMiddleware",
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.middleware.HtmxMiddleware",
)


class EntitlementCheckFastLane:
    """WSGI middleware in front of Django's handler (config/wsgi.py)."""

    def __init__(self, django_app):
        self.django_app = django_app
        self.served = 0  # checks answered here (tests and benchmarks read it; approximate under threads)
        self.served_inline = 0  # of which on the check server's event loop (answer_inline)
        self._renderer = JSONRenderer()
        # The answer's headers, as the full stack's middleware set them (Content-Length,
        # security headers, X-Frame-Options); innermost first, as responses travel.
        self._response_middleware = (XFrameOptionsMiddleware(_never), CommonMiddleware(_never),
                                     SecurityMiddleware(_never))
        from billing.api.views import EntitlementCheck, EventCreate

        self._view = EntitlementCheck  # its required_scope, as the permission reads it
        self._event_view = EventCreate
        self.events_inline = 0  # single events answered on the check server's event loop
        self.enabled = self._same_stack()
        self.events_enabled = self.enabled and getattr(resolve(EVENTS_PATH).func, "view_class", None) is EventCreate

    def _same_stack(self) -> bool:
        reasons = []
        if tuple(settings.MIDDLEWARE) != MIDDLEWARE:
            reasons.append("MIDDLEWARE differs from the stack it reproduces")
        if settings.DISALLOWED_USER_AGENTS or settings.PREPEND_WWW:
            reasons.append("CommonMiddleware has request rules (DISALLOWED_USER_AGENTS, PREPEND_WWW)")
        if getattr(resolve(CHECK_PATH).func, "view_class", None) is not self._view:
            reasons.append(f"{CHECK_PATH} is not routed to EntitlementCheck")
        if reasons:
            logger.warning("entitlement check fast lane off: %s", "; ".join(reasons))
        return not reasons

    def __call__(self, environ, start_response):
        if (not self.enabled or environ.get("PATH_INFO") != CHECK_PATH or environ.get("REQUEST_METHOD") != "POST"
                or environ.get("SCRIPT_NAME")):
            return self.django_app(environ, start_response)
        body = _read_body(environ)
        response = None
        if body is not None:
            signals.request_started.send(sender=self.__class__, environ=environ)
            response = self._answer_or_none(environ, body, inline=False)
            environ["wsgi.input"] = io.BytesIO(body)  # for the full stack, if it answers
        if response is None:
            return self.django_app(environ, start_response)
        self.served += 1
        start_response(f"{response.status_code} {response.reason_phrase}", list(response.items()))
        return response  # closing it sends request_finished, as Django's handler does

    def answer_inline(self, environ, body: bytes) -> HttpResponse | None:
        """The check server's event loop (billing/api/check_server.py): the answer when it
        needs nothing but the process's caches and Redis, else None (the request is then
        answered in a thread by the full WSGI application, this lane included). Never
        touches the database, so it sends no request signals (they only manage database
        connections)."""
        if not self.enabled or environ.get("SCRIPT_NAME"):
            return None
        response = self._answer_or_none(environ, body, inline=True)
        if response is not None:
            self.served_inline += 1
        return response

    def _answer_or_none(self, environ, body: bytes, *, inline: bool) -> HttpResponse | None:
        return _or_none(f"entitlement check {'on the event loop' if inline else 'fast lane'}", self._answer,
                        environ, body, inline=inline)

    def _answer(self, environ, body: bytes, *, inline: bool = False) -> HttpResponse | None:
        """The check's answer, or None for the full stack to give it. `inline`: without the
        database (NeedsDatabase when it would be needed), the rate limit counted last so
        that a request handed on for that reason is counted once, by the full stack."""
        request = _plain_request(environ, body)
        if request is None:
            return None
        # In the order DRF's APIView takes them: authentication, scope, rate limit, and
        # only then the body (an unauthenticated request costs no parsing).
        drf_request = _authorised(request, self._view, inline=inline)
        if drf_request is None:
            return None
        if not inline and not self._allowed(environ, drf_request, self._view):
            return None
        data = s.validated_check(_parsed(request, body))
        if data["reserve"]:
            return None  # a write under the customer's lock: the view's path
        decision = check_entitlement(
            customer_external_id=data["customer"], feature_code=data["feature"], quantity=data["quantity"],
            reserve=False, reservation_ttl_seconds=data.get("reservation_ttl_seconds"), now=timezone.now(),
            cached_only=inline)
        if inline and not self._allowed(environ, drf_request, self._view):
            return None
        return self._response(request, s.entitlement_result(decision), 200)

    # -- single events, on the check server's event loop --

    def event_inline(self, environ, body: bytes) -> tuple | None:
        """A plain `POST /api/v1/events` read on the check server's event loop: (request,
        EventInput) once authenticated (a key this process knows), in scope, valid and
        within the rate limit (counted here, once), else None for the full stack.
        Recording is the caller's, through group commit's recorder thread, and
        `event_answer` gives the answer; an event the recorder refuses is answered by
        the full stack too (nothing was written for it, so it is decided again there)."""
        # Recorded by group commit's recorder thread: without it the loop would have to
        # write to the database itself.
        if not (self.events_enabled and settings.OVERAGE_GROUP_COMMIT) or environ.get("SCRIPT_NAME"):
            return None
        return _or_none("single event on the event loop", self._prepared_event, environ, body)

    def _prepared_event(self, environ, body: bytes) -> tuple | None:
        request = _plain_request(environ, body)
        if request is None:
            return None
        drf_request = _authorised(request, self._event_view, inline=True)
        if drf_request is None:
            return None
        from billing.api.views import _event_input

        event = _event_input(s.validated_event(_parsed(request, body)))
        if not self._allowed(environ, drf_request, self._event_view):
            return None
        return request, event

    def event_answer(self, request, result) -> HttpResponse:
        """The answer to a recorded event (`BatchResult` without error), as `EventCreate`
        gives it: 201 the first time, 200 for a retry."""
        self.events_inline += 1
        return self._response(request, s.event_result(result.event), 201 if result.created else 200)

    def _response(self, request, data: dict, status: int) -> HttpResponse:
        response = HttpResponse(self._renderer.render(data, "application/json"), content_type="application/json",
                                status=status)
        response["Allow"] = "POST, OPTIONS"  # as DRF's APIView answers
        for middleware in self._response_middleware:
            response = middleware.process_response(request, response)
        return response

    @staticmethod
    def _allowed(environ, drf_request, view) -> bool:
        throttle = ApiKeyRateThrottle()
        allowed = throttle.allow_request(drf_request, view)
        # Counted once, here: the full stack, if it answers this request, reuses the decision.
        environ[LANE_DECISION] = (allowed, throttle.wait())
        return allowed


def _or_none(what: str, answer, *args, **kwargs):
    """`answer(...)`, or None for what the full stack answers: a refusal (it renders the
    error body), something that needs the database (on the event loop), or a fault here."""
    try:
        return answer(*args, **kwargs)
    except (APIException, BillingError, ValidationError, NeedsDatabase):
        return None
    except Exception:  # noqa: BLE001 - a fault here must not cost the answer
        logger.exception("%s failed; the full stack answers", what)
        return None


def _plain_request(environ, body: bytes):
    """Django's request for a plain API call, or None when the full stack must answer
    it: a host Django refuses, a redirect to HTTPS, a query string, a body that is not
    JSON, an Accept header that is not JSON's."""
    from django.core.handlers.wsgi import WSGIRequest

    environ["wsgi.input"] = io.BytesIO(body)
    request = WSGIRequest(environ)
    try:
        request.get_host()  # ALLOWED_HOSTS, as CommonMiddleware asks
    except Exception:  # noqa: BLE001 - DisallowedHost and the like: Django answers
        return None
    if ((settings.SECURE_SSL_REDIRECT and not request.is_secure()) or request.META.get("QUERY_STRING")
            or request.content_type != "application/json"
            or request.META.get("HTTP_ACCEPT", "") not in ACCEPTS_JSON):
        return None
    return request


def _authorised(request, view, *, inline: bool):
    """DRF's request stand-in, authenticated and holding the view's scope, or None."""
    drf_request = SimpleNamespace(META=request.META, headers=request.headers, method="POST", auth=None)
    authenticated = (CachedApiKeyAuthentication if inline else ApiKeyAuthentication)().authenticate(drf_request)
    if authenticated is None:
        return None
    drf_request.auth = authenticated[1]
    if not HasApiKeyScope().has_permission(drf_request, view):
        return None
    return drf_request


def _parsed(request, body: bytes):
    from billing.api.views import ApiJSONParser

    return ApiJSONParser().parse(io.BytesIO(body), "application/json",
                                 {"encoding": request.encoding or settings.DEFAULT_CHARSET})


def _read_body(environ) -> bytes | None:
    """The declared body, or None when its size is not a plain number up to
    MAX_BODY_BYTES (the full stack reads and answers it)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if not 0 < length <= min(MAX_BODY_BYTES, settings.OVERAGE_API_MAX_BODY_BYTES):
        return None
    body = environ["wsgi.input"].read(length)
    return body if len(body) == length else None


def _never(request):  # the response middleware's get_response: never called here
    raise AssertionError("response-only middleware")
