from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.selectors_revenue import parse_month, revenue_report
from billing.services.revenue import recognise_revenue

# (figure, label) in the order a reader follows the deferred balance.
ROWS = [
    ("billed", "billed (invoices issued, not void)"),
    ("opening", "deferred revenue, opening"),
    ("deferred_in", "+ deferred in (credits paid or billed)"),
    ("rolled_over_net", "± rollover transfers (net)"),
    ("recognised", "− recognised on consumption"),
    ("breakage", "− breakage (credits expired)"),
    ("closing", "deferred revenue, closing"),
    ("overage", "overage recognised (period of use)"),
    ("revenue", "revenue recognised (consumption + breakage + overage)"),
]


class Command(BaseCommand):
    help = ("Monthly revenue report (ASC 606) per currency: billed, deferred opening/closing, recognised, breakage, "
            "overage. Brings the revenue journal up to date first (idempotent).")

    def add_arguments(self, parser):
        parser.add_argument("--month", required=True, help="YYYY-MM (UTC), e.g. 2026-05")
        parser.add_argument("--currency", help="Only this currency, e.g. USD")

    def handle(self, *args, month, currency, **options):
        try:
            first_day = parse_month(month)
        except ValueError as error:
            raise CommandError(str(error)) from None
        recognise_revenue(now=timezone.now())
        reports = revenue_report(month=first_day, currency=currency.upper() if currency else None)
        if not reports:
            self.stdout.write(f"No revenue activity in {first_day:%Y-%m}"
                              + (f" in {currency.upper()}" if currency else "") + ".")
            return
        unbalanced = []
        for report in reports:
            figures = report.rounded()
            self.stdout.write(f"Revenue {first_day:%Y-%m} (UTC), {report.currency}")
            for name, label in ROWS:
                self.stdout.write(f"  {label:<56}{figures[name]:>16}")
            if report.rolled_over:
                self.stdout.write(f"  {'  (value moved by rollover: ' + str(figures['rolled_over']) + ')'}")
            if report.balances:
                self.stdout.write(self.style.SUCCESS(
                    "  check: opening + deferred in ± rollover − recognised − breakage = closing: holds exactly"))
            else:
                unbalanced.append(report.currency)
                self.stdout.write(self.style.ERROR(
                    f"  check: opening + deferred in ± rollover − recognised − breakage = closing: off by "
                    f"{report.identity_difference} {report.currency}"))
            self.stdout.write("")
        if unbalanced:
            raise CommandError(f"the deferred revenue identity does not hold for {', '.join(unbalanced)}")
