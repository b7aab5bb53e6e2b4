"""Entitlement checks answer from a cached credit position (billing/services/positions.py)
and never from a stale one: every write under a customer's lock, every admin save of a
customer or subscription and every catalogue change makes the next check rebuild it.
The check without a cache (Redis down) gives the same answers from PostgreSQL."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import Customer
from billing.services.entitlements import check_entitlement
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_event
from billing.services import positions, refresh_ahead
from billing.services.positions import POSITION_KEY, _build
from plans.models import Feature, FeatureCost
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10, 9)


@pytest.fixture(autouse=True)
def position_cache(settings):
    """On, whatever the environment (tests run in one process, so a local cache is shared)."""
    settings.OVERAGE_POSITION_CACHE_SECONDS = 30


@pytest.fixture
def acme():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    return make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")


def check(quantity="1", now=NOW, **kwargs):
    return check_entitlement(customer_external_id="acme", feature_code="gpt-4o", quantity=Decimal(quantity), now=now,
                             **kwargs)


def uncached(quantity="1", now=NOW):
    """The same decision from a position built from the database right now."""
    from billing.services.entitlements import _check_position

    return _check_position(_build("acme", now, generation="", catalogue=""), "gpt-4o", Decimal(quantity), now)


def make_due_from(seconds):
    """The position's lifetime, drawn at random when built, made certain here and in the
    shared copy (a refresh adopts a shared copy that is not due)."""
    position = positions._recent["acme"]
    position.lifetime = timedelta(seconds=seconds)
    cache.set(POSITION_KEY.format("acme"), position)


def event(event_id, quantity, now=NOW):
    record_event(event=EventInput(event_id=event_id, customer="acme", feature="gpt-4o", quantity=Decimal(quantity),
                                  timestamp=now), now=now)


@time_machine.travel(NOW, tick=False)
def test_a_repeated_check_reads_nothing_from_the_database(acme, django_assert_num_queries):
    first = check()
    with django_assert_num_queries(0):
        again = check()
    assert again == first and first.credits_remaining == Decimal("10000")


@time_machine.travel(NOW, tick=False)
def test_a_process_reuses_its_own_copy_while_the_tokens_match(acme, django_assert_num_queries):
    """The shared copy gone (evicted, or never written by this process), the process's
    own copy still answers; a write renews the token and the copy is not used again."""
    first = check()
    cache.delete(POSITION_KEY.format("acme"))
    with django_assert_num_queries(0):
        assert check() == first
    event("e1", "999")
    assert check().credits_remaining == Decimal("10")


@time_machine.travel(NOW, tick=False)
def test_every_write_is_seen_by_the_next_check(acme):
    assert check().credits_remaining == Decimal("10000")
    event("e1", "999")  # 9 990 credits
    assert check().credits_remaining == Decimal("10")
    grant_credits_once(customer=acme, idempotency_key="promo", credits=Decimal("500"), source="promotional", now=NOW)
    assert check().credits_remaining == Decimal("510")
    hold = check("50", reserve=True)  # holds the 500 credits (and 10 of the included)
    assert hold.allowed and check().credits_remaining == Decimal("10")
    event("e2", "100")  # 1 000 credits: the 10 unheld promotional ones, then 990 overage at 0.002
    decision = check("1")  # 10 more overage credits: USD 2.00 for the period if it goes through
    assert (decision.reason, decision.estimated_overage_amount) == ("overage", Decimal("2.00"))
    assert decision == uncached("1")


@time_machine.travel(NOW, tick=False)
def test_admin_saves_and_catalogue_changes_are_seen(acme):
    event("e1", "1000")  # all 10 000 included credits used
    assert (check("100").allowed, check("100").reason) == (True, "overage")  # USD 2.00 ≤ the USD 5 cap
    customer = Customer.objects.get(pk=acme.pk)
    customer.overage_cap_override = Decimal("1")
    customer.save()  # the admin lowers this customer's cap
    assert check("100").reason == "spend_cap_reached"
    customer.overage_cap_override = None
    customer.save()
    assert check("100").reason == "overage"
    FeatureCost.objects.create(plan=acme.subscriptions.get().plan, feature=Feature.objects.get(code="gpt-4o"),
                               credits_per_unit=Decimal("50"))  # the business reprices the feature
    assert check("100").credits_required == Decimal("5000")
    assert check("100").reason == "spend_cap_reached"  # 5 000 credits × 0.002 = USD 10 > USD 5


def test_a_new_period_and_an_expired_hold_are_seen_without_any_write(acme):
    with time_machine.travel(NOW, tick=False):
        hold = check("999", reserve=True, reservation_ttl_seconds=10)
        assert hold.allowed and check().credits_remaining == Decimal("10")  # cached from here
    later = hold.reservation.expires_at + timedelta(seconds=1)  # within the cache's 30 s
    with time_machine.travel(later, tick=False):
        assert check(now=later).credits_remaining == Decimal("10000")  # the hold expired
    with time_machine.travel(utc(2026, 6, 1, 0, 0, 1), tick=False):
        assert check(now=utc(2026, 6, 1, 0, 0, 1)).credits_remaining == Decimal("10000")  # June's allotment


@time_machine.travel(NOW, tick=False)
def test_without_the_cache_checks_read_the_database_every_time(acme, settings, django_assert_max_num_queries):
    settings.OVERAGE_POSITION_CACHE_SECONDS = 0
    check()
    with django_assert_max_num_queries(20) as queries:
        assert check().credits_remaining == Decimal("10000")
    assert len(queries) > 0


@time_machine.travel(NOW, tick=False)
def test_with_the_cache_down_checks_come_from_the_database(acme, settings):
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}  # nothing listens there
    assert check().credits_remaining == Decimal("10000")
    event("e1", "999")
    assert check().credits_remaining == Decimal("10")
    assert check("2").reason == "overage"


def test_positions_built_together_are_not_due_together(acme):
    """Each position's lifetime, from which it is rebuilt in the background, is drawn
    between half and all of OVERAGE_POSITION_CACHE_SECONDS (30 s here): customers whose
    positions were built in the same instant are refreshed over 15 s, not in one burst."""
    lifetimes = {_build("acme", NOW, generation="", catalogue="").lifetime for _ in range(50)}
    assert len(lifetimes) > 40
    assert all(timedelta(seconds=15) <= lifetime <= timedelta(seconds=30) for lifetime in lifetimes)


@pytest.mark.django_db(transaction=True)  # the background rebuild reads through its own connection
def test_a_position_past_its_lifetime_is_answered_and_rebuilt_in_the_background():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")
    with time_machine.travel(NOW, tick=False):
        first = check()
    make_due_from(15)
    later = NOW + timedelta(seconds=20)
    with time_machine.travel(later, tick=False):
        with CaptureQueriesContext(connection) as queries:
            assert check(now=later) == first  # answered at once from the position it has
        assert len(queries) == 0
        refresh_ahead.drained().result(timeout=30)  # the rebuild queued before it is done
        assert positions._recent["acme"].built_at == later
        with CaptureQueriesContext(connection) as queries:
            assert check(now=later) == first
        assert len(queries) == 0


@pytest.mark.django_db(transaction=True)
def test_a_due_position_adopts_the_copy_another_process_rebuilt():
    """The refresh of a due position reads the shared copy first: another process (or
    the worker) rebuilt it a second ago, so it is taken as it is, not built again."""
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")
    with time_machine.travel(NOW, tick=False):
        check()
    make_due_from(15)
    ours = positions._recent["acme"]
    elsewhere = NOW + timedelta(seconds=19)
    with time_machine.travel(elsewhere, tick=False):
        positions.rebuild_position("acme")  # what the worker does for another process
        assert cache.get(POSITION_KEY.format("acme")).built_at == elsewhere
    positions._recent["acme"] = ours  # this process still holds its own, now due
    later = NOW + timedelta(seconds=20)
    with time_machine.travel(later, tick=False):
        check(now=later)
        refresh_ahead.drained().result(timeout=30)
    assert positions._recent["acme"].built_at == elsewhere  # adopted, not rebuilt at `later`


@pytest.mark.django_db(transaction=True)
def test_one_rebuild_is_asked_for_all_processes_and_retried_once_its_lease_lapses():
    """While another process holds the customer's rebuild lease, this one keeps
    answering from its copy and asks again at most once a second; once the lease is
    gone, its refresh rebuilds (here in the refresh thread: no broker, the task runs
    where it is sent)."""
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")
    with time_machine.travel(NOW, tick=False):
        first = check()
    make_due_from(15)
    assert cache.add(positions.REBUILD_KEY.format("acme"), "elsewhere", timeout=60)
    for seconds in (20, 20.5):
        at = NOW + timedelta(seconds=seconds)
        with time_machine.travel(at, tick=False):
            assert check(now=at) == first
            refresh_ahead.drained().result(timeout=30)
        assert positions._recent["acme"].built_at == NOW  # nobody here rebuilt it
    assert positions._recent["acme"].refresh_asked_at == NOW + timedelta(seconds=20)  # 20.5 s did not ask
    cache.delete(positions.REBUILD_KEY.format("acme"))  # the other process's rebuild was lost
    at = NOW + timedelta(seconds=21)
    with time_machine.travel(at, tick=False):
        assert check(now=at) == first
        refresh_ahead.drained().result(timeout=30)
    assert positions._recent["acme"].built_at == at
    assert cache.get(positions.REBUILD_KEY.format("acme")) is None  # released by the rebuild


@pytest.mark.django_db(transaction=True)
def test_with_the_broker_down_a_due_position_is_rebuilt_in_the_refresh_thread(monkeypatch):
    """With a broker, the rebuild is a Celery task; when the broker is down it is done
    in the refresh thread as before (not left to the 30 s bound), and the lease is
    released."""
    from billing import tasks
    from billing.services import commit_hooks

    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")
    with time_machine.travel(NOW, tick=False):
        first = check()
    make_due_from(15)
    conf = tasks.rebuild_position_task.app.conf
    eager = conf.task_always_eager
    monkeypatch.setattr(commit_hooks, "_broker_down_until", float("inf"))
    conf.task_always_eager = False  # as with a broker configured
    try:
        later = NOW + timedelta(seconds=20)
        with time_machine.travel(later, tick=False):
            assert check(now=later) == first
            refresh_ahead.drained().result(timeout=30)
            assert positions._recent["acme"].built_at == later
            assert cache.get(positions.REBUILD_KEY.format("acme")) is None
    finally:
        conf.task_always_eager = eager


@time_machine.travel(NOW, tick=False)
def test_a_position_as_old_as_the_setting_is_rebuilt_before_answering(acme):
    check()
    at = NOW + timedelta(seconds=30)
    with time_machine.travel(at, tick=False), CaptureQueriesContext(connection) as queries:
        assert check(now=at).credits_remaining == Decimal("10000")
    assert len(queries) > 0
