"""The portal's middleware is skipped by /api/ requests (config.middleware) and still
runs for every other path."""

import pytest
from django.conf import settings
from django.http import HttpResponse
from django.test import RequestFactory
from django.utils.module_loading import import_string

PORTAL_ONLY = {
    "config.middleware.SessionMiddleware": "session",
    "config.middleware.AuthenticationMiddleware": "user",
    "config.middleware.MessageMiddleware": "_messages",
    "config.middleware.HtmxMiddleware": "htmx",
}


@pytest.mark.parametrize("path", sorted(PORTAL_ONLY))
def test_api_requests_pass_straight_through_and_portal_requests_do_not(path, rf: RequestFactory):
    assert path in settings.MIDDLEWARE
    seen = {}

    def view(request):
        seen[request.path] = hasattr(request, PORTAL_ONLY[path])
        return HttpResponse("ok")

    middleware = import_string(path)(view)
    for url in ("/portal/", "/api/v1/features"):
        request = rf.get(url)
        if path != "config.middleware.SessionMiddleware":
            request.session = import_string(settings.SESSION_ENGINE + ".SessionStore")()  # what it builds on
        assert middleware(request).status_code == 200
    assert seen == {"/portal/": True, "/api/v1/features": False}


def test_csrf_protection_is_djangos_own_for_every_path():
    assert "django.middleware.csrf.CsrfViewMiddleware" in settings.MIDDLEWARE
