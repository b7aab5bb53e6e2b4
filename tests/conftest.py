import pytest
from django.db import connection
from rest_framework.test import APIClient

from billing.services.api_keys import api_key_create


def pytest_collection_modifyitems(config, items):
    """Tests marked `postgres` prove behaviour under real row locks; on the SQLite
    default they are skipped, with the reason shown by `pytest -ra`."""
    if connection.vendor == "postgresql":
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL row locks (SELECT … FOR UPDATE); "
                                   "set DATABASE_URL=postgres://… to run it")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def api_key(db):
    _, key = api_key_create(name="tests")
    return key


@pytest.fixture
def api(api_key):
    """An API client authenticated with an all-scopes key."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


@pytest.fixture(scope="session", autouse=True)
def _end_stray_database_sessions(django_db_setup, django_db_blocker):
    """Live-server threads (browser tests) can leave a PostgreSQL session open after a
    streamed response; end them so the test database can be dropped."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(autouse=True)
def _celery_app_stays_ours():
    """A test that makes another Celery app current (`Celery(...)` does by default) sends
    every later shared task to that app's broker, where nothing runs them: fail there."""
    from celery import current_app

    from config.celery import app

    yield
    assert current_app._get_current_object() is app, "a test left another Celery app current"


@pytest.fixture(autouse=True)
def _empty_cache():
    """The database is rolled back between tests, the cache (Redis in CI) is not: a
    cached credit position of one test's "acme" must not answer the next test's."""
    from django.core.cache import cache

    cache.clear()
    yield
