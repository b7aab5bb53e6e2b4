"""Checks that every cache of the ledger equals what its entries say.

Used by `manage.py ledger_check` in production and by the tests after every scenario.
Sums are grouped in the database and compared here in Decimal (SQLite's SQL decimal
arithmetic is floating point; the per-group sums Django returns are quantized back to
the column's precision).
"""

from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal

from django.db.models import Count, Exists, OuterRef, Q, Sum

from billing.models import BillingPeriod, CreditGrant, LedgerEntry, UsageEvent, UsageRollup
from plans.money import credits_total

ZERO = Decimal("0")


def ledger_mismatches() -> Iterator[str]:
    """Yield a readable description of every mismatch: dangling references, then
    grants, periods, events and rollups."""
    yield from dangling_references()

    by_grant = {
        grant: credits_total(total)
        for grant, total in LedgerEntry.objects.filter(grant__isnull=False).order_by().values_list("grant")
        .annotate(Sum("credits"))
    }
    grants = CreditGrant.objects.order_by("pk").values_list("pk", "customer__external_id", "remaining")
    for pk, customer, remaining in grants.iterator():
        entries = by_grant.get(pk, ZERO)
        if remaining != entries or remaining < ZERO:
            yield f"grant {pk} of customer {customer}: remaining {remaining} but its ledger entries sum to {entries}"

    used, overage = defaultdict(lambda: ZERO), defaultdict(lambda: ZERO)
    period_sums = (
        LedgerEntry.objects.filter(kind__in=["consume", "overage"]).order_by()
        .values_list("period", "kind").annotate(Sum("credits"))
    )
    for period, kind, total in period_sums:
        total = credits_total(total)
        used[period] -= total
        if kind == "overage":
            overage[period] -= total
    periods = BillingPeriod.objects.order_by("pk").values_list("pk", "customer__external_id", "credits_used",
                                                                "overage_credits")
    for pk, customer, credits_used, overage_credits in periods.iterator():
        if (credits_used, overage_credits) != (used[pk], overage[pk]):
            yield (f"period {pk} of customer {customer}: cached used/overage {credits_used}/{overage_credits} "
                   f"but entries say {used[pk]}/{overage[pk]}")

    # Every accepted event is charged exactly its credits (consume + overage entries);
    # a rejected event charges nothing.
    charged = {
        event: -credits_total(total)
        for event, total in LedgerEntry.objects.filter(event__isnull=False).order_by().values_list("event")
        .annotate(Sum("credits"))
    }
    events = UsageEvent.objects.order_by("pk").values_list("pk", "event_id", "status", "credits")
    for pk, event_id, status, credits in events.iterator():
        expected = credits if status == UsageEvent.Status.ACCEPTED else ZERO
        if charged.get(pk, ZERO) != expected:
            yield f"event {event_id!r} ({status}): credits {credits} but its ledger entries charge {charged.get(pk, ZERO)}"

    def figures(queryset, count, overage_count):
        return {
            (row["period"], row["feature"]): (row["n"], credits_total(row["credits"]), credits_total(row["overage"]),
                                              row["overage_n"])
            for row in queryset.order_by().values("period", "feature")
            .annotate(n=count, credits=Sum("credits"), overage=Sum("overage_credits"), overage_n=overage_count)
        }

    accepted = figures(UsageEvent.objects.filter(status=UsageEvent.Status.ACCEPTED), Count("pk"),
                       Count("pk", filter=Q(overage_credits__gt=0)))
    rolled = figures(UsageRollup.objects.all(), Sum("events"), Sum("overage_events"))
    for key in sorted(set(accepted) | set(rolled)):
        a, r = accepted.get(key, (0, ZERO, ZERO, 0)), rolled.get(key, (0, ZERO, ZERO, 0))
        if a != r:
            yield f"rollups of period {key[0]} feature {key[1]}: events say {a}, rollups say {r}"


def dangling_references() -> Iterator[str]:
    """Rows of the tables kept without database foreign keys (events and ledger entries,
    see `UsageEvent`) whose reference names no row."""
    for model in (UsageEvent, LedgerEntry):
        for field in model._meta.concrete_fields:
            if not field.is_relation or field.db_constraint:
                continue
            target = field.related_model._base_manager.filter(pk=OuterRef(field.attname))
            dangling = (model._base_manager.filter(**{f"{field.attname}__isnull": False})
                        .filter(~Exists(target)).order_by("pk").values_list("pk", field.attname))
            for pk, missing in dangling.iterator():
                yield f"{model._meta.verbose_name} {pk}: its {field.name} {missing} does not exist"
