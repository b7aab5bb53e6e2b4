"""/api/v1 views: validate, call one service or selector, serialise. No rules here."""

import math
import re

from django.conf import settings
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils import json
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import selectors
from billing.errors import BillingError, NotFound
from billing.services import caps
from billing.services import customers as customer_services
from billing.models import AutoTopUp, Invoice
from billing.services.entitlements import check_entitlement, reservation_release, reservation_status
from billing.services.invoicing import upcoming_invoice
from billing.services.ledger import grant_credits_once
from billing.services.plan_changes import subscription_change_plan
from billing.services.purchases import auto_topup_configure, purchase_pack
from billing.services.group_commit import record_single_event
from billing.services.metering import EventInput, record_events
from plans import services as plan_services
from plans.models import CreditPack, Feature, Plan

from . import serializers as s
from .errors import error_body, validation_error_body


# Every operation documents its error answers too, all in the one error shape, so that
# a client (and the schemathesis run in tests/api/test_schema_fuzz.py) can rely on the
# schema for every status it may see.
_ERROR_ANSWERS = {
    400: "Malformed JSON, or a field that fails validation (`field` names it).",
    401: "No API key, or an invalid or revoked one.",
    402: "The payment was declined (Stripe mode).",
    403: "The API key lacks the scope this endpoint needs.",
    404: "No such customer, plan, invoice, reservation… (`code` says which).",
    409: "Conflicts with what exists: the id or code is taken, or an id or idempotency key was reused with a "
         "different body.",
    413: "The body is larger than OVERAGE_API_MAX_BODY_BYTES.",
    415: "The body is not JSON.",
    422: "Well-formed, but refused by a billing rule (unknown feature, no subscription, …).",
    429: "Rate limited: retry after `Retry-After` seconds.",
}
READ_ERRORS = (400, 401, 403, 404, 413, 429)
WRITE_ERRORS = (*READ_ERRORS, 409, 415, 422)
PAYING_ERRORS = (*WRITE_ERRORS, 402)


def answers(ok, *, errors=READ_ERRORS) -> dict:
    """`responses=` for extend_schema: the success answer(s) (a serializer, or
    {status: serializer}) and the error answers `errors`."""
    documented = dict(ok) if isinstance(ok, dict) else {200: ok}
    for code in errors:
        documented[code] = OpenApiResponse(s.ErrorSerializer, description=_ERROR_ANSWERS[code])
    return documented


