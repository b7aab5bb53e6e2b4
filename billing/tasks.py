"""Celery tasks: thin wrappers that call a service with the current time."""

import stripe
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from billing.services import positions
from billing.services.ledger import expire_credit_grants


@shared_task(acks_late=True)
def expire_credit_grants_task() -> int:
    return expire_credit_grants(now=timezone.now())


@shared_task(bind=True, acks_late=True)
def close_due_periods_task(self) -> int:
    """Beat: fan every period past its grace window out to the workers, in chunks of
    OVERAGE_CLOSE_CHUNK_PERIODS, so all worker processes close in parallel (a few dozen
    periods per transaction, under their customers' locks, each once). The chunks go to the queue
    this task came from, so workers dedicated to closing (`-Q …`) do all of it. Returns
    the number of periods dispatched. Running it again while chunks wait is harmless: a
    chunk skips the periods closed meanwhile."""
    from billing.services.invoicing import due_period_ids

    period_ids = due_period_ids(now=timezone.now())
    queue = (self.request.delivery_info or {}).get("routing_key")
    options = {"queue": queue} if queue else {}
    size = settings.OVERAGE_CLOSE_CHUNK_PERIODS
    for start in range(0, len(period_ids), size):
        close_periods_task.apply_async((period_ids[start:start + size],), **options)
    return len(period_ids)


@shared_task(acks_late=True)
def close_periods_task(period_ids: list[int]) -> int:
    """One chunk of a close run: close these periods (and any due successor of each).
    Delivered twice (acks_late after a lost worker), it closes nothing twice."""
    from billing.services.invoicing import close_periods

    return len(close_periods(period_ids=period_ids, now=timezone.now()))


# --- Alerts and outgoing webhooks -------------------------------------------------------

@shared_task(acks_late=False, ignore_result=True)
def rebuild_position_task(customer_external_id: str, lease: str | None = None) -> None:
    """Refresh ahead of a cached credit position, out of the check processes. Not
    acks_late: a rebuild lost with its worker is asked for again once its lease lapses."""
    positions.rebuild_position(customer_external_id, lease)


@shared_task(acks_late=True)
def check_alerts_task(customer_id: int, period_id: int, cap_event_id: str | None = None) -> int:
    """Enqueued by ingestion on commit; returns the number of alerts fired."""
    from billing.services.alerts import check_usage_alerts

    return len(check_usage_alerts(customer_id=customer_id, period_id=period_id, now=timezone.now(),
                                  cap_event_id=cap_event_id))


@shared_task(acks_late=True)
def check_runaway_usage_task(customer_id: int) -> bool:
    from billing.services.alerts import check_runaway_usage

    return check_runaway_usage(customer_id=customer_id, now=timezone.now()) is not None


# SMTP errors are OSErrors: a mail server that is down is retried with backoff (in the
# embedded mode retries run at once, without waiting).
@shared_task(acks_late=True, autoretry_for=(OSError,), retry_backoff=60, retry_backoff_max=3600, max_retries=5)
def send_alert_email_task(alert_id: int, to_customer: bool = True, to_business: bool = False) -> int:
    from billing.services.alerts import send_alert_email

    return send_alert_email(alert_id=alert_id, to_customer=to_customer, to_business=to_business)


@shared_task(acks_late=True, autoretry_for=(OSError,), retry_backoff=60, retry_backoff_max=3600, max_retries=5)
def send_notification_email_task(notification_id: int) -> int:
    from billing.services.stripe_webhooks import email_notification

    return email_notification(notification_id)


@shared_task(acks_late=True)
def requeue_deferred_tasks_task() -> int:
    """Send the tasks kept in the database while the broker was down (beat, every minute:
    it runs only once the broker is back, which is when they can be sent)."""
    from billing.services.commit_hooks import requeue_deferred_tasks

    return requeue_deferred_tasks()


@shared_task(acks_late=True)
def deliver_webhook_task(delivery_id: int) -> str:
    """One attempt; a failed attempt is retried by `retry_due_webhooks_task`, never by
    sleeping here."""
    from billing.services.webhooks import deliver_webhook

    return deliver_webhook(delivery_id=delivery_id, now=timezone.now()).status


@shared_task(acks_late=True)
def retry_due_webhooks_task() -> int:
    """celery-beat, every minute: one attempt for each pending delivery that is due."""
    from billing.services.webhooks import due_webhook_deliveries

    due = due_webhook_deliveries(now=timezone.now())
    for delivery_id in due:
        deliver_webhook_task.delay(delivery_id)
    return len(due)


@shared_task(acks_late=True)
def run_auto_topup_task(customer_id: int) -> int | None:
    """After consumption: top up if the balance fell below the threshold (idempotent)."""
    from billing.services.purchases import run_auto_topup

    purchase = run_auto_topup(customer_id=customer_id, now=timezone.now())
    return purchase.pk if purchase else None


@shared_task(acks_late=True)
def bill_progressively_task(period_id: int) -> str | None:
    """After consumption: invoice a period's overage once it reaches the threshold."""
    from billing.services.invoicing import bill_progressively

    invoice = bill_progressively(period_id=period_id, now=timezone.now())
    return invoice.number if invoice else None


@shared_task(acks_late=True)
def bill_progressively_due_task() -> int:
    """Beat: the sweep behind the per-batch check (e.g. if a task was lost)."""
    from billing.services.invoicing import bill_progressively_due

    return len(bill_progressively_due(now=timezone.now()))


@shared_task(acks_late=True)
def recognise_revenue_task() -> int:
    """Beat: bring the revenue journal up to date (idempotent; runs may overlap)."""
    from billing.services.revenue import recognise_revenue

    return recognise_revenue(now=timezone.now())


# --- Stripe (only enqueued when Stripe is configured) -------------------------------------
# Each service looks for what an earlier attempt created before creating anything, so a
# task run twice, or retried after a lost acknowledgement, creates nothing twice. Stripe
# unreachable, rate limiting or a Stripe-side error: retried with backoff.
STRIPE_RETRY = dict(acks_late=True, autoretry_for=(stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError),
                    retry_backoff=30, retry_backoff_max=1800, max_retries=8)


@shared_task(**STRIPE_RETRY)
def stripe_push_customer_task(customer_id: int) -> None:
    from billing.services.stripe_sync import customer_push

    customer_push(customer_id=customer_id)


@shared_task(**STRIPE_RETRY)
def stripe_charge_purchase_task(purchase_id: int, off_session: bool = True) -> None:
    from billing.services.stripe_sync import PaymentError, purchase_charge

    try:
        purchase_charge(purchase_id=purchase_id, off_session=off_session)
    except PaymentError:
        pass  # declined: the purchase is marked failed and the customer told


@shared_task(**STRIPE_RETRY)
def stripe_push_invoice_task(invoice_id: int) -> None:
    from billing.services.stripe_sync import invoice_push

    invoice_push(invoice_id=invoice_id)
