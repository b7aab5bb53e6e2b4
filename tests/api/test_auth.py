"""API keys: Bearer, hashed at rest, revocable, scoped."""

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import ApiKey
from billing.services.api_keys import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db


def client_with(header=None):
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    return client


@pytest.mark.parametrize("header, code", [
    (None, "unauthenticated"),
    ("Bearer ovg_nothere_abc", "invalid_api_key"),
    ("Bearer ", "invalid_api_key"),
    ("Token something", "invalid_api_key"),
    ("Bearer not-even-our-format", "invalid_api_key"),
])
def test_missing_or_invalid_key_is_401_with_the_error_body(header, code):
    response = client_with(header).get("/api/v1/plans")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == code
    assert response["WWW-Authenticate"] == "Bearer"


def test_revoked_key_is_401():
    api_key, key = api_key_create(name="old")
    api_key_revoke(api_key=api_key, now=timezone.now())

    assert client_with(f"Bearer {key}").get("/api/v1/plans").status_code == 401


def test_only_a_hash_of_the_key_is_stored():
    api_key, key = api_key_create(name="x")

    row = ApiKey.objects.get(pk=api_key.pk)
    assert key not in (row.key_hash, row.prefix, row.name)
    assert len(row.key_hash) == 64
    assert client_with(f"Bearer {key}").get("/api/v1/plans").status_code == 200
    assert client_with(f"Bearer {key[:-1]}x").get("/api/v1/plans").status_code == 401


@pytest.mark.parametrize("scope, method, path, allowed", [
    ("ingest", "post", "/api/v1/events", True),
    ("ingest", "post", "/api/v1/entitlements/check", True),
    ("ingest", "get", "/api/v1/plans", False),
    ("ingest", "post", "/api/v1/plans", False),
    ("read", "get", "/api/v1/plans", True),
    ("read", "get", "/api/v1/features", True),
    ("read", "post", "/api/v1/events", False),
    ("read", "post", "/api/v1/features", False),
    ("admin", "post", "/api/v1/features", True),
    ("admin", "post", "/api/v1/customers", True),
    ("admin", "post", "/api/v1/events", False),
])
def test_a_key_can_only_use_its_scopes(scope, method, path, allowed):
    _, key = api_key_create(name="scoped", scopes=[scope])

    response = getattr(client_with(f"Bearer {key}"), method)(path, {}, format="json")

    if allowed:
        assert response.status_code != 403  # may still be 400 for the empty body
    else:
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "insufficient_scope"


def test_create_api_key_command_prints_the_key_last_and_it_works(capsys):
    call_command("create_api_key", "integration", "--scope", "ingest")

    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("ovg_")
    assert ApiKey.objects.get(name="integration").scopes == ["ingest"]
    assert client_with(f"Bearer {key}").post("/api/v1/entitlements/check", {}, format="json").status_code == 400


def test_create_api_key_without_scope_has_every_scope(capsys):
    call_command("create_api_key", "all")

    assert ApiKey.objects.get(name="all").scopes == ["ingest", "read", "admin"]
