"""May this customer use this feature now? And reservations: holds on credits that
make the answer stick when many requests race for the last credits."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from billing.errors import Conflict, NeedsDatabase, NotFound
from billing.models import Customer, Reservation, ReservationHold
from billing.services.customers import current_period, live_subscription
from billing.services.ledger import CustomerLedger, Reason
from billing.services.locks import lock_customer
from billing.services.positions import Position, customer_position
from billing.services.metering import credits_for
from plans.models import Feature
from plans.money import ZERO, quantize_credits


@dataclass
class EntitlementDecision:
    allowed: bool
    reason: str
    credits_required: Decimal
    credits_remaining: Decimal
    overage_credits: Decimal
    estimated_overage_amount: Decimal
    currency: str | None
    reservation: Reservation | None = None


def check_entitlement(*, customer_external_id: str, feature_code: str, quantity: Decimal, now: datetime,
                      reserve: bool = False, reservation_ttl_seconds: int | None = None,
                      cached_only: bool = False) -> EntitlementDecision:
    """Decide whether `quantity` of `feature_code` may be used now, with the same rules
    an event would be charged by. With `reserve`, hold the credits (and the overage
    room under the cap) until an event settles the reservation, it is released, or it
    expires."""
    if not reserve:
        # cached_only: answer from a cached position or raise NeedsDatabase (the check server's event loop).
        return _check_position(customer_position(customer_external_id=customer_external_id, now=now,
                                                 cached_only=cached_only), feature_code, quantity, now)
    if cached_only:
        raise NeedsDatabase("a reservation is written under the customer's lock")
    customer = Customer.objects.filter(external_id=customer_external_id).first()
    if customer is None:
        raise NotFound(f"No customer with external_id {customer_external_id!r}.", code="customer_not_found",
                       field="customer")
    feature = Feature.objects.filter(code=feature_code).first()
    if feature is None:
        return _denied(Reason.UNKNOWN_FEATURE)
    period = current_period(customer=customer, now=now)
    subscription = live_subscription(customer)
    if period is None or subscription is None:
        return _denied(Reason.NO_SUBSCRIPTION)
    credits = credits_for(period.plan, feature, quantity)
    ttl = reservation_ttl_seconds or settings.OVERAGE_RESERVATION_TTL_SECONDS
    with transaction.atomic():
        lock_customer(customer.pk)
        period.refresh_from_db()
        ledger = CustomerLedger(customer, subscription, now=now)
        charge = ledger.plan_charge(period=period, feature=feature, credits=credits, at=now)
        reservation = None
        if charge.allowed:
            # A hold cannot outlive what it holds: it ends no later than the period (whose
            # overage room it may hold) and the soonest expiry among its grants, so an
            # event settling it in time can always use every credit it holds.
            expires_at = min([now + timedelta(seconds=ttl), period.end]
                             + [d.grant.expires_at for d in charge.draws if d.grant.expires_at is not None])
            reservation = Reservation.objects.create(
                customer=customer, feature=feature, period=period, quantity=quantity, credits=credits,
                overage_credits=charge.overage_credits, created_at=now, expires_at=expires_at,
            )
            ReservationHold.objects.bulk_create(
                ReservationHold(reservation=reservation, grant=draw.grant, credits=draw.credits) for draw in charge.draws
            )
        return _decision(charge, reservation)


def _check_position(position: Position, feature_code: str, quantity: Decimal, now: datetime) -> EntitlementDecision:
    """Decide from a (possibly cached) position: the same `plan_charge` as an event."""
    feature = position.features.get(feature_code)
    if feature is None:
        return _denied(Reason.UNKNOWN_FEATURE)
    if position.period is None:
        return _denied(Reason.NO_SUBSCRIPTION)
    credits = quantize_credits(quantity * position.credits_per_unit[feature.pk])
    ledger = CustomerLedger(position.customer, position.subscription, now=now, _loaded=position.loaded)
    ledger.overage_cap_known(position.period, position.overage_cap)
    return _decision(ledger.plan_charge(period=position.period, feature=feature, credits=credits, at=now))


def _decision(charge, reservation=None) -> EntitlementDecision:
    return EntitlementDecision(
        allowed=charge.allowed, reason=charge.reason, credits_required=charge.credits,
        credits_remaining=charge.available_credits,
        overage_credits=charge.overage_credits if charge.allowed else ZERO,
        estimated_overage_amount=charge.estimated_overage_amount, currency=charge.plan.currency,
        reservation=reservation,
    )


def _denied(reason: str) -> EntitlementDecision:
    return EntitlementDecision(allowed=False, reason=reason, credits_required=ZERO, credits_remaining=ZERO,
                               overage_credits=ZERO, estimated_overage_amount=ZERO, currency=None)


def reservation_release(*, reservation_id, now: datetime) -> Reservation:
    """Give a reservation's held credits back. Releasing twice is harmless; releasing a
    reservation an event already settled is a conflict."""
    reservation = Reservation.objects.filter(pk=reservation_id).first()
    if reservation is None:
        raise NotFound("No such reservation.", code="reservation_not_found")
    with transaction.atomic():
        lock_customer(reservation.customer_id)
        reservation.refresh_from_db()
        if reservation.status == Reservation.Status.SETTLED:
            raise Conflict("This reservation was already settled by an event.", code="reservation_settled")
        if reservation.status == Reservation.Status.ACTIVE:
            reservation.status = Reservation.Status.RELEASED
            reservation.ended_at = now
            reservation.save(update_fields=["status", "ended_at"])
    return reservation


def reservation_status(reservation: Reservation, now: datetime) -> str:
    """active | settled | released | expired (an active hold past its expiry)."""
    if reservation.status == Reservation.Status.ACTIVE and reservation.expires_at <= now:
        return "expired"
    return reservation.status

