from datetime import datetime, time, timezone

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone as django_timezone
from django.utils.dateparse import parse_date, parse_datetime

from billing.models import Customer
from billing.services.invoicing import close_due_periods


def _as_of(value: str) -> datetime:
    moment = parse_datetime(value)
    if moment is None:
        day = parse_date(value)
        if day is None:
            raise CommandError(f"--as-of must be a date (2026-06-01) or an ISO datetime, got {value!r}")
        moment = datetime.combine(day, time.min)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Command(BaseCommand):
    help = ("Close every billing period whose end plus the grace window has passed: one invoice per period, "
            "rollover or expiry of included credits, next period allocated. Safe to run any number of times.")

    def add_arguments(self, parser):
        parser.add_argument("--as-of", help="Close as if it were this instant (UTC), e.g. 2026-06-01T02:00.")
        parser.add_argument("--customer", help="Only this customer's periods (external_id).")

    def handle(self, *args, as_of, customer, **options):
        now = _as_of(as_of) if as_of else django_timezone.now()
        only = None
        if customer:
            only = Customer.objects.filter(external_id=customer).first()
            if only is None:
                raise CommandError(f"No customer with external_id {customer!r}")
        invoices = close_due_periods(now=now, customer=only)
        for invoice in invoices:
            self.stdout.write(f"{invoice.number}  {invoice.customer.external_id:<20} "
                              f"{invoice.period.start:%Y-%m-%d}–{invoice.period.end:%Y-%m-%d}  "
                              f"{invoice.total} {invoice.currency}")
        self.stdout.write(self.style.SUCCESS(f"closed {len(invoices)} period(s) as of {now.isoformat()}"))
