"""`manage.py ledger_check` passes on a healthy ledger and names the first mismatch."""

from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from billing.models import BillingPeriod, CreditGrant, LedgerEntry, UsageEvent, UsageRollup
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@pytest.fixture
def customer():
    FeatureFactory(code="gpt-4o")
    customer = make_customer(pro_plan(included_credits=Decimal("100")), started_at=utc(2026, 5, 1),
                             external_id="acme", now=NOW)
    record_event(event=EventInput(event_id="e1", customer="acme", feature="gpt-4o", quantity=Decimal("150")),
                 now=NOW)
    return customer


def test_passes_on_a_consistent_ledger(customer, capsys):
    call_command("ledger_check")

    assert "ledger check passed" in capsys.readouterr().out


def test_names_a_grant_whose_cached_remaining_drifted(customer):
    grant = CreditGrant.objects.get(customer=customer)
    CreditGrant.objects.filter(pk=grant.pk).update(remaining=Decimal("5"))

    with pytest.raises(CommandError, match=f"grant {grant.pk} of customer acme: remaining 5.000000 but its "
                                           "ledger entries sum to 0"):
        call_command("ledger_check")


def test_names_a_period_whose_cached_usage_drifted(customer):
    period = BillingPeriod.objects.get(customer=customer)
    BillingPeriod.objects.filter(pk=period.pk).update(overage_credits=Decimal("49"))

    with pytest.raises(CommandError, match=f"period {period.pk} of customer acme"):
        call_command("ledger_check")


def test_names_an_event_whose_reference_dangles(customer):
    """Events and ledger entries have no foreign keys in the database (ingestion speed);
    the check stands in for them."""
    event = UsageEvent.objects.get(event_id="e1")
    UsageEvent.objects.filter(pk=event.pk).update(feature_id=987654)

    with pytest.raises(CommandError, match=f"usage event {event.pk}: its feature 987654 does not exist"):
        call_command("ledger_check")


def test_names_a_ledger_entry_whose_grant_dangles(customer):
    entry = LedgerEntry.objects.filter(grant__isnull=False).first()
    LedgerEntry.objects.filter(pk=entry.pk).update(grant_id=987654)

    with pytest.raises(CommandError, match=f"ledger entry {entry.pk}: its grant 987654 does not exist"):
        call_command("ledger_check")


def test_names_a_rollup_that_disagrees_with_events(customer):
    UsageRollup.objects.update(credits=Decimal("1"))

    with pytest.raises(CommandError, match="rollups of period"):
        call_command("ledger_check")


def test_ledger_entries_cannot_be_changed_or_deleted(customer):
    entry = LedgerEntry.objects.first()
    entry.credits = Decimal("1")

    with pytest.raises(RuntimeError, match="append-only"):
        entry.save()
    with pytest.raises(RuntimeError, match="append-only"):
        entry.delete()


def test_names_an_event_whose_entries_do_not_add_up_to_its_credits(customer):
    from billing.models import UsageEvent

    UsageEvent.objects.update(credits=Decimal("151"))

    with pytest.raises(CommandError, match="event 'e1' \\(accepted\\): credits 151.000000 but its ledger entries "
                                           "charge 150"):
        call_command("ledger_check")
