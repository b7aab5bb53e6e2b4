"""Reconciliation: what customers are shown and billed must agree with the ledger.

`disagreements()` returns every disagreement found (an empty list means the books
agree); `manage.py reconcile` prints them and fails if there is one. Read-only: it
never opens periods or writes anything.

Checks, per customer (docs/revenue.md):

- `balance`: the balance the usage API shows (`billing.selectors`) equals the sum of
  the ledger entries of the grants usable now, by kind of credit; the current period's
  credits used, overage credits and estimated overage money equal the ledger's.
- `period_overage_cache`: every period's cached overage credits equal its entries.
- `invoiced_overage_credits` / `overage_bands` / `invoiced_overage_money`: a closed
  period's overage lines (void invoices included: voiding waives a band, it does not
  free it for re-billing) cover its overage credits from 0 up, in adjacent bands, and
  add up to the price of the whole.
- `close_invoice`: a closed period has exactly one period-close invoice, an open one none.
- `upcoming_invoice`: an open period's unbilled overage is what its upcoming invoice
  would bill, and billed + upcoming = the price of the whole (the API's estimate).
- `revenue_journal`: every stored revenue row equals what its source says now.
- `ledger`: `billing.ledger_audit.ledger_mismatches()` (caches of grants, periods,
  events and rollups).
"""

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Sum

from billing.ledger_audit import ledger_mismatches
from billing.models import BillingPeriod, CreditGrant, Customer, Invoice, InvoiceLine, LedgerEntry, RevenueEntry
from billing.selectors import PURCHASED_SOURCES, balance_at, period_usage
from billing.services.customers import live_subscription, period_for
from billing.services.invoicing import overage_waived_amount, upcoming_invoice
from billing.services.revenue import (
    RevenueError, grants_journal, overage_recognition, overage_reversal, stored_key,
)
from plans.money import ZERO, credits_total
from plans.pricing import price_overage


@dataclass(frozen=True)
class Disagreement:
    customer: str  # external_id ("*" when a ledger mismatch names no customer)
    check: str
    subject: str
    expected: object
    found: object

    def __str__(self):
        return f"{self.customer}: {self.check} — {self.subject}: expected {self.expected}, found {self.found}"


def _period_name(period: BillingPeriod) -> str:
    return f"period {period.pk} ({period.start:%Y-%m-%d}–{period.end:%Y-%m-%d})"


