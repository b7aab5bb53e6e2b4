"""The billing admin: a read-only window on the ledger; customers, grants and API keys
created through the services."""

from decimal import Decimal

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.urls import reverse

from billing.models import ApiKey, CreditGrant, Customer, LedgerEntry, Subscription, UsageEvent
from billing.services.api_keys import api_key_authenticate, api_key_create
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def customer():
    with time_machine.travel(NOW, tick=False):
        customer = make_customer(pro_plan(), started_at=START, now=NOW, external_id="acme")
        FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
        record_event(event=EventInput(event_id="e1", customer="acme", feature="gpt-4o", quantity=Decimal("25"),
                                      timestamp=utc(2026, 3, 10)), now=NOW)
    return customer


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@time_machine.travel(NOW, tick=False)
def test_every_billing_admin_page_loads(admin_client, customer):
    grant = CreditGrant.objects.get(customer=customer)
    pages = {
        "customer": customer.pk, "subscription": Subscription.objects.get().pk,
        "billingperiod": customer.periods.get().pk, "creditgrant": grant.pk,
        "ledgerentry": LedgerEntry.objects.first().pk, "usageevent": UsageEvent.objects.get().pk,
        "apikey": api_key_create(name="ci")[0].pk,
    }
    for model, pk in pages.items():
        assert admin_client.get(reverse(f"admin:billing_{model}_changelist")).status_code == 200, model
        assert admin_client.get(reverse(f"admin:billing_{model}_change", args=[pk])).status_code == 200, model
    assert admin_client.get(reverse("admin:billing_reservation_changelist")).status_code == 200
    by_year = admin_client.get(reverse("admin:billing_usageevent_changelist"), {"timestamp__year": "2026"})
    assert by_year.status_code == 200


@time_machine.travel(NOW, tick=False)
def test_customer_page_shows_the_current_balance(admin_client, customer):
    response = admin_client.get(reverse("admin:billing_customer_change", args=[customer.pk]))

    # 10 000 included − 25 calls × 10 credits
    assert "9,750 credits: 9,750 included, 0 purchased" in response.content.decode()


@time_machine.travel(NOW, tick=False)
def test_billing_period_list_prices_the_cached_overage(admin_client, customer):
    record_event(event=EventInput(event_id="e2", customer="acme", feature="gpt-4o", quantity=Decimal("1100"),
                                  timestamp=utc(2026, 3, 11)), now=NOW)

    response = admin_client.get(reverse("admin:billing_billingperiod_changelist"))

    # 11 250 − 10 000 included = 1 250 overage credits × $0.002 = $2.50
    assert "USD 2.50" in response.content.decode()


@time_machine.travel(NOW, tick=False)
def test_ledger_entries_cannot_be_added_changed_or_deleted_in_the_admin(admin_client, customer):
    entry = LedgerEntry.objects.first()
    before = list(LedgerEntry.objects.values_list("pk", "credits"))

    assert admin_client.get(reverse("admin:billing_ledgerentry_add")).status_code == 403
    view = admin_client.get(reverse("admin:billing_ledgerentry_change", args=[entry.pk]))
    assert view.status_code == 200 and 'name="credits"' not in view.content.decode()
    assert admin_client.post(reverse("admin:billing_ledgerentry_change", args=[entry.pk]),
                             {"credits": "1"}).status_code == 403
    assert admin_client.post(reverse("admin:billing_ledgerentry_delete", args=[entry.pk]),
                             {"post": "yes"}).status_code == 403
    changelist = admin_client.get(reverse("admin:billing_ledgerentry_changelist"))
    assert "delete_selected" not in changelist.content.decode()
    assert list(LedgerEntry.objects.values_list("pk", "credits")) == before


def test_revoke_action_sets_revoked_at_and_the_key_stops_working(admin_client):
    revoked_row, revoked_key = api_key_create(name="leaked")
    kept_row, kept_key = api_key_create(name="kept")

    with time_machine.travel(NOW, tick=False):
        response = admin_client.post(reverse("admin:billing_apikey_changelist"), {
            "action": "revoke_keys", "_selected_action": [str(revoked_row.pk)],
        })

    assert response.status_code == 302
    revoked_row.refresh_from_db()
    kept_row.refresh_from_db()
    assert revoked_row.revoked_at == NOW
    assert kept_row.revoked_at is None
    assert api_key_authenticate(revoked_key) is None
    assert api_key_authenticate(kept_key) == kept_row


