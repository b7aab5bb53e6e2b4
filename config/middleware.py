"""The portal's middleware, skipped for `/api/` requests.

The API authenticates by API key, is exempt from CSRF and renders no pages, so sessions,
the user, CSRF cookies, messages, htmx and the login lockout only cost it time: together
about a tenth of an entitlement check's CPU. Each class here is Django's (or ours), with
one difference: an `/api/` request passes straight through to the next layer. Subclasses
keep Django's system checks (which look for subclasses) and every portal behaviour.
(CsrfViewMiddleware's `process_view` still runs for API views, where `csrf_exempt`
makes it return at once.)
"""

from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Messages
from django.contrib.sessions.middleware import SessionMiddleware as _Sessions
from django.middleware.csrf import CsrfViewMiddleware as _Csrf
from django_htmx.middleware import HtmxMiddleware as _Htmx

from portal.login_throttle import LoginLockoutMiddleware as _LoginLockout

API_PREFIX = "/api/"


def _portal_only(middleware_class):
    class PortalOnly(middleware_class):
        def __call__(self, request):
            if request.path_info.startswith(API_PREFIX):
                return self.get_response(request)
            return super().__call__(request)

    PortalOnly.__name__ = PortalOnly.__qualname__ = middleware_class.__name__
    PortalOnly.__doc__ = f"{middleware_class.__module__}.{middleware_class.__name__}, not for {API_PREFIX} requests."
    return PortalOnly


SessionMiddleware = _portal_only(_Sessions)
CsrfViewMiddleware = _portal_only(_Csrf)
AuthenticationMiddleware = _portal_only(_Authentication)
LoginLockoutMiddleware = _portal_only(_LoginLockout)
MessageMiddleware = _portal_only(_Messages)
HtmxMiddleware = _portal_only(_Htmx)
