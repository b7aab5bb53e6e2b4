"""localstripe, the fake stateful Stripe server, started per test on a free port and
driven through the official `stripe` SDK by Overage's own services."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stripe
from django.test import Client

from billing.services.stripe_sync import configure_sdk, webhook_endpoint_ensure

WEBHOOK_SECRET = "whsec_overage_tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def localstripe():
    """A fresh localstripe process; yields its base URL, stops it afterwards."""
    port = free_port()
    executable = Path(sys.executable).with_name("localstripe")
    process = subprocess.Popen([str(executable), "--port", str(port), "--from-scratch"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:  # wait for it to listen (startup, not a timing assumption about the code under test)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("localstripe did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def stripe_mode(localstripe, settings):
    """Overage configured for Stripe, pointed at localstripe."""
    api_base, api_key = stripe.api_base, stripe.api_key
    settings.STRIPE_SECRET_KEY = settings.STRIPE_TEST_SECRET_KEY = "sk_test_overage000000000000000000"
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_overage000000000000000000"
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = localstripe
    settings.STRIPE_JS_URL = f"{localstripe}/js.stripe.com/v3/"
    configure_sdk()
    yield localstripe
    stripe.api_base, stripe.api_key = api_base, api_key


@pytest.fixture
def webhook_endpoint(stripe_mode, db):
    return webhook_endpoint_ensure(base_url="http://testserver")


def signed_headers(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict:
    """The Stripe-Signature header Stripe computes for a delivery (scheme v1)."""
    import hashlib
    import hmac

    timestamp = timestamp or int(time.time())
    signature = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={timestamp},v1={signature}"}


def stripe_events(kind: str, **match) -> list[dict]:
    """Events localstripe recorded, of one type, newest first, whose object has `match`."""
    events = [event.to_dict() for event in stripe.Event.list(limit=100).auto_paging_iter() if event.type == kind]
    return [e for e in events if all(e["data"]["object"].get(k) == v for k, v in match.items())]


def deliver(endpoint, event: dict, client: Client | None = None):
    """Post `event` to our dj-stripe endpoint exactly as Stripe does (JSON, signed)."""
    payload = json.dumps(event).encode()
    return (client or Client()).post(endpoint.url.replace("http://testserver", ""), payload,
                                     content_type="application/json", headers=signed_headers(payload))
