"""Request validation and response shapes of /api/v1 (the public contract in
DESIGN.md: extend freely, rename never)."""

import json
import math
import re
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from rest_framework import serializers

from billing.models import CreditGrant, UsageEvent
from plans.models import Plan

from plans.money import minor_unit_exponent

from .fields import CreditsField, CurrencyAmounts, MoneyField, RateField, decimal_pattern, decimal_string

POSITIVE = Decimal("0.000001")
# Credits per unit are bounded so that quantity × cost always fits the credit columns.
MAX_CREDITS_PER_UNIT = settings.OVERAGE_MAX_CREDITS_PER_UNIT
EXTERNAL_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]*$"
MAX_PROPERTIES_BYTES = 16 * 1024
MAX_PROPERTIES_DEPTH = 5


def _check_json_value(value, depth: int = 0) -> None:
    if depth > MAX_PROPERTIES_DEPTH:
        raise serializers.ValidationError(f"Nested deeper than {MAX_PROPERTIES_DEPTH} levels.")
    if isinstance(value, float) and not math.isfinite(value):
        raise serializers.ValidationError("Numbers must be finite.")
    if isinstance(value, str) and "\x00" in value:
        raise serializers.ValidationError("Text may not contain NUL characters.")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(key, depth + 1)
            _check_json_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_value(item, depth + 1)


