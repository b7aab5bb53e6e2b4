"""The monthly revenue report: one function, used by `manage.py revenue_report` and by
the admin's report page, so both show the same numbers.

Figures are exact sums of the revenue journal (10 decimal places). Each is rounded
once, half-up, to the currency's minor unit where it is shown (`MonthlyRevenue.rounded`).
"""

from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone
from decimal import Decimal

from django.db import connection
from django.db.models import Sum

from billing.models import Invoice, LedgerEntry, RevenueEntry
from billing.services.revenue import quantize_amount
from plans.money import ZERO, round_money

Kind = RevenueEntry.Kind


@dataclass
class MonthlyRevenue:
    """One currency's month. Deferred revenue moves as

        opening + deferred_in + rolled_over_net − recognised − breakage = closing

    and `overage` is recognised directly, never deferred."""

    currency: str
    month_start: datetime
    month_end: datetime  # exclusive
    # Invoice totals issued in the month, void and draft invoices excluded (what was
    # billed: base fees in advance, overage of closed periods, pack receipts).
    billed: Decimal = ZERO
    opening: Decimal = ZERO
    # Cost of grants that took effect in the month: base fees of included credits,
    # pack prices. Rollover transfers are not new money and are not in here.
    deferred_in: Decimal = ZERO
    # Rollover transfers: value moved from expiring grants into rollover grants. Out
    # and in happen at the same instant, so the net is zero unless the journal is wrong.
    rolled_over: Decimal = ZERO
    rolled_over_net: Decimal = ZERO
    recognised: Decimal = ZERO  # on consumption
    breakage: Decimal = ZERO  # at expiry
    closing: Decimal = ZERO  # computed from the journal itself, not from the identity
    overage: Decimal = ZERO  # recognised in the period of use (net of reversals of voided lines)

    @property
    def revenue(self) -> Decimal:
        return self.recognised + self.breakage + self.overage

    @property
    def identity_difference(self) -> Decimal:
        """closing − (opening + deferred in + rolled over net − recognised − breakage):
        zero when the journal adds up."""
        return self.closing - (self.opening + self.deferred_in + self.rolled_over_net - self.recognised
                               - self.breakage)

    @property
    def balances(self) -> bool:
        return self.identity_difference == ZERO

    def rounded(self) -> dict[str, Decimal]:
        """Every money figure rounded once, half-up, to the currency's minor unit."""
        money = [f.name for f in fields(self) if f.name not in {"currency", "month_start", "month_end"}]
        figures = {name: round_money(getattr(self, name), self.currency) for name in money}
        figures["revenue"] = round_money(self.revenue, self.currency)
        return figures


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) in UTC."""
    start = datetime(month.year, month.month, 1, tzinfo=timezone.utc)
    end = datetime(month.year + (month.month == 12), month.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start, end


def parse_month(value: str) -> date:
    """`2026-05` → date(2026, 5, 1); ValueError otherwise."""
    try:
        year, month = value.split("-")
        return date(int(year), int(month), 1)
    except (ValueError, TypeError):
        raise ValueError(f"a month is written YYYY-MM, got {value!r}") from None


def _sums(queryset, group: tuple[str, ...], field: str) -> dict[tuple, Decimal]:
    """Exact sums of `field` grouped by `group`. PostgreSQL sums numerics exactly; SQLite
    sums decimals as floating point, so there the rows are added up in Python."""
    totals: dict[tuple, Decimal] = defaultdict(lambda: ZERO)
    if connection.vendor == "postgresql":
        for row in queryset.order_by().values(*group).annotate(total=Sum(field)):
            totals[tuple(row[g] for g in group)] += row["total"]
    else:
        for *key, amount in queryset.order_by().values_list(*group, field).iterator():
            totals[tuple(key)] += amount
    return totals


def revenue_report(*, month: date, currency: str | None = None) -> list[MonthlyRevenue]:
    """The month's figures per currency (all currencies with any activity, or one)."""
    start, end = month_bounds(month)
    journal = RevenueEntry.objects.filter(recognised_at__lt=end)
    invoices = Invoice.objects.filter(issued_at__gte=start, issued_at__lt=end).exclude(
        status__in=[Invoice.Status.VOID, Invoice.Status.DRAFT])
    if currency:
        journal, invoices = journal.filter(currency=currency), invoices.filter(currency=currency)

    reports: dict[str, MonthlyRevenue] = {}

    def report(code: str) -> MonthlyRevenue:
        if code not in reports:
            reports[code] = MonthlyRevenue(currency=code, month_start=start, month_end=end)
        return reports[code]

    # A deferred row is a rollover transfer when its ledger entry is a `rollover`
    # entry (the debit on the old grant, or the rollover grant's opening entry).
    group = ("currency", "kind", "ledger_entry__kind")
    for (code, kind), amount in _sums(journal.filter(recognised_at__lt=start), ("currency", "kind"), "amount").items():
        if kind != Kind.OVERAGE:
            report(code).opening += amount if kind == Kind.DEFERRED else -amount
    for (code, kind, entry_kind), amount in _sums(journal.filter(recognised_at__gte=start), group,
                                                  "amount").items():
        figures = report(code)
        if kind == Kind.DEFERRED and entry_kind == LedgerEntry.Kind.ROLLOVER:
            figures.rolled_over_net += amount
        elif kind == Kind.DEFERRED:
            figures.deferred_in += amount
        elif kind == Kind.RECOGNISED:
            figures.recognised += amount
        elif kind == Kind.BREAKAGE:
            figures.breakage += amount
        elif kind == Kind.OVERAGE:
            figures.overage += amount
    moved = journal.filter(recognised_at__gte=start, kind=Kind.DEFERRED, ledger_entry__kind=LedgerEntry.Kind.ROLLOVER,
                           amount__gt=0)
    for (code,), amount in _sums(moved, ("currency",), "amount").items():
        report(code).rolled_over += amount
    # The closing balance is summed from the journal again, independently of the flows,
    # so the identity checks the classification above rather than restating it.
    for (code, kind), amount in _sums(journal.exclude(kind=Kind.OVERAGE), ("currency", "kind"), "amount").items():
        report(code).closing += amount if kind == Kind.DEFERRED else -amount
    for (code,), total in _sums(invoices, ("currency",), "total").items():
        report(code).billed += total

    for figures in reports.values():
        for name in ("opening", "deferred_in", "rolled_over", "rolled_over_net", "recognised", "breakage", "closing",
                     "overage", "billed"):
            setattr(figures, name, quantize_amount(getattr(figures, name)))
    return [reports[code] for code in sorted(reports)]