def _first_unstorable(document) -> tuple[str, str] | None:
    """(path, problem) of the first value in a parsed JSON body that no column can hold:
    a number beyond float range (`1e309` parses to inf) or text with a lone UTF-16
    surrogate (`"\\ud800"`, which cannot be encoded as UTF-8). Iterative, so a deep
    document cannot exhaust the stack here."""
    pending = [("", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, "Numbers must be finite."
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, "Text may not contain lone surrogate code points."
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                child = f"{path}.{key}" if path else str(key)
                pending.append((child, item))
                pending.append((child, key))
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in reversed(list(enumerate(value))))
    return None


# A \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed JSON (raw
# UTF-8 cannot encode one). Also matches paired ones and escaped backslashes: then the
# document is walked, and nothing is refused that should not be.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class ApiJSONParser(JSONParser):
    """JSON bodies, refused with a 4xx when Python's parser would fail in ways DRF's
    does not catch (nesting deep enough to exhaust the recursion limit: a 500) or accept
    what no column can store (non-finite numbers, lone surrogates: a 500 on write)."""

    def parse(self, stream, media_type=None, parser_context=None):
        # DRF's JSONParser.parse, noting on the way whether the document can hold an
        # unstorable value at all: walking every value of a 1 000-event batch to find
        # none cost as much as parsing it.
        overflowed = []

        def parse_float(text):
            value = float(text)
            if not math.isfinite(value):
                overflowed.append(text)
            return value

        try:
            text = stream.read().decode(get_encoding(parser_context or {}))
            document = json.loads(text, parse_constant=json.strict_constant if self.strict else None,
                                  parse_float=parse_float)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        except ValueError as error:
            raise ParseError(f"JSON parse error - {error}") from None
        # Only UTF-8 text keeps a lone surrogate escaped (other codecs DRF accepts, such as
        # unicode_escape, decode it before this point): elsewhere, always walk.
        encoding = get_encoding(parser_context or {}).lower().replace("-", "").replace("_", "")
        if not overflowed and encoding in ("utf8", "ascii", "usascii") and not _SURROGATE_ESCAPE.search(text):
            return document
        problem = _first_unstorable(document)
        if problem is not None:
            # The path may hold the very surrogate refused: escape it so the answer encodes.
            path, message = problem[0].encode("utf-8", "backslashreplace").decode("utf-8"), problem[1]
            # Named by its top-level field (for a batch: "events"), the full path in the message.
            field = path.partition(".")[0].partition("[")[0] or None
            raise ValidationError({field: [f"{message} (at {path})"]} if field else [message])
        return document


class ScopedView(APIView):
    required_scope = None  # set by every view; HasApiKeyScope refuses views without one
    parser_classes = [ApiJSONParser]

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        # An id from the URL goes into a query; PostgreSQL refuses NUL in text (a 500).
        for name, value in kwargs.items():
            if isinstance(value, str) and "\x00" in value:
                raise ValidationError({name: ["May not contain NUL characters."]})


def _valid(serializer_class, data):
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


# --- Catalogue ------------------------------------------------------------------------

class FeatureListCreate(ScopedView):
    required_scopes = {"GET": "read", "POST": "admin"}

    @extend_schema(responses=answers(s.FeatureSerializer(many=True)))
    def get(self, request):
        return Response(s.FeatureSerializer(Feature.objects.all(), many=True).data)

    @extend_schema(request=s.FeatureSerializer, responses=answers({201: s.FeatureSerializer}, errors=WRITE_ERRORS))
    def post(self, request):
        feature = plan_services.feature_create(**_valid(s.FeatureSerializer, request.data))
        return Response(s.FeatureSerializer(feature).data, status=status.HTTP_201_CREATED)


def _plan_out(plan: Plan) -> dict:
    return s.PlanSerializer(s.plan_representation(plan)).data


class PlanListCreate(ScopedView):
    required_scopes = {"GET": "read", "POST": "admin"}

    @extend_schema(responses=answers(s.PlanSerializer(many=True)))
    def get(self, request):
        plans = Plan.objects.filter(is_active=True).prefetch_related("overage_tiers")
        return Response([_plan_out(plan) for plan in plans])

    @extend_schema(request=s.PlanSerializer, responses=answers({201: s.PlanSerializer}, errors=WRITE_ERRORS))
    def post(self, request):
        data = _valid(s.PlanSerializer, request.data)
        rollover = data.pop("rollover", None) or {}
        plan = plan_services.plan_create(
            **{k: v for k, v in data.items() if k not in ("overage_tiers", "feature_costs")},
            overage_tiers=[plan_services.TierInput(t["up_to"], t["unit_price"]) for t in data["overage_tiers"]],
            rollover_policy=rollover.get("policy", Plan.Rollover.NONE),
            rollover_max_credits=rollover.get("max_credits"),
            feature_costs={c["feature"]: c["credits_per_unit"] for c in data["feature_costs"]},
        )
        return Response(_plan_out(plan), status=status.HTTP_201_CREATED)


class PlanDetail(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.PlanSerializer))
    def get(self, request, code):
        plan = Plan.objects.filter(code=code).first()
        if plan is None:
            raise NotFound(f"No plan with code {code!r}.", code="plan_not_found")
        return Response(_plan_out(plan))


# --- Customers ------------------------------------------------------------------------

