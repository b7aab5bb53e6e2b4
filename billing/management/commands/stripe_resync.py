"""Re-read one customer from Stripe and say where Stripe and Overage disagree."""

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.models import Customer
from billing.services.purchases import payments_through_stripe
from billing.services.stripe_sync import customer_resync
from plans.money import format_money


class Command(BaseCommand):
    help = ("Re-sync a customer from Stripe: dj-stripe's copy of the customer, the saved card, and every invoice's "
            "Stripe status and total. Prints each invoice whose Stripe total differs from ours; exit status 1 if any.")

    def add_arguments(self, parser):
        parser.add_argument("external_id")

    def handle(self, *args, external_id, **options):
        if not payments_through_stripe():
            raise CommandError("STRIPE_SECRET_KEY is not set: Overage invoices locally.")
        customer = Customer.objects.filter(external_id=external_id).first()
        if customer is None:
            raise CommandError(f"No customer with external_id {external_id!r}.")
        invoices = customer_resync(customer_id=customer.pk, now=timezone.now())
        disagreeing = [invoice for invoice in invoices if invoice.stripe_disagrees]
        for invoice in invoices:
            flag = "DISAGREES" if invoice.stripe_disagrees else "ok"
            stripe_total = "none" if invoice.stripe_total is None else format_money(invoice.stripe_total,
                                                                                     invoice.currency)
            self.stdout.write(f"{invoice.number}: ours {format_money(invoice.total, invoice.currency)}, Stripe "
                              f"{stripe_total} ({invoice.stripe_status}) {flag}")
        self.stdout.write(f"{len(invoices)} invoice(s) re-read, {len(disagreeing)} disagree.")
        if disagreeing:
            raise SystemExit(1)
