"""`manage.py seed_demo`: a small AI-API business to click through.

Everything is created through the same services the API uses (features, plans,
customers, usage events, API keys), so the demo's ledger is a real ledger. Running it
again creates only what is missing: catalogue rows and customers are looked up by
code, events by their stable ids (`demo-acme-000123`), users by username.
"""

import random
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from billing.models import ApiKey, Customer, CustomerMember, UsageEvent
from billing.selectors import period_usage
from billing.services.api_keys import api_key_create
from billing.services.customers import customer_create
from billing.services.metering import EventInput, record_events
from plans.money import format_credits, format_money
from plans.models import CreditPack, Feature, Plan
from plans.services import TierInput, feature_create, plan_create

D = Decimal
SEED = 20240601  # fixed, so every machine gets the same demo
DAYS_INTO_PERIOD = 20  # the customers' current period started this many days ago

FEATURES = [
    dict(code="gpt-4o", name="GPT-4o call", unit="call", default_credits_per_unit=D("10")),
    dict(code="gpt-4o-mini", name="GPT-4o mini call", unit="call", default_credits_per_unit=D("1")),
    # Metered per token, as integrators get it from the model API: 1 credit per 1 000
    # tokens. Event quantities are token counts.
    dict(code="embedding", name="Embeddings", unit="token", default_credits_per_unit=D("0.001")),
]

PLANS = [
    dict(code="free", name="Free", included_credits=D("1000"), overage_enabled=False,
         hard_limit_behaviour=Plan.HardLimit.BLOCK),
    dict(code="payg", name="Pay as you go", overage_enabled=True, overage_unit_price=D("0.001")),
    dict(code="pro", name="Pro", base_price=D("49"), included_credits=D("10000"), overage_enabled=True,
         overage_unit_price=D("0.002")),
    dict(code="scale", name="Scale", base_price=D("199"), included_credits=D("100000"), overage_enabled=True,
         overage_tiers=[TierInput(D("100000"), D("0.0015")), TierInput(None, D("0.001"))],
         feature_costs={"gpt-4o": D("8")}),  # volume discount on the big model
]

PACKS = [
    dict(code="credits-5k", name="5 000 credits", credits=D("5000"), price=D("10"), currency="USD"),
    dict(code="credits-25k", name="25 000 credits", credits=D("25000"), price=D("45"), currency="USD"),
]


@dataclass(frozen=True)
class UsageProfile:
    """How a demo customer uses the product over the period so far."""

    external_id: str
    name: str
    email: str
    plan: str
    events: int
    # Relative weights of gpt-4o, gpt-4o-mini and embedding events.
    mix: tuple[int, int, int]
    # Multiplies every event's quantity: bigger customers send bigger requests.
    intensity: int = 1


CUSTOMERS = [
    UsageProfile("acme", "Acme Corp", "billing@acme.example.com", "pro", 200, (2, 5, 3), intensity=2),
    UsageProfile("globex", "Globex", "ap@globex.example.com", "payg", 180, (1, 6, 3), intensity=2),
    # Runs into the free plan's hard limit near the end: the last events are rejected.
    UsageProfile("initech", "Initech", "it@initech.example.com", "free", 110, (0, 8, 2)),
    # Heavy gpt-4o user, past its included credits and into overage.
    UsageProfile("umbrella", "Umbrella Corp", "finance@umbrella.example.com", "pro", 200, (5, 2, 3), intensity=4),
]

ADMIN_USERNAME, ADMIN_PASSWORD = "admin", "admin"
PORTAL_EMAIL, PORTAL_PASSWORD, PORTAL_CUSTOMER = "acme@example.com", "demo-password", "acme"
DEMO_KEY_NAME = "demo"


def demo_events(profile: UsageProfile, *, start, now) -> list[EventInput]:
    """The profile's events, deterministic for a given start, spread between the
    start of the period and now, in time order."""
    rng = random.Random(f"{SEED}:{profile.external_id}")
    span = (now - start - timedelta(minutes=5)).total_seconds()
    offsets = sorted(rng.random() * span for _ in range(profile.events))
    events = []
    for number, offset in enumerate(offsets, start=1):
        feature = rng.choices(["gpt-4o", "gpt-4o-mini", "embedding"], weights=profile.mix)[0]
        if feature == "gpt-4o":
            quantity = D(rng.randint(1, 3))
        elif feature == "gpt-4o-mini":
            quantity = D(rng.randint(1, 12))
        else:
            quantity = D(rng.randint(10, 400) * 100)  # tokens
        quantity *= profile.intensity
        events.append(EventInput(
            event_id=f"demo-{profile.external_id}-{number:06d}", customer=profile.external_id, feature=feature,
            quantity=quantity, timestamp=(start + timedelta(seconds=offset)).replace(microsecond=0),
            properties={"source": "seed_demo"},
        ))
    return events


