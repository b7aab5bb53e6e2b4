"""A customer's own settings: alert thresholds and which alerts are emailed; reading
in-app notifications."""

from datetime import datetime

from django.db import transaction

from billing.errors import BillingError
from billing.models import Alert, AlertPreference, BillingPeriod, Customer, Notification
from billing.services.commit_hooks import enqueue
from billing.services.locks import lock_customer

MAX_THRESHOLDS = 10


@transaction.atomic
def alert_preferences_set(*, customer: Customer, thresholds: list[int], email_enabled: dict[str, bool]) -> AlertPreference:
    """Thresholds are whole percents of the included credits, 1–100, at most ten."""
    cleaned = sorted(set(thresholds))
    if any(not isinstance(t, int) or not 1 <= t <= 100 for t in cleaned):
        raise BillingError("Thresholds are whole percents from 1 to 100.", code="invalid", field="thresholds",
                           status=400)
    if len(cleaned) > MAX_THRESHOLDS:
        raise BillingError(f"At most {MAX_THRESHOLDS} thresholds.", code="invalid", field="thresholds", status=400)
    unknown = set(email_enabled) - set(Alert.Kind.values)
    if unknown:
        raise BillingError(f"Unknown alert kinds: {', '.join(sorted(unknown))}.", code="invalid",
                           field="email_enabled", status=400)
    # Under the customer's lock, as ingestion reads the thresholds: a batch in flight
    # either sees the new ones or commits before the check queued below runs.
    lock_customer(customer.pk)
    preference, _ = AlertPreference.objects.update_or_create(
        customer=customer, defaults={"thresholds": cleaned, "email_enabled": dict(email_enabled)})
    # Ingestion queues a check only when usage crosses a threshold; one added below
    # this period's usage is due now.
    from billing import tasks  # lazily: services never import celery tasks at import time

    for period_id in BillingPeriod.objects.filter(customer=customer, status=BillingPeriod.Status.OPEN).values_list(
            "pk", flat=True):
        enqueue(tasks.check_alerts_task, customer.pk, period_id, None)
    return preference


def alert_preference(customer: Customer) -> AlertPreference:
    """The customer's settings, or the defaults (unsaved) if they never changed them."""
    return AlertPreference.objects.filter(customer=customer).first() or AlertPreference(customer=customer)


@transaction.atomic
def notifications_mark_read(*, customer: Customer, now: datetime, notification_id: int | None = None) -> int:
    """Mark one notification (or all) of this customer read; returns how many changed."""
    unread = Notification.objects.filter(customer=customer, read_at__isnull=True)
    if notification_id is not None:
        unread = unread.filter(pk=notification_id)
    return unread.update(read_at=now)
