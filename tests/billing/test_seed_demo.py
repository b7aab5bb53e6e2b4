"""`manage.py seed_demo` builds the demo business once, however often it runs."""

from decimal import Decimal
from io import StringIO

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from billing.models import ApiKey, CreditGrant, Customer, CustomerMember, LedgerEntry, UsageEvent
from plans.models import CreditPack, Feature, OverageTier, Plan
from tests.factories import utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
NOW = utc(2026, 3, 21, 12)  # the demo's period started 20 days earlier: 2026-03-01


def seed() -> list[str]:
    out = StringIO()
    call_command("seed_demo", stdout=out, stderr=StringIO())
    return out.getvalue().strip().splitlines()


def counts() -> dict:
    models = (Feature, Plan, OverageTier, CreditPack, Customer, UsageEvent, CreditGrant, LedgerEntry, ApiKey,
              CustomerMember, get_user_model())
    return {model.__name__: model.objects.count() for model in models}


@time_machine.travel(NOW, tick=False)
def test_seed_demo_twice_builds_one_demo_business_with_a_working_key(settings):
    settings.DEBUG = True

    first = seed()
    after_first = counts()
    admin = get_user_model().objects.get(username="admin")
    admin.set_password("changed-after-the-first-run")
    admin.save()
    second = seed()

    assert counts() == after_first
    assert after_first["Customer"] == 4 and after_first["Plan"] == 4 and after_first["UsageEvent"] == 690
    assert set(Plan.objects.values_list("code", flat=True)) == {"free", "pro", "payg", "scale"}
    assert second[-1].startswith("A demo API key already exists")
    assert_ledger_consistent()

    # The key, printed as the last line of the first run, authenticates against the API.
    key = first[-1]
    assert key.startswith("ovg_")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    usage = api.get("/api/v1/customers/acme/usage").json()
    assert usage["plan"] == "pro"
    assert usage["period_start"].startswith("2026-03-01T00:00:00")
    assert Decimal(usage["credits_used"]) == Decimal("5324.8")
    assert Decimal(usage["overage_credits"]) == 0
    assert usage["estimated_total"] == "49.00"

    # umbrella is past its 10 000 included credits: 3 932 overage credits × $0.002.
    umbrella = api.get("/api/v1/customers/umbrella/usage").json()
    assert Decimal(umbrella["credits_used"]) == Decimal("13932")
    assert Decimal(umbrella["overage_credits"]) == Decimal("3932")
    assert (umbrella["estimated_overage_amount"], umbrella["estimated_total"]) == ("7.86", "56.86")

    # The free customer hit its hard limit; the refused events are kept, not dropped.
    assert UsageEvent.objects.filter(customer__external_id="initech", status="rejected").exists()

    member = CustomerMember.objects.get(user__username="acme@example.com")
    assert (member.customer.external_id, member.is_owner) == ("acme", True)
    assert member.user.check_password("demo-password")
    admin.refresh_from_db()
    assert admin.is_superuser and admin.check_password("changed-after-the-first-run")


def test_seed_demo_refuses_to_run_with_debug_off(settings):
    settings.DEBUG = False

    with pytest.raises(CommandError, match="DEBUG off"):
        call_command("seed_demo", stdout=StringIO())
    assert not Customer.objects.exists()