class PropertiesField(serializers.DictField):
    """Free-form event properties, kept as JSON: finite numbers, no NUL characters, at
    most 16 KiB and 5 levels deep."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        _check_json_value(value)
        if len(json.dumps(value, separators=(",", ":"))) > MAX_PROPERTIES_BYTES:
            raise serializers.ValidationError(f"At most {MAX_PROPERTIES_BYTES} bytes of JSON.")
        return value


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable, e.g. invalid, missing_field, customer_not_found.")
    message = serializers.CharField()
    field = serializers.CharField(allow_null=True, help_text="The offending field's path, e.g. "
                                                             "overage_tiers[1].up_to; null if none.")


class ErrorSerializer(serializers.Serializer):
    """Every API error: {"error": {"code", "message", "field"}}."""

    error = ErrorDetailSerializer()


# --- Catalogue ----------------------------------------------------------------------

class FeatureSerializer(serializers.Serializer):
    code = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=64)
    name = serializers.CharField(max_length=200)
    unit = serializers.CharField(max_length=50, required=False, default="call")
    default_credits_per_unit = CreditsField(required=False, default=Decimal("1"), min_value=Decimal("0"),
                                            max_value=MAX_CREDITS_PER_UNIT)


class OverageTierSerializer(serializers.Serializer):
    up_to = CreditsField(allow_null=True, min_value=POSITIVE,
                         help_text="Upper bound in overage credits; null for the open-ended last tier.")
    unit_price = RateField(min_value=Decimal("0"))


class RolloverSerializer(serializers.Serializer):
    policy = serializers.ChoiceField(choices=Plan.Rollover.values, default=Plan.Rollover.NONE)
    max_credits = CreditsField(allow_null=True, required=False, default=None, min_value=Decimal("0"))


class FeatureCostSerializer(serializers.Serializer):
    feature = serializers.CharField(max_length=64)
    credits_per_unit = CreditsField(min_value=Decimal("0"), max_value=MAX_CREDITS_PER_UNIT)


class PlanSerializer(CurrencyAmounts, serializers.Serializer):
    code = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=64)
    name = serializers.CharField(max_length=200)
    currency = serializers.ChoiceField(choices=[c for c, _ in Plan._meta.get_field("currency").choices], default="USD")
    interval = serializers.ChoiceField(choices=Plan.Interval.values, default=Plan.Interval.MONTH)
    base_price = MoneyField(min_value=Decimal("0"), default=Decimal("0"))
    included_credits = CreditsField(min_value=Decimal("0"), default=Decimal("0"))
    overage_enabled = serializers.BooleanField(default=False)
    overage_unit_price = RateField(min_value=Decimal("0"), default=Decimal("0"))
    overage_tiers = OverageTierSerializer(many=True, required=False, default=list)
    overage_cap = MoneyField(min_value=Decimal("0"), allow_null=True, required=False, default=None)
    cap_behaviour = serializers.ChoiceField(choices=Plan.CapBehaviour.values, default=Plan.CapBehaviour.PAUSE)
    hard_limit_behaviour = serializers.ChoiceField(choices=Plan.HardLimit.values, default=Plan.HardLimit.BLOCK)
    rollover = RolloverSerializer(required=False)
    feature_costs = FeatureCostSerializer(many=True, required=False, default=list)

    def validate_feature_costs(self, value):
        codes = [item["feature"] for item in value]
        if len(codes) != len(set(codes)):
            raise serializers.ValidationError("Each feature may appear once.")
        return value


def plan_representation(plan: Plan) -> dict:
    return {
        "code": plan.code, "name": plan.name, "currency": plan.currency, "interval": plan.interval,
        "base_price": plan.base_price, "included_credits": plan.included_credits,
        "overage_enabled": plan.overage_enabled, "overage_unit_price": plan.overage_unit_price,
        "overage_tiers": [{"up_to": t.up_to, "unit_price": t.unit_price} for t in plan.overage_tiers.all()],
        "overage_cap": plan.overage_cap, "cap_behaviour": plan.cap_behaviour,
        "hard_limit_behaviour": plan.hard_limit_behaviour,
        "rollover": {"policy": plan.rollover_policy, "max_credits": plan.rollover_max_credits},
        "feature_costs": [
            {"feature": c.feature.code, "credits_per_unit": c.credits_per_unit}
            for c in plan.feature_costs.select_related("feature").order_by("feature__code")
        ],
    }


# --- Customers ----------------------------------------------------------------------

class CustomerCreateSerializer(serializers.Serializer):
    external_id = serializers.RegexField(
        EXTERNAL_ID, max_length=255, trim_whitespace=False,
        help_text="Your id for the customer: letters, digits and _ . : @ + - (it appears in URLs).")
    name = serializers.CharField(max_length=200)
    email = serializers.EmailField(required=False, allow_blank=True, default="")
    plan = serializers.CharField(max_length=64, help_text="Plan code.")
    started_at = serializers.DateTimeField(required=False, help_text="May be in the past; defaults to now.")


class PeriodSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    status = serializers.CharField()


class SubscriptionSerializer(serializers.Serializer):
    plan = serializers.CharField(source="plan.code")
    pending_plan = serializers.CharField(source="pending_plan.code", allow_null=True,
                                         help_text="Plan that takes effect at the next period start.")
    status = serializers.CharField()
    started_at = serializers.DateTimeField()
    billing_anchor = serializers.DateTimeField()


class CustomerSerializer(serializers.Serializer):
    external_id = serializers.CharField()
    name = serializers.CharField()
    # Not EmailField: a customer may have no email, and "" is no email address.
    email = serializers.CharField(help_text="An email address, or \"\" if none was given.")
    created_at = serializers.DateTimeField()
    subscription = SubscriptionSerializer(allow_null=True)
    current_period = PeriodSerializer(allow_null=True)


class SubscriptionChangeSerializer(serializers.Serializer):
    plan = serializers.CharField(max_length=64)


# --- Events -------------------------------------------------------------------------

class EventSerializer(serializers.Serializer):
    id = serializers.CharField(max_length=255, help_text="Your idempotency key, unique per customer forever.")
    customer = serializers.CharField(max_length=255, help_text="The customer's external_id.")
    feature = serializers.CharField(max_length=64)
    quantity = CreditsField(min_value=POSITIVE, max_value=settings.OVERAGE_MAX_EVENT_QUANTITY)
    timestamp = serializers.DateTimeField(required=False, help_text="When the usage happened; defaults to now.")
    properties = PropertiesField(required=False, default=dict)
    reservation_id = serializers.UUIDField(required=False, help_text="Settles this reservation.")


_EVENT = EventSerializer()
_EVENT_TEXT = (("id", 255), ("customer", 255), ("feature", 64))
_EVENT_FIELDS = _EVENT.fields
_QUANTITY = _EVENT_FIELDS["quantity"]
_QUANTITY_TEXT = re.compile(decimal_pattern(_QUANTITY), re.ASCII)
_QUANTITY_STEP = Decimal(1).scaleb(-_QUANTITY.decimal_places)


def validated_event(item) -> dict:
    """`EventSerializer().run_validation(item)`, with the common case checked directly:
    a batch validates up to 1 000 events and the serializer's machinery cost a fifth of
    ingesting them. An item the shortcut is not sure of (non-ASCII text, surrounding
    spaces, nested properties, any field that fails) goes through the serializer, so the
    answer, and every error, is the serializer's. A property test holds the two equal."""
    if type(item) is dict:
        data = _plain_event(item)
        if data is not None:
            return data
    return _EVENT.run_validation(item)


