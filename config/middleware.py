"""The portal's middleware, skipped for `/api/` requests.

The API authenticates by API key and renders no pages, so sessions, the user, messages,
htmx and the login lockout only cost it time: together about a tenth of an entitlement
check's CPU. Each class here is Django's (or ours), with one difference: an `/api/`
request passes straight through to the next layer. Subclasses keep Django's system
checks (which look for subclasses) and every portal behaviour. CSRF is left to Django's
own middleware on every path: `check --deploy` looks for it by name, and API views are
`csrf_exempt`.
"""

from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Messages
from django.contrib.sessions.middleware import SessionMiddleware as _Sessions
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
AuthenticationMiddleware = _portal_only(_Authentication)
LoginLockoutMiddleware = _portal_only(_LoginLockout)
MessageMiddleware = _portal_only(_Messages)
HtmxMiddleware = _portal_only(_Htmx)
