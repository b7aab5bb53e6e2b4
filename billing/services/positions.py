"""A customer's credit position for entitlement checks, cached.

The check is the hottest read: integrators ask before every call they serve. It needs
what `CustomerLedger.plan_charge` reads (subscription, current period with its plan,
usable grants, active holds, the overage cap) and the catalogue (features, costs). A
`Position` is that, built from the database, kept in the cache (Redis in production)
and reused while all of these hold:

- the customer's *generation token* is still the one it was built under. Every
  transaction that locks a customer (which every write to its credits, periods,
  reservations, caps or plan does) sets a new token when it locks and again once it
  commits; so do saves of a customer or subscription outside a lock (the admin). The
  token is read before the database, so a write that commits while a position is being
  built makes it stale at once rather than after the fact;
- the catalogue token is unchanged (any save of a plan, tier, feature or feature cost);
- `now` is still inside the position's period, and the position is younger than
  `OVERAGE_POSITION_CACHE_SECONDS` (a bound for a token change lost to a cache outage).
  The setting is 0 (off) unless Redis is configured: a per-process cache would not see
  the other processes' token changes.

Refresh ahead: from its *lifetime* on, the setting times a factor drawn between ½ and 1
when it is built, a position is still answered from but refreshed in the background
(billing/services/refresh_ahead.py: one thread per process, one refresh per customer at
a time), so a busy customer's checks do not wait for a rebuild every 30 s, and positions
built together (a restart, a warm-up) are not all rebuilt in the same instant. Rebuilding
on the request path every 30 s made the check's p99 five times its p50
(docs/benchmarks.md). The refresh adopts the shared copy in Redis when another process
has rebuilt it since; otherwise it takes the customer's rebuild lease (one for all
processes) and leaves the rebuild to a Celery task, so the check processes only read
Redis: a rebuild's ~10 ms of ORM work beside a check server's event loop held up the
checks around it (the p99 of 11-17 ms). Without a broker the task runs in the refresh
thread, as before. If no worker runs, positions reach the hard bound and are rebuilt
on the check's path: slower, never wrong.

Guarantee: a check answers from a position reflecting every write whose commit
finished before the check began, except in the instant between a write's commit and
its token change, so it can allow at most the credits of writes in flight. Reserving
(`reserve=True`) always reads the database under the customer's lock. If the cache is
unreachable, positions are built from the database every time: slower, never wrong.
"""

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db.models import prefetch_related_objects

from billing.errors import NeedsDatabase, NotFound
from billing.models import BillingPeriod, CreditGrant, Customer, Subscription
from billing.services.commit_hooks import after_commit
from billing.services.refresh_ahead import refresh_later
from plans.models import Feature, FeatureCost

logger = logging.getLogger(__name__)

POSITION_KEY = "overage:position:{}"
REBUILD_KEY = "overage:position-rebuild:{}"  # the lease of the one rebuild asked for, across processes
REBUILD_LEASE_SECONDS = 10  # a rebuild lost (worker killed) is asked for again after this
REFRESH_RETRY = timedelta(seconds=1)  # a process asks again for a due position at most this often
GENERATION_KEY = "overage:position-generation:{}"
CATALOGUE_KEY = "overage:position-catalogue"


@dataclass
class Position:
    customer: Customer
    subscription: Subscription | None
    period: BillingPeriod | None
    # What `CustomerLedger` loads: (usable grants in consumption order, grant scopes, holds).
    loaded: tuple[list[CreditGrant], dict, dict]
    overage_cap: Decimal | None
    features: dict[str, Feature]
    credits_per_unit: dict[int, Decimal]  # feature id → the period plan's cost
    generation: str
    catalogue: str
    built_at: datetime
    # When a background rebuild is due: at most OVERAGE_POSITION_CACHE_SECONDS, drawn per
    # position (see the module's docstring).
    lifetime: timedelta | None = None
    # When this process last asked for it to be refreshed (not shared: set after caching).
    refresh_asked_at: datetime | None = None

    def usable_at(self, now: datetime) -> bool:
        fresh = now - self.built_at < timedelta(seconds=settings.OVERAGE_POSITION_CACHE_SECONDS)
        in_period = self.period is None or self.period.start <= now < self.period.end
        return fresh and in_period and self.built_at <= now

    def due_for_refresh(self, now: datetime) -> bool:
        return self.lifetime is None or now - self.built_at >= self.lifetime

    def valid_for(self, generation: str, catalogue: str, now: datetime) -> bool:
        return (self.generation, self.catalogue) == (generation, catalogue) and self.usable_at(now)