def _plain_text(item: dict, fields) -> dict | None:
    """The (name, max_length) CharFields of `item` when each is plain ASCII text that a
    CharField would keep as it is; None if any is not."""
    data = {}
    for name, limit in fields:
        value = item.get(name)
        if (type(value) is not str or not 0 < len(value) <= limit or not value.isascii() or "\x00" in value
                or value.strip() != value):
            return None
        data[name] = value
    return data


def _plain_event(item: dict) -> dict | None:
    data = _plain_text(item, _EVENT_TEXT)
    if data is None or "quantity" not in item:
        return None
    properties = item.get("properties", {})
    bound = _flat_json(properties) if type(properties) is dict else None
    if bound is None:
        return None
    try:
        quantity = _plain_quantity(item["quantity"])
        data["quantity"] = _QUANTITY.run_validation(item["quantity"]) if quantity is None else quantity
        if "timestamp" in item:
            data["timestamp"] = _EVENT_FIELDS["timestamp"].run_validation(item["timestamp"])
        if bound > MAX_PROPERTIES_BYTES and len(json.dumps(properties, separators=(",", ":"))) > MAX_PROPERTIES_BYTES:
            return None
        data["properties"] = dict(properties)
        if "reservation_id" in item:
            data["reservation_id"] = _EVENT_FIELDS["reservation_id"].run_validation(item["reservation_id"])
    except serializers.ValidationError:
        return None
    return data


def _flat_json(properties: dict) -> int | None:
    """If `PropertiesField` would keep `properties` as they are (text keys, scalar
    values): a bound on the length of their JSON, else None. Bound: a character
    takes at most 12 (an astral one, escaped as a surrogate pair), a number at most 24
    (a float's repr; longer integers are left to the serializer), plus 6 of quotes and
    separators per pair."""
    bound = 2
    for key, value in properties.items():
        if type(key) is not str or "\x00" in key:
            return None
        kind = type(value)
        if kind is str:
            if "\x00" in value:
                return None
            bound += 12 * len(value)
        elif kind is float:
            if not math.isfinite(value):
                return None
            bound += 24
        elif kind is int:
            if not -10**20 < value < 10**20:
                return None
            bound += 24
        elif kind is not bool and value is not None:
            return None
        else:
            bound += 5
        bound += 12 * len(key) + 6
    return bound


def _plain_quantity(value) -> Decimal | None:
    """The validated quantity, if `value` is an integer or a plain decimal string that
    the quantity field's own pattern and bounds admit (then the field would answer
    the same, padded to its places); None if the field must decide."""
    if type(value) is int:
        text = str(value)
    elif type(value) is str:
        text = value
    else:
        return None
    if _QUANTITY_TEXT.fullmatch(text) is None:
        return None
    quantity = Decimal(text)
    if not _QUANTITY.min_value <= quantity <= _QUANTITY.max_value:
        return None
    return quantity.quantize(_QUANTITY_STEP)


class EventResultSerializer(serializers.Serializer):
    id = serializers.CharField(source="event_id")
    customer = serializers.CharField(source="customer.external_id")
    feature = serializers.CharField(source="feature.code")
    quantity = CreditsField()
    credits = CreditsField(help_text="Credits this event cost (quantity × credits per unit).")
    overage_credits = CreditsField(help_text="Part of the credits not covered by any grant.")
    timestamp = serializers.DateTimeField()
    received_at = serializers.DateTimeField()
    properties = serializers.DictField()
    status = serializers.ChoiceField(choices=UsageEvent.Status.values,
                                     help_text="`rejected` events are recorded but never billed.")
    reason = serializers.CharField(source="reject_reason", allow_null=True,
                                   help_text="Why a rejected event was refused, e.g. insufficient_credits.")
    reservation_id = serializers.UUIDField(allow_null=True)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["reason"] = data["reason"] or None
        return data


