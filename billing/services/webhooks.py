"""Outgoing webhooks: alerts POSTed, signed, to the endpoints the business configured.

A `WebhookDelivery` row is written in the same transaction as the alert it carries, so
an alert that rolls back sends nothing and a committed one is never lost: the first
attempt is enqueued on commit, and `retry_due_webhooks_task` (celery-beat, every
minute) sends whatever is pending and due, which also covers a lost task message.
Retries wait 1 min, 5 min, 30 min, 2 h, 12 h; the sixth failed attempt gives up.

An attempt claims its delivery with a conditional UPDATE (pending, due) that moves
`next_attempt_at` past the HTTP timeout, so the sweep, a re-delivered task message and
the first attempt can never send the same delivery at the same time. Nothing sleeps:
in the embedded mode (tasks run in-process) a failed attempt simply waits for the
sweep. See docs/alerts.md for the signature a receiver verifies.
"""

import hashlib
import hmac
import json
import secrets
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q

from billing.errors import BillingError
from billing.models import Alert, WebhookDelivery, WebhookEndpoint
from billing.services.commit_hooks import enqueue

# Wait after the n-th failed attempt before the next one; after the last, give up.
RETRY_DELAYS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=12),
)
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1  # 6
TIMEOUT_SECONDS = 5
# How long an attempt in flight holds its delivery. Longer than the HTTP timeout, so
# only a worker that died mid-attempt lets the sweep try again.
CLAIM = timedelta(minutes=5)
# Keep this much of a failing endpoint's answer for the delivery log.
ERROR_BODY_BYTES = 500
SECRET_PREFIX = "whsec_"


# --- Endpoints ------------------------------------------------------------------------