class Command(BaseCommand):
    help = ("Load a demo business (features, plans, packs, customers with a month of usage, an admin and a "
            "portal login, an API key). Safe to run again: it only adds what is missing.")

    def add_arguments(self, parser):
        parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                            help="Where the server runs (for the summary).")
        parser.add_argument("--allow-without-debug", action="store_true",
                            help="Run even with DEBUG off (it creates a superuser admin/admin).")

    def handle(self, *args, base_url, allow_without_debug, **options):
        if not settings.DEBUG and not allow_without_debug:
            raise CommandError("seed_demo creates a superuser admin/admin and demo data; it refuses to run with "
                               "DEBUG off. Pass --allow-without-debug if this really is a demo machine.")
        now = timezone.now()
        self.seed_catalogue()
        # Midnight UTC, about 20 days ago: the current period is two-thirds through.
        start = (now - timedelta(days=DAYS_INTO_PERIOD)).replace(hour=0, minute=0, second=0, microsecond=0)
        for profile in CUSTOMERS:
            self.seed_customer(profile, start=start, now=now)
        self.seed_users()
        key = self.seed_api_key()
        self.print_summary(base_url=base_url.rstrip("/"), now=now)
        if key is None:
            self.stdout.write("A demo API key already exists (a key is shown only when created). Create another "
                              "with: python manage.py create_api_key NAME")
        else:
            self.stdout.write("Demo API key (shown once; store it now):")
            self.stdout.write(key)

    @transaction.atomic
    def seed_catalogue(self):
        existing = set(Feature.objects.values_list("code", flat=True))
        for feature in FEATURES:
            if feature["code"] not in existing:
                feature_create(**feature)
        existing = set(Plan.objects.values_list("code", flat=True))
        for plan in PLANS:
            if plan["code"] not in existing:
                plan_create(**plan)
        for fields in PACKS:
            # There is no pack service yet; the model's validators are the rules.
            if not CreditPack.objects.filter(code=fields["code"]).exists():
                pack = CreditPack(**fields)
                pack.full_clean()
                pack.save()

    def seed_customer(self, profile: UsageProfile, *, start, now):
        # One transaction per customer: one commit for its few hundred events.
        with transaction.atomic():
            customer = Customer.objects.filter(external_id=profile.external_id).first()
            if customer is None:
                customer = customer_create(external_id=profile.external_id, name=profile.name, email=profile.email,
                                           plan_code=profile.plan, started_at=start, now=now)
            # Event ids are numbered from the customer's own start, so a re-run (even
            # days later) generates the same ids and skips those already recorded.
            subscription_start = customer.subscriptions.order_by("started_at").values_list(
                "started_at", flat=True).first()
            if subscription_start is None:
                return
            recorded = set(
                UsageEvent.objects.filter(customer=customer, event_id__startswith=f"demo-{profile.external_id}-")
                .values_list("event_id", flat=True)
            )
            if len(recorded) >= profile.events:
                return
            missing = [e for e in demo_events(profile, start=subscription_start, now=now) if e.event_id not in recorded]
            for result in record_events(events=missing, now=now):
                if result.error is not None:
                    # e.g. a period that has closed since the first run; the demo goes on.
                    self.stderr.write(f"  skipped an event for {profile.external_id}: {result.error.message}")

    @transaction.atomic
    def seed_users(self):
        User = get_user_model()  # noqa: N806
        if not User.objects.filter(username=ADMIN_USERNAME).exists():
            User.objects.create_superuser(ADMIN_USERNAME, "admin@example.com", ADMIN_PASSWORD)
        user = User.objects.filter(username=PORTAL_EMAIL).first()
        if user is None:
            user = User.objects.create_user(PORTAL_EMAIL, PORTAL_EMAIL, PORTAL_PASSWORD, first_name="Ada")
        if not CustomerMember.objects.filter(user=user).exists():
            CustomerMember.objects.create(user=user, customer=Customer.objects.get(external_id=PORTAL_CUSTOMER),
                                          is_owner=True)

    def seed_api_key(self) -> str | None:
        if ApiKey.objects.filter(name=DEMO_KEY_NAME, revoked_at__isnull=True).exists():
            return None
        _, key = api_key_create(name=DEMO_KEY_NAME)
        return key

    def print_summary(self, *, base_url, now):
        out = self.stdout.write
        out(self.style.SUCCESS("Demo business ready."))
        out(f"  Admin:  {base_url}/admin/   login {ADMIN_USERNAME} / {ADMIN_PASSWORD}")
        out(f"  Portal: {base_url}/portal/  login {PORTAL_EMAIL} / {PORTAL_PASSWORD} (customer {PORTAL_CUSTOMER})")
        out(f"  API:    {base_url}/api/docs/")
        out("Customers, current period:")
        for profile in CUSTOMERS:
            customer = Customer.objects.filter(external_id=profile.external_id).first()
            usage = customer and period_usage(customer=customer, now=now)
            if usage is None:
                continue
            period, quote = usage.period, usage.quote
            rejected = UsageEvent.objects.filter(period=period, status=UsageEvent.Status.REJECTED).count()
            line = (f"  {profile.external_id:<9} {period.plan.name:<14} {format_credits(period.credits_used):>7} "
                    f"credits used of {format_credits(period.included_credits)} included; "
                    f"overage {format_credits(period.overage_credits)} credits = "
                    f"{format_money(quote.overage.amount, quote.currency)}; "
                    f"estimated total {format_money(quote.total, quote.currency)}")
            if rejected:
                line += f"; {rejected} event(s) rejected at the hard limit"
            out(line)