def test_adding_a_key_in_the_admin_shows_the_plaintext_once_and_never_the_hash(admin_client):
    response = admin_client.post(reverse("admin:billing_apikey_add"), {"name": "zapier", "scopes": ["read"]})

    assert response.status_code == 302
    api_key = ApiKey.objects.get(name="zapier")
    assert api_key.scopes == ["read"]
    [created] = [m for m in messages_of(response) if "cannot be shown again" in m]
    key = created.rsplit(" ", 1)[-1]
    assert api_key_authenticate(key) == api_key
    # The message is shown on the next page, once; no later page shows the key.
    next_page = admin_client.get(response.url).content.decode()
    assert key in next_page
    for url in (reverse("admin:billing_apikey_changelist"), reverse("admin:billing_apikey_change", args=[api_key.pk])):
        page = admin_client.get(url).content.decode()
        assert key not in page
        assert api_key.key_hash not in page
    assert api_key.key_hash not in next_page


@time_machine.travel(NOW, tick=False)
def test_admin_grant_goes_through_the_service_and_a_resubmitted_form_grants_once(admin_client, customer):
    form = admin_client.get(reverse("admin:billing_creditgrant_add"))
    request_key = form.context["adminform"].form["request_key"].value()
    data = {"customer": str(customer.pk), "source": "promotional", "credits": "500", "expires_at_0": "",
            "expires_at_1": "", "description": "Launch week", "reason": "Launch promotion",
            "request_key": request_key}

    first = admin_client.post(reverse("admin:billing_creditgrant_add"), data)
    second = admin_client.post(reverse("admin:billing_creditgrant_add"), data)

    assert first.status_code == second.status_code == 302
    grant = CreditGrant.objects.get(customer=customer, source="promotional")
    assert (grant.credits, grant.remaining, grant.effective_at) == (Decimal("500"), Decimal("500"), NOW)
    assert grant.idempotency_key == f"admin:{request_key}"
    assert grant.entries.get().credits == Decimal("500")
    assert any("Nothing new was granted" in m for m in messages_of(second))
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
def test_admin_grant_refuses_other_sources_and_past_expiry(admin_client, customer):
    data = {"customer": str(customer.pk), "source": "purchase", "credits": "500", "expires_at_0": "2026-03-01",
            "expires_at_1": "00:00:00", "description": "", "reason": "Goodwill", "request_key": "k1"}

    response = admin_client.post(reverse("admin:billing_creditgrant_add"), data)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"source", "expires_at"}
    assert not CreditGrant.objects.filter(source__in=["purchase", "promotional"]).exists()


@time_machine.travel(NOW, tick=False)
def test_adding_a_customer_in_the_admin_subscribes_it_and_grants_included_credits(admin_client, django_user_model):
    plan = pro_plan()
    user = django_user_model.objects.create_user("ap@globex.test", "ap@globex.test", "pw")

    response = admin_client.post(reverse("admin:billing_customer_add"), {
        "external_id": "globex", "name": "Globex", "email": "ap@globex.test", "plan": str(plan.pk),
        "started_at_0": "2026-03-01", "started_at_1": "00:00:00",
        "members-TOTAL_FORMS": "1", "members-INITIAL_FORMS": "0", "members-MIN_NUM_FORMS": "0",
        "members-MAX_NUM_FORMS": "1000", "members-0-user": str(user.pk), "members-0-is_owner": "on",
    })

    assert response.status_code == 302
    customer = Customer.objects.get(external_id="globex")
    subscription = customer.subscriptions.get()
    assert (subscription.plan, subscription.started_at) == (plan, START)
    assert customer.grants.get().credits == Decimal("10000")
    assert customer.members.get().user == user
    assert_ledger_consistent()