def validate_endpoint_url(url: str) -> None:
    """Deliveries go to https:// URLs only. Plain http is accepted for 127.0.0.1 /
    localhost when DEBUG is on, so a receiver can be tried out locally; signed
    billing data never crosses a network unencrypted in production."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and settings.DEBUG and parts.hostname in {"127.0.0.1", "localhost", "::1"}:
        return
    raise BillingError("Use an https:// URL (http://127.0.0.1 is accepted only when DEBUG is on).",
                       code="invalid", field="url", status=400)


def new_signing_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def mask_secret(secret: str) -> str:
    return f"{secret[:len(SECRET_PREFIX) + 4]}…" if secret else ""


def webhook_endpoint_create(*, url: str, description: str = "", event_types=(), is_active: bool = True
                            ) -> WebhookEndpoint:
    """A new endpoint with a freshly generated signing secret (shown to the operator
    once, by the caller)."""
    validate_endpoint_url(url)
    endpoint = WebhookEndpoint(url=url, secret=new_signing_secret(), description=description,
                               event_types=list(event_types), is_active=is_active)
    endpoint.full_clean()
    endpoint.save()
    return endpoint


def webhook_endpoint_rotate_secret(*, endpoint: WebhookEndpoint) -> str:
    """Replace the signing secret; deliveries from now on (retries included) are signed
    with the new one. Returns it so the operator can copy it once."""
    endpoint.secret = new_signing_secret()
    endpoint.save(update_fields=["secret"])
    return endpoint.secret


# --- Queueing -------------------------------------------------------------------------

def queue_deliveries(*, alert: Alert, payload: dict, now: datetime) -> list[WebhookDelivery]:
    """One pending delivery per active endpoint that wants this kind of alert (an
    empty `event_types` wants all). Call inside the alert's transaction; the caller
    enqueues the first attempts on commit."""
    endpoints = [
        endpoint for endpoint in WebhookEndpoint.objects.filter(is_active=True).order_by("pk")
        if not endpoint.event_types or alert.kind in endpoint.event_types
    ]
    return [
        WebhookDelivery.objects.create(endpoint=endpoint, alert=alert, event_type=alert.kind, payload=payload,
                                       next_attempt_at=now, created_at=now)
        for endpoint in endpoints
    ]


# --- Sending --------------------------------------------------------------------------

def encode_body(payload: dict) -> bytes:
    """The exact bytes sent and signed."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature_header(*, secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed with the secret>`.
    Signing the timestamp with the body lets a receiver refuse replays of old bodies."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def deliver_webhook(*, delivery_id: int, now: datetime) -> WebhookDelivery:
    """Make one attempt at a delivery if it is pending and due; otherwise do nothing.

    2xx → delivered. Anything else (another status, a redirect, a timeout, a refused
    connection) → the status code or error is recorded and the next attempt is
    scheduled by `RETRY_DELAYS`, or the delivery is marked failed after
    `MAX_ATTEMPTS`. A delivery whose endpoint was disabled is marked failed unsent.
    """
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    if delivery.status != WebhookDelivery.Status.PENDING:
        return delivery
    endpoint = delivery.endpoint
    if not endpoint.is_active:
        WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.Status.PENDING).update(
            status=WebhookDelivery.Status.FAILED, next_attempt_at=None, last_error="Endpoint disabled; not sent.")
        delivery.refresh_from_db()
        return delivery

    claimed = WebhookDelivery.objects.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
        pk=delivery.pk, status=WebhookDelivery.Status.PENDING,
    ).update(attempts=F("attempts") + 1, next_attempt_at=now + CLAIM)
    if not claimed:  # not due yet, or another worker is on it
        delivery.refresh_from_db()
        return delivery
    delivery.refresh_from_db(fields=["attempts"])

    body = encode_body(delivery.payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Overage-Webhooks/1",
        "Overage-Event": delivery.event_type,
        # Stable across retries: receivers use it to ignore a delivery they already have.
        "Overage-Delivery": str(delivery.pk),
        "Overage-Signature": signature_header(secret=endpoint.secret, timestamp=int(now.timestamp()), body=body),
    }
    status_code, error = None, ""
    try:
        with requests.post(endpoint.url, data=body, headers=headers, timeout=TIMEOUT_SECONDS,
                           allow_redirects=False, stream=True) as response:
            status_code = response.status_code
            if not 200 <= status_code < 300:
                # Read a bounded prefix: a misbehaving endpoint cannot fill our log.
                snippet = next(response.iter_content(ERROR_BODY_BYTES), b"")[:ERROR_BODY_BYTES]
                error = f"HTTP {status_code}: {snippet.decode(errors='replace')}".strip()
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]

    pending = WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.Status.PENDING)
    if status_code is not None and 200 <= status_code < 300:
        pending.update(status=WebhookDelivery.Status.DELIVERED, delivered_at=now, last_status_code=status_code,
                       last_error="", next_attempt_at=None)
    elif delivery.attempts >= MAX_ATTEMPTS:
        pending.update(status=WebhookDelivery.Status.FAILED, last_status_code=status_code, last_error=error,
                       next_attempt_at=None)
    else:
        pending.update(last_status_code=status_code, last_error=error,
                       next_attempt_at=now + RETRY_DELAYS[delivery.attempts - 1])
    delivery.refresh_from_db()
    return delivery


def due_webhook_deliveries(*, now: datetime, limit: int = 500) -> list[int]:
    """Ids of pending deliveries whose next attempt is due, oldest first."""
    return list(
        WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .order_by(F("next_attempt_at").asc(nulls_first=True), "pk")
        .values_list("pk", flat=True)[:limit]
    )


def retry_webhook_delivery_now(*, delivery: WebhookDelivery, now: datetime) -> bool:
    """Make a pending or failed delivery due now and enqueue an attempt (admin "Retry
    now"). A failed delivery gets one more attempt; if that fails too it is failed
    again. Delivered ones are left alone. Returns whether an attempt was queued."""
    from billing.tasks import deliver_webhook_task  # lazily: services never import celery tasks at import time

    with transaction.atomic():
        updated = WebhookDelivery.objects.filter(pk=delivery.pk).exclude(
            status=WebhookDelivery.Status.DELIVERED
        ).update(status=WebhookDelivery.Status.PENDING, next_attempt_at=now)
        if updated:
            enqueue(deliver_webhook_task, delivery.pk)
    return bool(updated)
