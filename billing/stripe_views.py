"""The Stripe webhook endpoint, built on dj-stripe's models.

Every delivery is kept as a dj-stripe `WebhookEventTrigger` (headers, body, whether it
was valid, any error) for the admin. The signature is checked against the endpoint's
secret with dj-stripe's verifier (the official SDK's scheme); a missing or bad
signature, an unknown endpoint or a body that is not a Stripe event gets 400 and is
logged. A valid event is acted on by Overage once per event id; then dj-stripe mirrors
it into its own tables, best effort (its mirror is a convenience, Overage's records are
the truth, and a mirroring failure must not make Stripe resend an event we handled).
"""

import logging
from traceback import format_exc

from django.db import transaction
from django.http import HttpResponse, HttpResponseBadRequest
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from djstripe.models import Event, WebhookEndpoint, WebhookEventTrigger
from djstripe.models.webhooks import get_remote_ip

from billing.services.stripe_webhooks import process_stripe_event

logger = logging.getLogger(__name__)


def refuse(reason: str, trigger: WebhookEventTrigger | None = None) -> HttpResponse:
    logger.warning("stripe webhook refused: %s", reason)
    if trigger is not None:
        trigger.valid = False
        trigger.exception = reason[:128]
        trigger.save()
    return HttpResponseBadRequest(reason)


@csrf_exempt
@require_POST
def stripe_webhook(request, uuid):
    if "stripe-signature" not in request.headers:
        return refuse("missing Stripe-Signature header")
    endpoint = WebhookEndpoint.objects.filter(djstripe_uuid=uuid).first()
    if endpoint is None:
        return refuse(f"unknown webhook endpoint {uuid}")
    trigger = WebhookEventTrigger.objects.create(headers=dict(request.headers), body=request.body.decode(errors="replace"),
                                                 remote_ip=get_remote_ip(request), webhook_endpoint=endpoint)
    if not trigger.verify_signature(secret=endpoint.secret, tolerance=endpoint.djstripe_tolerance):
        return refuse("bad signature", trigger)
    event = trigger.json_body
    if not isinstance(event, dict) or not {"id", "type", "data"} <= event.keys() or "object" not in event["data"]:
        return refuse("not a Stripe event", trigger)
    try:
        outcome = process_stripe_event(event, now=timezone.now())
    except Exception as error:
        trigger.valid, trigger.exception, trigger.traceback = True, str(error)[:128], format_exc()
        trigger.save()
        raise  # 500: Stripe delivers it again later
    trigger.valid = trigger.processed = True
    try:
        with transaction.atomic():
            trigger.event = Event.process(event)
    except Exception as error:  # noqa: BLE001 - the mirror is best effort, see above
        logger.info("dj-stripe did not mirror %s %s: %s", event["type"], event["id"], error)
    trigger.save()
    return HttpResponse(outcome)
