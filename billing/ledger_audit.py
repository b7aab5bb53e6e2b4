"""Checks that every cache of the ledger equals what its entries say.

Used by `manage.py ledger_check` in production and by the tests after every scenario.
Each check is one aggregate query, so it runs over millions of entries.
"""

from collections.abc import Iterator
from decimal import Decimal

from django.db.models import Count, F, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from billing.models import BillingPeriod, CreditGrant, LedgerEntry, UsageEvent, UsageRollup
from plans.money import CREDIT_DIGITS, CREDIT_PLACES

ZERO = Decimal("0")


def _sum(queryset, field="credits"):
    from django.db.models import DecimalField

    return Coalesce(
        Subquery(queryset.values(field)[:1]), Value(ZERO),
        output_field=DecimalField(max_digits=CREDIT_DIGITS + 6, decimal_places=CREDIT_PLACES),
    )


def ledger_mismatches() -> Iterator[str]:
    """Yield a readable description of every mismatch, grants first."""
    entry_sum = (
        LedgerEntry.objects.filter(grant=OuterRef("pk")).order_by().values("grant")
        .annotate(total=Sum("credits")).values("total")
    )
    grants = CreditGrant.objects.annotate(ledger=_sum(entry_sum, "total")).exclude(remaining=F("ledger"))
    for grant in grants.select_related("customer").order_by("pk"):
        yield (f"grant {grant.pk} of customer {grant.customer.external_id}: remaining {grant.remaining} "
               f"but its ledger entries sum to {grant.ledger}")

    used = (
        LedgerEntry.objects.filter(period=OuterRef("pk"), kind__in=["consume", "overage"]).order_by()
        .values("period").annotate(total=Sum("credits")).values("total")
    )
    overage = (
        LedgerEntry.objects.filter(period=OuterRef("pk"), kind="overage").order_by()
        .values("period").annotate(total=Sum("credits")).values("total")
    )
    periods = BillingPeriod.objects.annotate(ledger_used=_sum(used, "total"), ledger_overage=_sum(overage, "total"))
    bad_periods = periods.filter(
        ~Q(credits_used=-F("ledger_used")) | ~Q(overage_credits=-F("ledger_overage"))
    ).select_related("customer").order_by("pk")
    for period in bad_periods:
        yield (f"period {period.pk} of customer {period.customer.external_id}: cached used/overage "
               f"{period.credits_used}/{period.overage_credits} but entries say "
               f"{-period.ledger_used}/{-period.ledger_overage}")

    accepted = {
        (row["period"], row["feature"]): row
        for row in UsageEvent.objects.filter(status=UsageEvent.Status.ACCEPTED).order_by()
        .values("period", "feature").annotate(events=Count("pk"), credits=Sum("credits"),
                                               overage=Sum("overage_credits"))
    }
    rolled = {
        (row["period"], row["feature"]): row
        for row in UsageRollup.objects.order_by().values("period", "feature")
        .annotate(events=Sum("events"), credits=Sum("credits"), overage=Sum("overage_credits"))
    }
    for key in sorted(set(accepted) | set(rolled)):
        a, r = accepted.get(key), rolled.get(key)
        figures = lambda row: (row["events"], row["credits"], row["overage"]) if row else (0, ZERO, ZERO)  # noqa: E731
        if figures(a) != figures(r):
            yield f"rollups of period {key[0]} feature {key[1]}: events say {figures(a)}, rollups say {figures(r)}"