def customer_position(*, customer_external_id: str, now: datetime, cached_only: bool = False) -> Position:
    """The customer's position now: from the cache when still valid, else built from the
    database (and cached). With `cached_only`, a position that would have to be built
    (or a cache that cannot be read) raises NeedsDatabase instead."""
    if settings.OVERAGE_POSITION_CACHE_SECONDS <= 0:
        if cached_only:
            raise NeedsDatabase("positions are not cached")
        return _build(customer_external_id, now, generation="", catalogue="")
    try:
        generation, catalogue = _tokens(customer_external_id)

        def valid(position: Position | None) -> bool:
            return position is not None and position.valid_for(generation, catalogue, now)

        position = _recent.get(customer_external_id)
        if not valid(position):
            position = cache.get(POSITION_KEY.format(customer_external_id))  # another process's, maybe
    except Exception:  # noqa: BLE001 - the cache is an optimisation; the database is the truth
        if cached_only:
            raise NeedsDatabase("the position cache is unreachable") from None
        logger.warning("position cache unreachable; checking from the database", exc_info=True)
        return _build(customer_external_id, now, generation="", catalogue="")
    if valid(position):
        if position.due_for_refresh(now) and (position.refresh_asked_at is None
                                               or now - position.refresh_asked_at >= REFRESH_RETRY):
            position.refresh_asked_at = now
            refresh_later(f"position:{customer_external_id}", lambda: _refresh(customer_external_id))
    elif cached_only:
        raise NeedsDatabase("the position must be built")
    else:
        position = _build_and_cache(customer_external_id, now, generation=generation, catalogue=catalogue)
    _remember(customer_external_id, position)
    return position


def _tokens(customer_external_id: str) -> tuple[str, str]:
    """The customer's generation token and the catalogue token, read before the database."""
    generation_key = GENERATION_KEY.format(customer_external_id)
    tokens = cache.get_many([generation_key, CATALOGUE_KEY])
    # A missing token gets a new one, which no cached position carries.
    return (tokens.get(generation_key) or _new_token(generation_key),
            tokens.get(CATALOGUE_KEY) or _new_token(CATALOGUE_KEY))


def _build_and_cache(customer_external_id: str, now: datetime, *, generation: str, catalogue: str) -> Position:
    position = _build(customer_external_id, now, generation=generation, catalogue=catalogue)
    try:
        cache.set(POSITION_KEY.format(customer_external_id), position, timeout=settings.OVERAGE_POSITION_CACHE_SECONDS)
    except Exception:  # noqa: BLE001
        logger.warning("could not cache the position of %s", customer_external_id, exc_info=True)
    return position


def _refresh(customer_external_id: str) -> None:
    """Refresh a position past its lifetime (in the refresh-ahead thread): adopt the
    shared copy if it is newer and current, else ask for one rebuild for all processes."""
    from django.utils import timezone

    from billing import tasks  # lazily: services never import celery tasks at import time
    from billing.services.commit_hooks import send_now

    now = timezone.now()
    generation, catalogue = _tokens(customer_external_id)
    shared = cache.get(POSITION_KEY.format(customer_external_id))
    if shared is not None and shared.valid_for(generation, catalogue, now) and not shared.due_for_refresh(now):
        _remember(customer_external_id, shared)
        return
    lease = uuid.uuid4().hex
    if not cache.add(REBUILD_KEY.format(customer_external_id), lease, timeout=REBUILD_LEASE_SECONDS):
        return  # another process asked; its rebuild is adopted by a later refresh
    task = tasks.rebuild_position_task
    # A task that waited longer than the lease is dropped: someone has asked again by then.
    if task.app.conf.task_always_eager or not send_now(task, (customer_external_id, lease),
                                                        {"expires": REBUILD_LEASE_SECONDS}):
        # Embedded mode, or the broker down: rebuilt here, in this background thread.
        _remember(customer_external_id, rebuild_position(customer_external_id, lease))


def rebuild_position(customer_external_id: str, lease: str | None = None) -> Position:
    """Build and cache a customer's position (tokens read first, as a check does), and
    release its rebuild lease if it is still the one taken for this rebuild: the work
    of `rebuild_position_task`."""
    from django.utils import timezone

    try:
        generation, catalogue = _tokens(customer_external_id)
        return _build_and_cache(customer_external_id, timezone.now(), generation=generation, catalogue=catalogue)
    finally:
        key = REBUILD_KEY.format(customer_external_id)
        if lease is None or cache.get(key) == lease:
            cache.delete(key)


