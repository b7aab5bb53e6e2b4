"""Logging in is throttled against brute force: after 5 failures for a username from one
address, that pair is refused for 15 minutes with a 429 and a page that says why; the
password is not even checked meanwhile. Login forms need their CSRF token."""

import logging
from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.test import Client

from portal import login_throttle
from tests.factories import utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 6, 10, 12)
LOGIN = "/portal/login/"


@pytest.fixture
def user():
    return get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "correct horse battery")


def attempt(client, password, username="ap@acme.test", address="203.0.113.7", url=LOGIN):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


@time_machine.travel(NOW, tick=False)
def test_after_five_failures_even_the_right_password_is_refused_with_429_and_a_clear_message(client, user):
    assert [attempt(client, f"guess-{n}").status_code for n in range(5)] == [200] * 5

    refused = attempt(client, "correct horse battery")

    assert refused.status_code == 429
    assert refused["Retry-After"] == "900"
    page = refused.content.decode()
    assert "Too many failed attempts" in page and "try again in 15 minutes" in page
    assert "didn&#x27;t match" not in page and "didn't match" not in page
    assert not logged_in(client)


def test_the_lockout_ends_after_fifteen_minutes_and_attempts_meanwhile_do_not_extend_it(client, user):
    with time_machine.travel(NOW, tick=False):
        for n in range(5):
            attempt(client, f"guess-{n}")
    with time_machine.travel(NOW + timedelta(minutes=14), tick=False):
        assert attempt(client, "another guess").status_code == 429
        assert attempt(client, "correct horse battery").status_code == 429
    with time_machine.travel(NOW + timedelta(minutes=15, seconds=1), tick=False):
        assert attempt(client, "correct horse battery").status_code == 302
        assert logged_in(client)


@time_machine.travel(NOW, tick=False)
def test_the_lock_holds_for_that_username_from_that_address_only(client, user):
    get_user_model().objects.create_user("cfo@acme.test", "cfo@acme.test", "another good one")
    for n in range(5):
        attempt(client, f"guess-{n}", username="AP@acme.test ")  # case and spaces do not dodge it

    assert attempt(Client(), "correct horse battery", address="198.51.100.9").status_code == 302
    assert attempt(Client(), "another good one", username="cfo@acme.test").status_code == 302
    assert attempt(Client(), "correct horse battery").status_code == 429


@time_machine.travel(NOW, tick=False)
def test_a_successful_login_clears_the_failures(client, user):
    for n in range(4):
        attempt(client, f"guess-{n}")
    assert attempt(Client(), "correct horse battery").status_code == 302

    for n in range(4):
        assert attempt(client, f"again-{n}").status_code == 200
    assert attempt(Client(), "correct horse battery").status_code == 302


@time_machine.travel(NOW, tick=False)
def test_one_address_trying_many_usernames_is_locked_out(client, user, settings):
    settings.OVERAGE_LOGIN_MAX_FAILURES_PER_ADDRESS = 8
    for n in range(8):
        attempt(client, "123456", username=f"user{n}@example.test")

    assert attempt(client, "correct horse battery").status_code == 429
    assert attempt(Client(), "correct horse battery", address="198.51.100.9").status_code == 302


@time_machine.travel(NOW, tick=False)
def test_the_admin_login_is_throttled_too(client, admin_user):
    for n in range(5):
        assert attempt(client, f"guess-{n}", username="admin", url="/admin/login/").status_code == 200

    assert attempt(client, "password", username="admin", url="/admin/login/").status_code == 429


@time_machine.travel(NOW, tick=False)
def test_behind_a_proxy_the_configured_header_is_the_address(client, user, settings):
    settings.OVERAGE_LOGIN_IP_HEADER = "HTTP_X_REAL_IP"
    for n in range(5):
        client.post(LOGIN, {"username": "ap@acme.test", "password": "x"}, REMOTE_ADDR="10.0.0.2",
                    HTTP_X_REAL_IP="203.0.113.7")

    other_client = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_REAL_IP": "198.51.100.9"}
    assert Client().post(LOGIN, {"username": "ap@acme.test", "password": "correct horse battery"},
                         **other_client).status_code == 302
    assert Client().post(LOGIN, {"username": "ap@acme.test", "password": "correct horse battery"},
                         REMOTE_ADDR="10.0.0.2", HTTP_X_REAL_IP="203.0.113.7").status_code == 429


@time_machine.travel(NOW, tick=False)
def test_with_the_cache_down_logging_in_still_works_and_a_warning_is_logged(client, user, settings, caplog,
                                                                            monkeypatch):
    """Fail open: a Redis outage must not lock every customer out of the portal."""
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.db"
    monkeypatch.setattr(login_throttle, "_last_warning", [float("-inf")])
    with caplog.at_level(logging.WARNING, logger="portal.login_throttle"):
        for n in range(6):
            assert attempt(client, f"guess-{n}").status_code == 200
        assert attempt(client, "correct horse battery").status_code == 302

    assert logged_in(client)
    assert any("cache is unreachable" in r.getMessage() for r in caplog.records)


def test_a_login_post_without_the_csrf_token_is_refused(user):
    client = Client(enforce_csrf_checks=True)

    response = attempt(client, "correct horse battery")

    assert response.status_code == 403
    assert not logged_in(client)


def test_with_the_csrf_token_the_same_login_succeeds(user):
    client = Client(enforce_csrf_checks=True)
    token = client.get(LOGIN).context["csrf_token"]

    response = client.post(LOGIN, {"username": "ap@acme.test", "password": "correct horse battery",
                                   "csrfmiddlewaretoken": str(token)}, REMOTE_ADDR="203.0.113.7")

    assert response.status_code == 302 and logged_in(client)