def timestamp_string(value: datetime) -> str:
    """`serializers.DateTimeField().to_representation(value)` for an aware datetime: in
    UTC (the API's only time zone), "Z" for "+00:00". DRF's looks up the active time zone
    on every call, a sixth of a batch answer's cost."""
    text = value.astimezone(dt_timezone.utc).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _received_string(value: datetime) -> str:
    """`timestamp_string` of an event's `received_at`, which a batch's events share (one
    object): the last one's text is kept."""
    global _last_received
    last = _last_received
    if last[0] is value:
        return last[1]
    text = timestamp_string(value)
    _last_received = (value, text)  # one tuple, replaced whole: safe across threads
    return text


_last_received: tuple = (None, "")


def _amount_string(value) -> str:
    """`decimal_string` of an event's quantity or credits. A batch's events repeat a few
    amounts: their texts are kept (equal decimals have the same text, trailing zeros
    dropped), up to a bound. Zero keeps its own sign."""
    if not value:
        return decimal_string(Decimal(value))
    text = _AMOUNT_TEXTS.get(value)
    if text is None:
        if len(_AMOUNT_TEXTS) >= 4096:
            _AMOUNT_TEXTS.clear()
        text = _AMOUNT_TEXTS[value] = decimal_string(Decimal(value))
    return text


_AMOUNT_TEXTS: dict[Decimal, str] = {}


def event_result(event: UsageEvent) -> dict:
    """`EventResultSerializer(event).data`, built directly: a batch answers up to 1 000
    of these, and the serializer machinery cost more than recording the events. A test
    holds the two equal; the serializer stays the schema."""
    received = _received_string(event.received_at)
    return {
        "id": event.event_id,
        "customer": event.customer.external_id,
        "feature": event.feature.code,
        "quantity": _amount_string(event.quantity),
        "credits": _amount_string(event.credits),
        "overage_credits": _amount_string(event.overage_credits),
        # An event sent without a timestamp has `received_at` as its timestamp (the object).
        "timestamp": received if event.timestamp is event.received_at else timestamp_string(event.timestamp),
        "received_at": received,
        "properties": {str(key): value for key, value in event.properties.items()},
        "status": event.status,
        "reason": event.reject_reason or None,
        "reservation_id": str(event.reservation_id) if event.reservation_id else None,
    }


class EventBatchSerializer(serializers.Serializer):
    # min_length as well as allow_empty=False: the schema shows it as minItems.
    events = serializers.ListField(child=serializers.DictField(), allow_empty=False, min_length=1,
                                   max_length=settings.OVERAGE_MAX_BATCH_EVENTS)


class BatchItemResultSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    id = serializers.CharField(allow_null=True)
    http_status = serializers.IntegerField(help_text="What the single-event endpoint would have answered.")
    outcome = serializers.ChoiceField(choices=["created", "duplicate", "error"])
    event = EventResultSerializer(required=False)
    error = serializers.DictField(required=False)


class BatchResultSerializer(serializers.Serializer):
    results = BatchItemResultSerializer(many=True)
    counts = serializers.DictField(child=serializers.IntegerField())


# --- Entitlements -------------------------------------------------------------------

class EntitlementCheckSerializer(serializers.Serializer):
    customer = serializers.CharField(max_length=255)
    feature = serializers.CharField(max_length=64)
    quantity = CreditsField(min_value=POSITIVE, max_value=settings.OVERAGE_MAX_EVENT_QUANTITY, default=Decimal("1"))
    reserve = serializers.BooleanField(default=False)
    reservation_ttl_seconds = serializers.IntegerField(
        min_value=1, max_value=settings.OVERAGE_RESERVATION_MAX_TTL_SECONDS, required=False
    )


_CHECK = EntitlementCheckSerializer()
_CHECK_FIELDS = _CHECK.fields