# The positions this process used last, by customer. A check whose tokens match the one
# here reads only the two tokens from Redis, not the whole position (~3.5 KB of pickled
# models to unpickle: a fifth of a check's CPU). Shared by the process's threads: checks
# only read a position (`CustomerLedger.plan_charge` decides without recording).
_recent: dict[str, Position] = {}
RECENT_POSITIONS = 10_000


def _remember(customer_external_id: str, position: Position) -> None:
    if len(_recent) >= RECENT_POSITIONS:
        _recent.clear()  # rare (more customers than this checked by one process), and cheap to refill
    _recent[customer_external_id] = position


def _new_token(key: str) -> str:
    """The key's token, creating one if there is none (first use, or evicted)."""
    cache.add(key, uuid.uuid4().hex, timeout=None)
    return cache.get(key)


def _build(customer_external_id: str, now: datetime, *, generation: str, catalogue: str) -> Position:
    # Imported here: positions is imported by locks, which these import.
    from billing.services.caps import effective_overage_cap
    from billing.services.customers import current_period, live_subscription
    from billing.services.ledger import CustomerLedger
    from billing.services.metering import feature_costs

    customer = Customer.objects.filter(external_id=customer_external_id).first()
    if customer is None:
        raise NotFound(f"No customer with external_id {customer_external_id!r}.", code="customer_not_found",
                       field="customer")
    period = current_period(customer=customer, now=now)
    subscription = live_subscription(customer)
    if period is None or subscription is None:
        period, subscription = None, None
    features = {feature.code: feature for feature in Feature.objects.all()}
    costs, cap = {}, None
    loaded = ([], {}, {})
    if period is not None:
        costs = {feature_id: cost for (_, feature_id), cost in
                 feature_costs({period.plan_id}, features.values()).items()}
        cap = effective_overage_cap(period.plan, customer, period)
        loaded = CustomerLedger._load([customer.pk], now, now)[customer.pk]
        prefetch_related_objects([period.plan], "overage_tiers")  # cached with the plan, for pricing
    return Position(customer=customer, subscription=subscription, period=period, loaded=loaded, overage_cap=cap,
                    features=features, credits_per_unit=costs, generation=generation, catalogue=catalogue,
                    built_at=now, lifetime=_lifetime())


def _lifetime() -> timedelta:
    return timedelta(seconds=settings.OVERAGE_POSITION_CACHE_SECONDS * random.uniform(0.5, 1.0))


# --- Invalidation -------------------------------------------------------------------------

def customers_changed(external_ids) -> None:
    """Give these customers new generation tokens now and again once the current
    transaction commits: the first stops positions cached before the change (and reads
    inside this transaction) from being used, the second those built from the database
    while the change was not yet committed."""
    _renew_tokens([GENERATION_KEY.format(e) for e in external_ids])


def catalogue_changed() -> None:
    _renew_tokens([CATALOGUE_KEY])


def _renew_tokens(keys: list[str]) -> None:
    """New tokens now and after the commit; nothing to do while positions are not cached
    (every lock would otherwise write to the cache for nothing)."""
    if settings.OVERAGE_POSITION_CACHE_SECONDS <= 0:
        return
    _set_new_tokens(keys)
    after_commit(_set_new_tokens, keys)


def _set_new_tokens(keys: list[str]) -> None:
    try:
        cache.set_many({key: uuid.uuid4().hex for key in keys}, timeout=None)
    except Exception:  # noqa: BLE001 - positions then expire by age (OVERAGE_POSITION_CACHE_SECONDS)
        logger.warning("could not invalidate cached positions %s", keys, exc_info=True)


def connect_signals() -> None:
    """Saves that do not go through a customer's lock (the admin editing a customer's cap
    override or a subscription; the catalogue) make cached positions stale too."""
    from django.db.models.signals import post_delete, post_save

    from plans.models import OverageTier, Plan

    def customer_saved(sender, instance, **kwargs):
        customers_changed([instance.external_id])

    def subscription_saved(sender, instance, **kwargs):
        customers_changed([instance.customer.external_id])

    def catalogue_saved(sender, **kwargs):
        catalogue_changed()

    for name, signal in (("save", post_save), ("delete", post_delete)):
        signal.connect(customer_saved, sender=Customer, weak=False, dispatch_uid=f"positions-customer-{name}")
        signal.connect(subscription_saved, sender=Subscription, weak=False,
                       dispatch_uid=f"positions-subscription-{name}")
        for model in (Plan, OverageTier, Feature, FeatureCost):
            signal.connect(catalogue_saved, sender=model, weak=False,
                           dispatch_uid=f"positions-{model.__name__}-{name}")
