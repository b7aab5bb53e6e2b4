from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.models import Customer
from billing.reconciliation import disagreements


class Command(BaseCommand):
    help = ("Check that every customer's balance shown, unbilled usage and invoices agree with the ledger (and the "
            "revenue journal with its sources). Prints every disagreement; exits non-zero if there is one.")

    def add_arguments(self, parser):
        parser.add_argument("--customer", help="Only this customer (external_id).")

    def handle(self, *args, customer, **options):
        only = None
        if customer:
            only = Customer.objects.filter(external_id=customer).first()
            if only is None:
                raise CommandError(f"No customer with external_id {customer!r}")
        now = timezone.now()
        found = disagreements(now=now, customer=only)
        for disagreement in found:
            self.stdout.write(str(disagreement))
        checked = f"customer {only.external_id}" if only else f"{Customer.objects.count()} customer(s)"
        if found:
            raise CommandError(f"reconciliation failed: {len(found)} disagreement(s) in {checked} "
                               f"as of {now.isoformat()}")
        self.stdout.write(self.style.SUCCESS(f"reconciliation passed for {checked}: balances, unbilled usage and "
                                             f"invoices agree with the ledger as of {now.isoformat()}"))