def validated_check(data) -> dict:
    """`EntitlementCheckSerializer().run_validation(data)`, the plain case (the two ids as
    ASCII text, `reserve` a JSON boolean or absent) checked directly, as `validated_event`
    does for events; anything else, and every error, by the serializer."""
    if type(data) is dict:
        plain = _plain_text(data, (("customer", 255), ("feature", 64)))
        if plain is not None and type(data.get("reserve", False)) is bool:
            try:
                plain["quantity"] = (_CHECK_FIELDS["quantity"].run_validation(data["quantity"])
                                     if "quantity" in data else _CHECK_FIELDS["quantity"].get_default())
                plain["reserve"] = data.get("reserve", False)
                if "reservation_ttl_seconds" in data:
                    plain["reservation_ttl_seconds"] = _CHECK_FIELDS["reservation_ttl_seconds"].run_validation(
                        data["reservation_ttl_seconds"])
                return plain
            except serializers.ValidationError:
                pass
    return _CHECK.run_validation(data)


class EntitlementResultSerializer(CurrencyAmounts, serializers.Serializer):
    allowed = serializers.BooleanField()
    reason = serializers.ChoiceField(choices=["ok", "overage", "insufficient_credits", "spend_cap_reached", "paused",
                                              "unknown_feature", "no_subscription"])
    credits_required = CreditsField()
    credits_remaining = CreditsField(help_text="Credits this feature can still draw from grants (before this request).")
    overage_credits = CreditsField(help_text="Part of this request that would be billed as overage.")
    estimated_overage_amount = MoneyField(help_text="The period's overage charge if this request goes through.")
    currency = serializers.CharField(allow_null=True)
    reservation_id = serializers.UUIDField(allow_null=True, required=False)
    reservation_expires_at = serializers.DateTimeField(allow_null=True, required=False)


def entitlement_result(decision) -> dict:
    """`EntitlementResultSerializer().to_representation(...)` of an `EntitlementDecision`,
    built directly (the check is the hottest answer); a test holds the two equal."""
    currency, reservation = decision.currency, decision.reservation
    return {
        "allowed": decision.allowed,
        "reason": decision.reason,
        "credits_required": decimal_string(Decimal(decision.credits_required)),
        "credits_remaining": decimal_string(Decimal(decision.credits_remaining)),
        "overage_credits": decimal_string(Decimal(decision.overage_credits)),
        "estimated_overage_amount": decimal_string(
            Decimal(decision.estimated_overage_amount), minor_unit_exponent(currency) if currency else 2),
        "currency": currency,
        # Always present (null unless a reservation was made), so the shape never varies.
        "reservation_id": str(reservation.pk) if reservation else None,
        "reservation_expires_at": timestamp_string(reservation.expires_at) if reservation else None,
    }


class ReservationSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    customer = serializers.CharField(source="customer.external_id")
    feature = serializers.CharField(source="feature.code")
    credits = CreditsField()
    status = serializers.CharField()
    expires_at = serializers.DateTimeField()


# --- Usage and grants ---------------------------------------------------------------

class FeatureUsageSerializer(serializers.Serializer):
    feature = serializers.CharField()
    name = serializers.CharField()
    unit = serializers.CharField()
    events = serializers.IntegerField()
    quantity = CreditsField()
    credits = CreditsField()
    overage_credits = CreditsField()


class UsageSerializer(CurrencyAmounts, serializers.Serializer):
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField()
    period_status = serializers.CharField()
    plan = serializers.CharField()
    included_credits = CreditsField()
    credits_used = CreditsField()
    credits_remaining = CreditsField(help_text="All credits usable now (any source), less held credits.")
    included_remaining = CreditsField()
    purchased_remaining = CreditsField()
    promotional_remaining = CreditsField(help_text="Promotional, rolled-over and manually granted credits.")
    held_credits = CreditsField(help_text="Credits held by active reservations.")
    overage_credits = CreditsField()
    estimated_overage_amount = MoneyField()
    base_amount = MoneyField()
    estimated_total = MoneyField(help_text="Base fee plus estimated overage for this period.")
    currency = serializers.CharField()
    spend_cap = MoneyField(allow_null=True)
    by_feature = FeatureUsageSerializer(many=True)