def _customer_out(customer) -> dict:
    period = customer_services.current_period(customer=customer, now=timezone.now())
    subscription = customer_services.live_subscription(customer)
    return s.CustomerSerializer({
        "external_id": customer.external_id, "name": customer.name, "email": customer.email,
        "created_at": customer.created_at, "subscription": subscription, "current_period": period,
    }).data


class CustomerCreate(ScopedView):
    required_scope = "admin"

    @extend_schema(request=s.CustomerCreateSerializer,
                   responses=answers({201: s.CustomerSerializer}, errors=WRITE_ERRORS))
    def post(self, request):
        data = _valid(s.CustomerCreateSerializer, request.data)
        customer = customer_services.customer_create(
            external_id=data["external_id"], name=data["name"], email=data["email"], plan_code=data["plan"],
            started_at=data.get("started_at"), now=timezone.now(),
        )
        return Response(_customer_out(customer), status=status.HTTP_201_CREATED)


class CustomerDetail(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.CustomerSerializer))
    def get(self, request, external_id):
        return Response(_customer_out(customer_services.customer_get(external_id)))


class SubscriptionChange(ScopedView):
    required_scope = "admin"

    @extend_schema(request=s.SubscriptionChangeSerializer, responses=answers(s.CustomerSerializer, errors=WRITE_ERRORS),
                   description="Change plan. Upgrades take effect now (prorated base fee and included credits); "
                               "downgrades at the start of the next period. See docs/billing-rules.md.")
    def post(self, request, external_id):
        data = _valid(s.SubscriptionChangeSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        subscription_change_plan(customer=customer, plan_code=data["plan"], now=timezone.now())
        return Response(_customer_out(customer))


# --- Events ---------------------------------------------------------------------------

def _event_input(data: dict) -> EventInput:
    return EventInput(
        event_id=data["id"], customer=data["customer"], feature=data["feature"], quantity=data["quantity"],
        timestamp=data.get("timestamp"), properties=data.get("properties") or {},
        reservation_id=str(data["reservation_id"]) if data.get("reservation_id") else None,
    )


class EventCreate(ScopedView):
    required_scope = "ingest"

    @extend_schema(request=s.EventSerializer,
                   responses=answers({201: s.EventResultSerializer, 200: s.EventResultSerializer},
                                     errors=WRITE_ERRORS),
                   description="Record usage. 201 the first time; 200 with the same body for a retry of the same "
                               "`id`; 409 if the `id` was used with a different body.")
    def post(self, request):
        outcome = record_single_event(_event_input(s.validated_event(request.data)))
        if outcome.error is not None:
            raise outcome.error
        usage, created = outcome.event, outcome.created
        return Response(s.event_result(usage), status=201 if created else 200)


def _batch_items(data) -> list:
    """The batch's events: `EventBatchSerializer` validates the envelope, except in the
    plain case (a list of 1 to OVERAGE_MAX_BATCH_EVENTS objects), where its copy of
    every event would be the same objects again."""
    events = data.get("events") if type(data) is dict else None
    if (type(events) is list and 0 < len(events) <= settings.OVERAGE_MAX_BATCH_EVENTS
            and all(type(item) is dict for item in events)):
        return events
    return _valid(s.EventBatchSerializer, data)["events"]


class EventBatchCreate(ScopedView):
    required_scope = "ingest"

    @extend_schema(request=s.EventBatchSerializer, responses=answers(s.BatchResultSerializer, errors=WRITE_ERRORS),
                   description="Up to 1 000 events; each is recorded (or refused) on its own.")
    def post(self, request):
        items = _batch_items(request.data)
        results: list[dict | None] = [None] * len(items)
        inputs, positions = [], []
        for index, item in enumerate(items):
            try:
                inputs.append(_event_input(s.validated_event(item)))
                positions.append(index)
            except ValidationError as invalid:
                results[index] = {"index": index, "id": item.get("id") if isinstance(item.get("id"), str) else None,
                                  "http_status": 400, "outcome": "error", **validation_error_body(invalid.detail)}
        for index, item, outcome in zip(positions, inputs, record_events(events=inputs, now=timezone.now())):
            if outcome.error is not None:
                results[index] = {"index": index, "id": item.event_id,
                                  "http_status": outcome.error.status, "outcome": "error",
                                  **error_body(outcome.error.code, outcome.error.message, outcome.error.field)}
            else:
                results[index] = {"index": index, "id": outcome.event.event_id,
                                  "http_status": 201 if outcome.created else 200,
                                  "outcome": "created" if outcome.created else "duplicate",
                                  "event": s.event_result(outcome.event)}
        counts = {"created": 0, "duplicate": 0, "error": 0}
        for result in results:
            counts[result["outcome"]] += 1
        return Response({"results": results, "counts": counts})


# --- Entitlements and reservations ------------------------------------------------------

class EntitlementCheck(ScopedView):
    required_scope = "ingest"

    @extend_schema(request=s.EntitlementCheckSerializer,
                   responses=answers(s.EntitlementResultSerializer, errors=WRITE_ERRORS))
    def post(self, request):
        data = s.validated_check(request.data)
        decision = check_entitlement(
            customer_external_id=data["customer"], feature_code=data["feature"], quantity=data["quantity"],
            reserve=data["reserve"], reservation_ttl_seconds=data.get("reservation_ttl_seconds"), now=timezone.now(),
        )
        return Response(s.entitlement_result(decision))


class ReservationRelease(ScopedView):
    required_scope = "ingest"

    @extend_schema(request=None, responses=answers(s.ReservationSerializer, errors=WRITE_ERRORS))
    def post(self, request, reservation_id):
        now = timezone.now()
        reservation = reservation_release(reservation_id=reservation_id, now=now)
        out = s.ReservationSerializer(reservation).data
        out["status"] = reservation_status(reservation, now)
        return Response(out)


# --- Usage and grants -------------------------------------------------------------------

class CustomerUsage(ScopedView):
    required_scope = "read"

    @extend_schema(
        parameters=[OpenApiParameter("at", OpenApiTypes.DATETIME,
                                     description="ISO 8601 instant; the period containing it.")],
        responses=answers(s.UsageSerializer),
    )
    def get(self, request, external_id):
        customer = customer_services.customer_get(external_id)
        at = None
        if "at" in request.query_params:
            try:
                at = s.serializers.DateTimeField().run_validation(request.query_params["at"])
            except ValidationError as invalid:
                raise ValidationError({"at": invalid.detail}) from None
        usage = selectors.period_usage(customer=customer, now=timezone.now(), at=at)
        if usage is None:
            raise BillingError("The customer has no billing period at that time.", code="no_subscription",
                               status=404)
        period, quote, balance = usage.period, usage.quote, usage.balance
        return Response(s.UsageSerializer({
            "period_start": period.start, "period_end": period.end, "period_status": period.status,
            "plan": period.plan.code, "included_credits": period.included_credits,
            "credits_used": period.credits_used, "credits_remaining": usage.credits_remaining,
            "included_remaining": balance.included, "purchased_remaining": balance.purchased,
            "promotional_remaining": balance.promotional, "held_credits": balance.held,
            "overage_credits": period.overage_credits, "estimated_overage_amount": quote.overage.amount,
            "base_amount": quote.base_amount, "estimated_total": quote.total, "currency": quote.currency,
            "spend_cap": usage.spend_cap, "by_feature": usage.by_feature,
        }).data)


class CustomerGrantCreate(ScopedView):
    required_scope = "admin"

    @extend_schema(request=s.GrantCreateSerializer,
                   responses=answers({201: s.GrantSerializer, 200: s.GrantSerializer}, errors=WRITE_ERRORS))
    def post(self, request, external_id):
        data = _valid(s.GrantCreateSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        now = timezone.now()
        codes = sorted(set(data["features"]))
        features = list(Feature.objects.filter(code__in=codes))
        if len(features) != len(codes):
            missing = sorted(set(codes) - {f.code for f in features})
            raise BillingError(f"Unknown feature(s): {', '.join(missing)}.", code="unknown_feature", field="features")
        grant, created = grant_credits_once(
            customer=customer, idempotency_key=data["idempotency_key"], credits=data["credits"],
            source=data["source"], expires_at=data["expires_at"], features=features,
            description=data["description"], now=now, api_key=request.auth,
            reason=data["reason"] if data["reason"] is not None else data["description"],
        )
        return Response(s.GrantSerializer(grant).data, status=201 if created else 200)


# --- Invoices ---------------------------------------------------------------------------

def _invoice(number: str) -> Invoice:
    invoice = Invoice.objects.select_related("customer", "period").filter(number=number).first()
    if invoice is None:
        raise NotFound(f"No invoice {number!r}.", code="invoice_not_found")
    return invoice


class CustomerInvoiceList(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.InvoiceSerializer(many=True)))
    def get(self, request, external_id):
        customer = customer_services.customer_get(external_id)
        invoices = customer.invoices.select_related("customer", "period").order_by("-issued_at", "-id")
        return Response([s.InvoiceSerializer(s.invoice_representation(i)).data for i in invoices])


class InvoiceDetail(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.InvoiceSerializer))
    def get(self, request, number):
        return Response(s.InvoiceSerializer(s.invoice_representation(_invoice(number))).data)


