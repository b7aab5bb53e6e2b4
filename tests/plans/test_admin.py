"""The catalogue admin: plan pages, the pricing preview, tier validation."""

import re
from decimal import Decimal

import pytest
from django.urls import reverse

from plans.models import FeatureCost, OverageTier, Plan
from tests.factories import FeatureFactory, free_plan, pro_plan, set_tiers

pytestmark = pytest.mark.django_db


def preview_lines(response) -> list[str]:
    html = response.content.decode()
    block = re.search(r'<ul class="pricing-preview">(.*?)</ul>', html, re.S)
    assert block, "the plan page has no pricing preview"
    return re.findall(r"<li>(.*?)</li>", block.group(1))


def plan_form(**overrides) -> dict:
    """What the admin's add-plan form posts, with no feature costs and no tiers."""
    data = {
        "code": "team", "name": "Team", "currency": "USD", "interval": "month", "is_active": "on",
        "base_price": "49", "included_credits": "10000", "overage_enabled": "on", "overage_unit_price": "0.002",
        "overage_cap": "", "cap_behaviour": "pause", "hard_limit_behaviour": "block",
        "rollover_policy": "none", "rollover_max_credits": "",
        "feature_costs-TOTAL_FORMS": "0", "feature_costs-INITIAL_FORMS": "0",
        "feature_costs-MIN_NUM_FORMS": "0", "feature_costs-MAX_NUM_FORMS": "1000",
        "overage_tiers-TOTAL_FORMS": "0", "overage_tiers-INITIAL_FORMS": "0",
        "overage_tiers-MIN_NUM_FORMS": "0", "overage_tiers-MAX_NUM_FORMS": "1000",
    }
    data.update(overrides)
    return data


def with_tiers(data: dict, *tiers) -> dict:
    data["overage_tiers-TOTAL_FORMS"] = str(len(tiers))
    for index, (up_to, unit_price) in enumerate(tiers):
        data[f"overage_tiers-{index}-up_to"] = up_to
        data[f"overage_tiers-{index}-unit_price"] = unit_price
    return data


def test_plan_changelist_lists_plans(admin_client):
    pro_plan()
    free_plan()

    response = admin_client.get(reverse("admin:plans_plan_changelist"))

    assert response.status_code == 200
    assert b">pro<" in response.content and b">free<" in response.content


def test_feature_and_credit_pack_admin_pages_load(admin_client):
    FeatureFactory(code="gpt-4o")
    for name in ("feature", "creditpack"):
        assert admin_client.get(reverse(f"admin:plans_{name}_changelist")).status_code == 200
        assert admin_client.get(reverse(f"admin:plans_{name}_add")).status_code == 200


def test_pro_plan_page_previews_59_dollars_at_15000_credits(admin_client):
    plan = pro_plan()

    response = admin_client.get(reverse("admin:plans_plan_change", args=[plan.pk]))

    assert response.status_code == 200
    # 0, the 10 000 included, 1.5 × included = 15 000 (listed once), 100 000.
    assert preview_lines(response) == [
        "At 0 credits this plan bills USD 49.00 (base USD 49.00 + overage USD 0.00)",
        "At 10,000 credits this plan bills USD 49.00 (base USD 49.00 + overage USD 0.00)",
        # 5 000 overage credits × $0.002 = $10.00
        "At 15,000 credits this plan bills USD 59.00 (base USD 49.00 + overage USD 10.00)",
        # 90 000 × $0.002 = $180.00
        "At 100,000 credits this plan bills USD 229.00 (base USD 49.00 + overage USD 180.00)",
    ]


def test_preview_prices_overage_through_the_plans_tiers(admin_client):
    plan = set_tiers(pro_plan(), ("1000", "0.002"), (None, "0.001"))

    response = admin_client.get(reverse("admin:plans_plan_change", args=[plan.pk]))

    # 5 000 overage credits: 1 000 × $0.002 + 4 000 × $0.001 = $6.00
    assert "At 15,000 credits this plan bills USD 55.00 (base USD 49.00 + overage USD 6.00)" in preview_lines(response)


def test_preview_uses_the_currencys_minor_units(admin_client):
    plan = pro_plan(code="pro-jpy", currency="JPY", base_price=Decimal("5000"), overage_unit_price=Decimal("0.25"))

    response = admin_client.get(reverse("admin:plans_plan_change", args=[plan.pk]))

    # 5 000 × ¥0.25 = ¥1 250; yen have no minor unit.
    assert "At 15,000 credits this plan bills JPY 6,250 (base JPY 5,000 + overage JPY 1,250)" in preview_lines(response)


def test_adding_a_plan_with_ascending_tiers_through_the_admin_saves_them(admin_client):
    data = with_tiers(plan_form(), ("10000", "0.002"), ("50000", "0.0015"), ("", "0.001"))

    response = admin_client.post(reverse("admin:plans_plan_add"), data)

    assert response.status_code == 302
    plan = Plan.objects.get(code="team")
    assert [(t.up_to, t.unit_price) for t in plan.overage_tiers.all()] == [
        (Decimal("10000"), Decimal("0.002")), (Decimal("50000"), Decimal("0.0015")), (None, Decimal("0.001")),
    ]