class GrantCreateSerializer(serializers.Serializer):
    credits = CreditsField(min_value=POSITIVE)
    source = serializers.ChoiceField(
        choices=[CreditGrant.Source.PROMOTIONAL, CreditGrant.Source.MANUAL_ADJUSTMENT],
        default=CreditGrant.Source.PROMOTIONAL,
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    features = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list,
                                     help_text="Limit the grant to these feature codes; empty = all features.")
    idempotency_key = serializers.CharField(max_length=255)
    description = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    reason = serializers.CharField(max_length=500, required=False, allow_null=True, allow_blank=True, default=None,
                                   help_text="Why the credits are granted (kept on the ledger); "
                                             "defaults to the description. One of the two is required.")


class GrantSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    source = serializers.CharField()
    credits = CreditsField()
    remaining = CreditsField()
    effective_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    features = serializers.SerializerMethodField()
    idempotency_key = serializers.CharField(allow_null=True)
    description = serializers.CharField()
    reason = serializers.CharField()
    created_by = serializers.CharField(source="granted_by", help_text="Who granted: a user, an API key or Overage.")
    created_at = serializers.DateTimeField()

    def get_features(self, grant) -> list[str]:
        return sorted(f.code for f in grant.features.all())



# --- Invoices -------------------------------------------------------------------------

class InvoiceLineUsageSerializer(serializers.Serializer):
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField()
    overage_from = CreditsField(help_text="The period's cumulative overage credits where this line starts.")
    overage_to = CreditsField()


class InvoiceLineSerializer(serializers.Serializer):
    id = serializers.IntegerField(allow_null=True)
    kind = serializers.CharField()
    description = serializers.CharField()
    credits = CreditsField(allow_null=True)
    unit_price = RateField(allow_null=True, help_text="Null when several tier prices apply; see tiers.")
    amount = MoneyField()
    service_start = serializers.DateTimeField(allow_null=True)
    service_end = serializers.DateTimeField(allow_null=True)
    tiers = serializers.ListField(child=serializers.DictField(), help_text="Graduated tiers applied to this line.")
    usage = InvoiceLineUsageSerializer(allow_null=True, help_text="For overage lines: the usage it bills; "
                                                                  "GET …/lines/{id}/usage drills down.")


class InvoiceSerializer(serializers.Serializer):
    id = serializers.CharField(allow_null=True, help_text="The invoice number; null for the upcoming invoice.")
    customer = serializers.CharField()
    kind = serializers.CharField()
    status = serializers.CharField(help_text="draft | issued | paid | void, or upcoming.")
    currency = serializers.CharField()
    total = MoneyField()
    issued_at = serializers.DateTimeField(allow_null=True)
    due_at = serializers.DateTimeField(allow_null=True)
    paid_at = serializers.DateTimeField(allow_null=True)
    period_start = serializers.DateTimeField(allow_null=True)
    period_end = serializers.DateTimeField(allow_null=True)
    lines = InvoiceLineSerializer(many=True)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        places = minor_unit_exponent(data["currency"])
        data["total"] = decimal_string(Decimal(data["total"]), places)
        for line in data["lines"]:
            line["amount"] = decimal_string(Decimal(line["amount"]), places)
        return data


def invoice_representation(invoice=None, *, draft=None) -> dict:
    """An issued invoice, or a draft (the upcoming invoice), as the API shows it."""
    source = invoice or draft
    lines = list(invoice.lines.select_related("period").order_by("id")) if invoice else draft.lines
    period = source.period
    return {
        "id": invoice.number if invoice else None,
        "customer": source.customer.external_id,
        "kind": source.kind,
        "status": invoice.status if invoice else "upcoming",
        "currency": source.currency,
        "total": invoice.total if invoice else draft.total,
        "issued_at": invoice.issued_at if invoice else None,
        "due_at": invoice.due_at if invoice else None,
        "paid_at": invoice.paid_at if invoice else None,
        "period_start": period.start if period else None,
        "period_end": period.end if period else None,
        "lines": [
            {
                "id": getattr(line, "pk", None), "kind": line.kind, "description": line.description,
                "credits": line.credits, "unit_price": line.unit_price, "amount": line.amount,
                "service_start": line.service_start, "service_end": line.service_end, "tiers": line.tiers,
                "usage": {"period_start": line.period.start, "period_end": line.period.end,
                          "overage_from": line.overage_from, "overage_to": line.overage_to}
                if line.period is not None else None,
            }
            for line in lines
        ],
    }


