"""Connect Overage to Stripe: register the webhook endpoint and mirror customers."""

from django.core.management.base import BaseCommand, CommandError

from billing.errors import BillingError
from billing.models import Customer
from billing.services.purchases import payments_through_stripe
from billing.services.stripe_sync import customer_push, webhook_endpoint_ensure


class Command(BaseCommand):
    help = ("Create dj-stripe's webhook endpoint for this site (signing secret from STRIPE_WEBHOOK_SECRET) and "
            "print the URL to give Stripe; then mirror every customer not yet in Stripe.")

    def add_arguments(self, parser):
        parser.add_argument("--base-url", required=True, help="this site's public URL, e.g. https://billing.example.com")
        parser.add_argument("--skip-customers", action="store_true")

    def handle(self, *args, base_url, skip_customers, **options):
        if not payments_through_stripe():
            raise CommandError("STRIPE_SECRET_KEY is not set: Overage invoices locally.")
        try:
            endpoint = webhook_endpoint_ensure(base_url=base_url)
        except BillingError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"Webhook endpoint: {endpoint.url}")
        if not skip_customers:
            pending = Customer.objects.filter(stripe_customer__isnull=True).values_list("pk", flat=True)
            for customer_id in pending:
                customer_push(customer_id=customer_id)
            self.stdout.write(f"Mirrored {len(pending)} customer(s) to Stripe.")
