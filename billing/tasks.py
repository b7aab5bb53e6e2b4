"""Celery tasks: thin wrappers that call a service with the current time."""

from celery import shared_task
from django.utils import timezone

from billing.services.ledger import expire_credit_grants


@shared_task(acks_late=True)
def expire_credit_grants_task() -> int:
    return expire_credit_grants(now=timezone.now())