def test_adding_a_plan_with_descending_tiers_shows_the_error_and_writes_nothing(admin_client):
    data = with_tiers(plan_form(), ("50000", "0.002"), ("10000", "0.0015"), ("", "0.001"))

    response = admin_client.post(reverse("admin:plans_plan_add"), data)

    assert response.status_code == 200
    assert "Overage tier bounds must be positive and strictly ascending." in response.content.decode()
    assert not Plan.objects.exists()
    assert not OverageTier.objects.exists()


def test_a_bounded_last_tier_is_refused(admin_client):
    data = with_tiers(plan_form(), ("10000", "0.002"), ("50000", "0.0015"))

    response = admin_client.post(reverse("admin:plans_plan_add"), data)

    assert response.status_code == 200
    assert "The last overage tier must be open-ended (no up_to)." in response.content.decode()
    assert not Plan.objects.exists()


def test_a_deleted_tier_row_is_left_out_of_the_check(admin_client):
    plan = set_tiers(pro_plan(), ("10000", "0.002"), (None, "0.001"))
    first, last = plan.overage_tiers.all()
    data = plan_form(code="pro", name="Pro", **{
        "overage_tiers-TOTAL_FORMS": "2", "overage_tiers-INITIAL_FORMS": "2",
        "overage_tiers-0-id": str(first.pk), "overage_tiers-0-plan": str(plan.pk),
        "overage_tiers-0-up_to": "10000", "overage_tiers-0-unit_price": "0.002",
        "overage_tiers-1-id": str(last.pk), "overage_tiers-1-plan": str(plan.pk),
        "overage_tiers-1-up_to": "", "overage_tiers-1-unit_price": "0.001", "overage_tiers-1-DELETE": "on",
    })

    response = admin_client.post(reverse("admin:plans_plan_change", args=[plan.pk]), data)

    # Without the deleted open-ended row the remaining tier is bounded: refused.
    assert response.status_code == 200
    assert "The last overage tier must be open-ended (no up_to)." in response.content.decode()
    assert plan.overage_tiers.count() == 2


def test_negative_prices_and_credits_are_refused(admin_client):
    data = with_tiers(plan_form(base_price="-1", included_credits="-5"), ("", "-0.001"))

    response = admin_client.post(reverse("admin:plans_plan_add"), data)

    assert response.status_code == 200
    assert response.content.decode().count("Ensure this value is greater than or equal to 0.") == 3
    assert not Plan.objects.exists()


def test_feature_costs_are_edited_inline(admin_client):
    feature = FeatureFactory(code="gpt-4o")
    data = plan_form(**{
        "feature_costs-TOTAL_FORMS": "1", "feature_costs-0-feature": str(feature.pk),
        "feature_costs-0-credits_per_unit": "8",
    })

    response = admin_client.post(reverse("admin:plans_plan_add"), data)

    assert response.status_code == 302
    assert FeatureCost.objects.get(plan__code="team").credits_per_unit == Decimal("8")


def test_a_credit_pack_with_a_negative_price_is_refused(admin_client):
    response = admin_client.post(reverse("admin:plans_creditpack_add"), {
        "code": "credits-5k", "name": "5 000 credits", "credits": "5000", "price": "-10", "currency": "USD",
        "expires_after_days": "", "is_active": "on",
    })

    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 0." in response.content.decode()


def test_a_plans_code_cannot_be_changed_once_created(admin_client):
    plan = pro_plan()

    response = admin_client.get(reverse("admin:plans_plan_change", args=[plan.pk]))

    assert 'name="code"' not in response.content.decode()


def test_preview_of_a_plan_without_overage_says_what_happens_at_the_limit(admin_client):
    plan = free_plan()

    response = admin_client.get(reverse("admin:plans_plan_change", args=[plan.pk]))

    assert "At 1,500 credits this plan bills USD 0.00 (base USD 0.00 + overage USD 0.00)" in preview_lines(response)
    assert "Overage is off: beyond the included credits, deny usage (classic hard stop at zero)." in (
        response.content.decode())


def test_price_terms_of_a_plan_in_use_are_fixed_in_the_admin(admin_client):
    from datetime import datetime, timezone

    from django.urls import reverse

    from tests.factories import make_customer, pro_plan

    plan = pro_plan()
    make_customer(plan, started_at=datetime(2026, 5, 1, tzinfo=timezone.utc))
    url = reverse("admin:plans_plan_change", args=[plan.pk])

    page = admin_client.get(url)
    admin_client.post(url, {"name": "Pro renamed", "base_price": "1", "included_credits": "99999999",
                            "feature_costs-TOTAL_FORMS": "0", "feature_costs-INITIAL_FORMS": "0",
                            "overage_tiers-TOTAL_FORMS": "0", "overage_tiers-INITIAL_FORMS": "0"})

    plan.refresh_from_db()
    assert "Fixed: customers are or were on this plan" in page.content.decode()
    assert plan.name == "Pro renamed"  # names may change
    assert (plan.base_price, plan.included_credits) == (49, 10000)  # price terms may not
