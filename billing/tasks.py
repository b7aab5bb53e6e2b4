"""Celery tasks: thin wrappers that call a service with the current time."""

from celery import shared_task
from django.utils import timezone

from billing.services.ledger import expire_credit_grants


@shared_task(acks_late=True)
def expire_credit_grants_task() -> int:
    return expire_credit_grants(now=timezone.now())


@shared_task(acks_late=True)
def close_due_periods_task() -> int:
    """Beat: close every period past its grace window (idempotent per period)."""
    from billing.services.invoicing import close_due_periods

    return len(close_due_periods(now=timezone.now()))