class UpcomingInvoice(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.InvoiceSerializer),
                   description="The invoice the current period would produce if it closed now, computed by the "
                               "same code as the real close.")
    def get(self, request, external_id):
        customer = customer_services.customer_get(external_id)
        period = customer_services.current_period(customer=customer, now=timezone.now())
        if period is None:
            raise BillingError("The customer has no current billing period.", code="no_subscription", status=404)
        return Response(s.InvoiceSerializer(s.invoice_representation(draft=upcoming_invoice(period=period))).data)


class InvoiceLineUsage(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.LineUsageSerializer))
    def get(self, request, number, line_id):
        line = _invoice(number).lines.filter(pk=line_id, kind="overage").select_related("period").first()
        if line is None:
            raise NotFound("No overage line with that id on this invoice.", code="line_not_found")
        usage = selectors.overage_line_usage(line)
        events = [
            {"id": entry.event.event_id, "feature": entry.feature.code, "timestamp": entry.effective_at,
             "overage_credits": -entry.credits}
            for entry in usage.entries[:1000]
        ]
        return Response(s.LineUsageSerializer({"by_feature": usage.by_feature, "by_day": usage.by_day,
                                               "events": events}).data)


# --- Packs ------------------------------------------------------------------------------

class PackList(ScopedView):
    required_scope = "read"

    @extend_schema(responses=answers(s.CreditPackSerializer(many=True)))
    def get(self, request):
        return Response(s.CreditPackSerializer(CreditPack.objects.filter(is_active=True), many=True).data)