class _Customer:
    """Collects one customer's disagreements."""

    def __init__(self, customer: Customer, now: datetime):
        self.customer, self.now = customer, now
        self.found: list[Disagreement] = []

    def expect(self, check: str, subject: str, expected, found) -> None:
        if expected != found:
            self.found.append(Disagreement(self.customer.external_id, check, subject, expected, found))

    def ledger_overage(self) -> dict[int, Decimal]:
        return defaultdict(lambda: ZERO, {
            period: -credits_total(total)
            for period, total in LedgerEntry.objects.filter(customer=self.customer, kind=LedgerEntry.Kind.OVERAGE)
            .order_by().values_list("period").annotate(Sum("credits"))
        })

    def ledger_used(self, period: BillingPeriod) -> Decimal:
        total = LedgerEntry.objects.filter(period=period, kind__in=[LedgerEntry.Kind.CONSUME, LedgerEntry.Kind.OVERAGE]
                                           ).aggregate(total=Sum("credits"))["total"]
        return -credits_total(total)

    # (a) the balance the API shows
    def check_balance(self, overage: dict[int, Decimal]) -> None:
        now = self.now
        subscription = live_subscription(self.customer)
        current = period_for(subscription, now) if subscription else None
        # The usage endpoint's own selector, when the current period is open (calling it
        # otherwise would open periods: reconciliation does not write).
        usage = period_usage(customer=self.customer, now=now) if current else None
        shown = usage.balance if usage else balance_at(self.customer, now, now)
        by_kind = {"included": ZERO, "purchased": ZERO, "promotional": ZERO}
        usable = LedgerEntry.objects.filter(customer=self.customer, grant__effective_at__lte=now).exclude(
            grant__expires_at__lte=now)
        for source, total in usable.order_by().values_list("grant__source").annotate(Sum("credits")):
            if source == CreditGrant.Source.PLAN_ALLOCATION:
                kind = "included"
            elif source in PURCHASED_SOURCES:
                kind = "purchased"
            else:
                kind = "promotional"
            by_kind[kind] += credits_total(total)
        for kind, expected in by_kind.items():
            self.expect("balance", f"{kind} credits remaining at {now.isoformat()}", expected, getattr(shown, kind))
        if usage is not None:
            period = usage.period
            self.expect("balance", f"credits used in {_period_name(period)}", self.ledger_used(period),
                        period.credits_used)
            self.expect("balance", f"overage credits of {_period_name(period)}", overage[period.pk],
                        period.overage_credits)
            # The estimate is the price of the period's overage less money waived by void invoices.
            waived = overage_waived_amount(period)
            self.expect("balance", f"estimated overage money of {_period_name(period)}",
                        max(price_overage(period.plan, overage[period.pk]).amount - waived, ZERO),
                        usage.quote.overage.amount)

    # (b), (c), (d) periods and their invoices
    def check_periods(self, overage: dict[int, Decimal]) -> None:
        periods = BillingPeriod.objects.filter(customer=self.customer).select_related("plan", "subscription",
                                                                                       "customer").order_by("start")
        close_invoices = defaultdict(int)
        for period_id in Invoice.objects.filter(customer=self.customer, kind=Invoice.Kind.PERIOD_CLOSE).values_list(
                "period_id", flat=True):
            close_invoices[period_id] += 1
        lines = defaultdict(list)
        for line in InvoiceLine.objects.filter(period__customer=self.customer, kind=InvoiceLine.Kind.OVERAGE).order_by(
                "overage_from", "pk"):
            lines[line.period_id].append(line)
        for period in periods:
            name = _period_name(period)
            ledger = overage[period.pk]
            self.expect("period_overage_cache", f"overage credits cached on {name}", ledger, period.overage_credits)
            billed_lines = lines[period.pk]
            billed_money = sum((line.amount for line in billed_lines), ZERO)
            whole = price_overage(period.plan, ledger).amount
            if period.status == BillingPeriod.Status.CLOSED:
                self.expect("close_invoice", f"period-close invoices of {name}", 1, close_invoices[period.pk])
                invoiced = sum(((line.overage_to or ZERO) - (line.overage_from or ZERO) for line in billed_lines), ZERO)
                self.expect("invoiced_overage_credits", f"overage credits invoiced for {name}", ledger, invoiced)
                self.expect("invoiced_overage_money", f"overage money invoiced for {name}", whole, billed_money)
                self.check_bands(name, billed_lines)
            else:
                self.expect("close_invoice", f"period-close invoices of open {name}", 0, close_invoices[period.pk])
                self.check_bands(name, billed_lines)
                billed_through = max((line.overage_to or ZERO for line in billed_lines), default=ZERO)
                draft = upcoming_invoice(period=period)
                upcoming = [line for line in draft.lines if line.kind == InvoiceLine.Kind.OVERAGE]
                self.expect("upcoming_invoice", f"unbilled overage credits of {name}", max(ledger - billed_through, ZERO),
                            sum((line.credits or ZERO for line in upcoming), ZERO))
                self.expect("upcoming_invoice", f"billed + upcoming overage money of {name}", whole,
                            billed_money + sum((line.amount for line in upcoming), ZERO))

    def check_bands(self, name: str, lines: list[InvoiceLine]) -> None:
        """Overage lines bill adjacent bands from 0: no credit billed twice or skipped."""
        expected_from = ZERO
        for line in lines:
            self.expect("overage_bands", f"overage line {line.pk} of {name} starts at", expected_from,
                        line.overage_from)
            expected_from = line.overage_to if line.overage_to is not None else expected_from

    # revenue journal
    def check_revenue(self) -> None:
        grants = list(CreditGrant.objects.filter(customer=self.customer, cost__gt=0).order_by("pk"))
        expected: dict[tuple, object] = {}
        for grant_id, rows in grants_journal(grants).items():
            if isinstance(rows, RevenueError):
                self.expect("revenue_journal", f"revenue of grant {grant_id}", "computable from the ledger",
                            str(rows))
                continue
            expected.update({row.key: row for row in rows})
        lines = InvoiceLine.objects.filter(invoice__customer=self.customer, kind=InvoiceLine.Kind.OVERAGE).select_related(
            "invoice", "period")
        recognised = {row.invoice_line_id: row.amount for row in
                      RevenueEntry.objects.filter(customer=self.customer, kind=RevenueEntry.Kind.OVERAGE,
                                                  invoice_line__isnull=False)}
        for line in lines:
            row = overage_recognition(line)
            expected[row.key] = row
            if line.invoice.status == Invoice.Status.VOID and line.pk in recognised and line.through_entry_id:
                row = overage_reversal(line, recognised[line.pk])
                expected[row.key] = row
        for stored in RevenueEntry.objects.filter(customer=self.customer).order_by("pk"):
            row = expected.get(stored_key(stored))
            subject = f"revenue row {stored.pk} ({stored.kind})"
            if row is None:
                self.expect("revenue_journal", subject, "a source in the ledger or an invoice", "none")
            else:
                self.expect("revenue_journal", f"{subject} amount, currency, date",
                            (row.amount, row.currency, row.recognised_at),
                            (stored.amount, stored.currency, stored.recognised_at))


def disagreements(*, now: datetime, customer: Customer | None = None) -> list[Disagreement]:
    """Every disagreement between what is shown or billed and the ledger, for one
    customer or all."""
    customers = [customer] if customer is not None else Customer.objects.order_by("external_id")
    found: list[Disagreement] = []
    for each in customers:
        checks = _Customer(each, now)
        overage = checks.ledger_overage()
        checks.check_balance(overage)
        checks.check_periods(overage)
        checks.check_revenue()
        found += checks.found
    # The ledger's own caches. Mismatches of grants and periods name their customer;
    # those of events and rollups do not, and are reported by a run over all customers.
    for mismatch in ledger_mismatches():
        named = _NAMED_CUSTOMER.search(mismatch)
        owner = named.group(1) if named else "*"
        if customer is not None and owner != customer.external_id:
            continue
        found.append(Disagreement(owner, "ledger", mismatch, "every cache equals its entries", "a mismatch"))
    return found


_NAMED_CUSTOMER = re.compile(r" of customer (.+?): ")
