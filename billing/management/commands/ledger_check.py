from django.core.management.base import BaseCommand, CommandError

from billing.ledger_audit import ledger_mismatches


class Command(BaseCommand):
    help = "Verify every cached balance against the ledger entries; exit non-zero at the first mismatch."

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", help="List every mismatch, not just the first.")

    def handle(self, *args, **options):
        found = []
        for mismatch in ledger_mismatches():
            found.append(mismatch)
            if not options["all"]:
                break
        if found:
            for mismatch in found:
                self.stderr.write(mismatch)
            raise CommandError(f"ledger check failed: {found[0]}")
        self.stdout.write(self.style.SUCCESS("ledger check passed: every cache matches its entries"))