class CustomerPackPurchase(ScopedView):
    required_scope = "admin"

    @extend_schema(request=s.PackPurchaseRequestSerializer,
                   responses=answers({201: s.PurchaseSerializer, 200: s.PurchaseSerializer}, errors=PAYING_ERRORS),
                   description="Buy a credit pack. Local mode: paid and granted at once, with a paid receipt. "
                               "Idempotent by idempotency_key.")
    def post(self, request, external_id):
        data = _valid(s.PackPurchaseRequestSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        purchase, created = purchase_pack(customer=customer, pack_code=data["pack"],
                                          idempotency_key=data["idempotency_key"], now=timezone.now())
        return Response(s.PurchaseSerializer(purchase).data, status=201 if created else 200)


# --- Spend caps -------------------------------------------------------------------------------

def _caps_out(customer) -> dict:
    period = customer_services.current_period(customer=customer, now=timezone.now())
    if period is None:
        raise BillingError("The customer has no current billing period.", code="no_subscription", status=404)
    customer.refresh_from_db()
    return s.SpendCapSerializer({
        "currency": period.plan.currency, "business_cap": caps.business_cap(period.plan, customer),
        "spend_cap": customer.spend_cap, "effective_cap": caps.effective_overage_cap(period.plan, customer, period),
        "cap_behaviour": period.plan.cap_behaviour,
    }).data


class CustomerSpendCap(ScopedView):
    required_scopes = {"GET": "read", "PUT": "admin"}

    @extend_schema(responses=answers(s.SpendCapSerializer))
    def get(self, request, external_id):
        return Response(_caps_out(customer_services.customer_get(external_id)))

    @extend_schema(request=s.SpendCapRequestSerializer, responses=answers(s.SpendCapSerializer, errors=WRITE_ERRORS),
                   description="Set the customer's own overage cap (it can only lower the business's cap).")
    def put(self, request, external_id):
        data = _valid(s.SpendCapRequestSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        caps.customer_set_spend_cap(customer=customer, spend_cap=data["spend_cap"], now=timezone.now())
        return Response(_caps_out(customer))


class CustomerCapApproval(ScopedView):
    required_scope = "admin"

    @extend_schema(request=s.CapApprovalRequestSerializer,
                   responses=answers({201: s.SpendCapSerializer}, errors=WRITE_ERRORS),
                   description="Approve a higher overage cap for the current period (plans with cap behaviour "
                               "`approval`).")
    def post(self, request, external_id):
        data = _valid(s.CapApprovalRequestSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        caps.approve_higher_cap(customer=customer, cap=data["cap"], note=data["note"], now=timezone.now())
        return Response(_caps_out(customer), status=201)


class CustomerAutoTopUp(ScopedView):
    required_scopes = {"GET": "read", "PUT": "admin"}

    @staticmethod
    def _out(topup) -> dict:
        return s.AutoTopUpSerializer({
            "enabled": topup.enabled, "mode": topup.mode, "pack": topup.pack.code, "threshold": topup.threshold,
            "target_balance": topup.target_balance, "max_per_month": topup.max_per_month,
            "max_amount_per_month": topup.max_amount_per_month, "consecutive_failures": topup.consecutive_failures,
            "disabled_reason": topup.disabled_reason,
        }).data

    @extend_schema(responses=answers(s.AutoTopUpSerializer))
    def get(self, request, external_id):
        customer = customer_services.customer_get(external_id)
        topup = AutoTopUp.objects.select_related("pack").filter(customer=customer).first()
        if topup is None:
            raise NotFound("Automatic top-up is not configured for this customer.", code="auto_topup_not_configured")
        return Response(self._out(topup))

    @extend_schema(request=s.AutoTopUpSerializer, responses=answers(s.AutoTopUpSerializer, errors=PAYING_ERRORS))
    def put(self, request, external_id):
        data = _valid(s.AutoTopUpSerializer, request.data)
        customer = customer_services.customer_get(external_id)
        topup = auto_topup_configure(customer=customer, enabled=data["enabled"], pack_code=data["pack"],
                                     threshold=data["threshold"], mode=data["mode"],
                                     target_balance=data["target_balance"], max_per_month=data["max_per_month"],
                                     max_amount_per_month=data["max_amount_per_month"])
        return Response(self._out(topup))


@csrf_exempt  # like every API view: without it an unknown URL POSTed to answers CSRF's HTML 403
def api_not_found(request, *args, **kwargs):
    """Unknown /api/ URLs answer in the API's error shape, not with an HTML page."""
    from django.http import JsonResponse

    return JsonResponse(error_body("not_found", f"No API endpoint at {request.path}."), status=404)