class LineFeatureUsageSerializer(serializers.Serializer):
    feature = serializers.CharField()
    overage_credits = CreditsField()
    events = serializers.IntegerField()


class LineDayUsageSerializer(serializers.Serializer):
    day = serializers.DateField()
    overage_credits = CreditsField()


class LineEventSerializer(serializers.Serializer):
    id = serializers.CharField()
    feature = serializers.CharField()
    timestamp = serializers.DateTimeField()
    overage_credits = CreditsField()


class LineUsageSerializer(serializers.Serializer):
    by_feature = LineFeatureUsageSerializer(many=True)
    by_day = LineDayUsageSerializer(many=True)
    events = LineEventSerializer(many=True, help_text="The first 1 000 events behind the line.")


# --- Packs and purchases --------------------------------------------------------------------

class CreditPackSerializer(CurrencyAmounts, serializers.Serializer):
    code = serializers.CharField()
    name = serializers.CharField()
    credits = CreditsField()
    price = MoneyField()
    currency = serializers.CharField()
    expires_after_days = serializers.IntegerField(allow_null=True)


class PackPurchaseRequestSerializer(serializers.Serializer):
    pack = serializers.CharField(max_length=64, help_text="Pack code.")
    idempotency_key = serializers.CharField(max_length=255)


class PurchaseSerializer(CurrencyAmounts, serializers.Serializer):
    id = serializers.IntegerField()
    pack = serializers.CharField(source="pack.code")
    source = serializers.CharField()
    credits = CreditsField()
    price = MoneyField()
    currency = serializers.CharField()
    status = serializers.CharField(help_text="pending (awaiting payment) | paid | failed")
    invoice = serializers.CharField(source="invoice.number", allow_null=True, help_text="The receipt's number.")
    created_at = serializers.DateTimeField()
    paid_at = serializers.DateTimeField(allow_null=True)


# --- Spend caps -------------------------------------------------------------------------------

class SpendCapRequestSerializer(serializers.Serializer):
    spend_cap = MoneyField(min_value=Decimal("0"), allow_null=True,
                           help_text="The customer's own monthly overage cap; null removes it. Cannot exceed the "
                                     "business's cap.")


class CapApprovalRequestSerializer(serializers.Serializer):
    cap = MoneyField(min_value=Decimal("0"), help_text="The higher overage cap approved for the current period.")
    note = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")


class SpendCapSerializer(CurrencyAmounts, serializers.Serializer):
    currency = serializers.CharField()
    business_cap = MoneyField(allow_null=True, help_text="The plan's cap, or the per-customer override.")
    spend_cap = MoneyField(allow_null=True, help_text="The customer's own cap.")
    effective_cap = MoneyField(allow_null=True, help_text="The cap in force this period (after approvals).")
    cap_behaviour = serializers.CharField()


class AutoTopUpSerializer(serializers.Serializer):
    enabled = serializers.BooleanField()
    mode = serializers.ChoiceField(choices=["pack", "refill"], default="pack",
                                   help_text="pack: buy enough packs to get back above the threshold; refill: up "
                                             "to target_balance.")
    pack = serializers.CharField(max_length=64, help_text="Pack code.")
    threshold = CreditsField(min_value=Decimal("0"), help_text="Top up when credits remaining fall below this.")
    target_balance = CreditsField(min_value=Decimal("0"), allow_null=True, required=False, default=None)
    max_per_month = serializers.IntegerField(min_value=0, allow_null=True, required=False, default=None)
    max_amount_per_month = MoneyField(min_value=Decimal("0"), allow_null=True, required=False, default=None)
    consecutive_failures = serializers.IntegerField(read_only=True)
    disabled_reason = serializers.CharField(read_only=True)
