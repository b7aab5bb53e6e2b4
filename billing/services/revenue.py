"""Revenue recognition (ASC 606): the revenue journal (`RevenueEntry`) written from the
credit ledger and the invoices.

Rules (docs/revenue.md has a worked example):

- Money paid for credits (a grant's `cost`: the base fee for included credits, the
  price of a pack) is **deferred** when the grant takes effect, and **recognised** as
  its credits are consumed, pro rata: `cost × credits consumed / credits granted`.
- Whatever is left when the credits expire is **breakage**, recognised at the last
  instant they could be used (an expiry at T is recognised at T − 1 µs), so credits that
  die with a period are revenue of that period.
- A rollover is not new billing. The old grant's `rollover` debit transfers the value
  carried (the new grant's `cost`) out of the old grant — a negative `deferred` row —
  and the new grant's deferred row is the matching transfer in. Both sit at the same
  instant, so they cancel in every report; reports never count them as billed.
- Per grant, the rows always add up exactly: the row that empties a grant is the
  remainder (cost − everything journaled for it before), never a product, so
  recognised + breakage + transferred out == cost, to the last of the 10 places.
- **Overage** is recognised from the invoices' overage lines (priced and rounded once
  per line by `plans.pricing`), at the last instant of the period of use. An overage
  line of a void invoice is never recognised; one voided after it was recognised is
  reversed in the month of the void.

Exactly once: every row is a pure function of append-only inputs (ledger entries in id
order, grant costs, invoice lines), so every run computes the same rows, and the unique
constraints on `RevenueEntry` — (kind, ledger_entry), (kind, invoice_line), one
deferred row per grant — turn a second insert into a no-op (`ignore_conflicts`). Runs
may overlap: they insert in one global order (grant, entry, line), so they cannot
deadlock, and a row one run inserts is simply skipped by the other.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import transaction
from django.db.models import Exists, OuterRef, Q

from billing.models import CreditGrant, Invoice, InvoiceLine, LedgerEntry, RevenueEntry
from plans.money import ZERO

log = logging.getLogger(__name__)

# RevenueEntry.amount keeps 10 decimal places; every amount is quantized here, in
# Python, so PostgreSQL and SQLite store the same value and remainders are exact.
AMOUNT_QUANTUM = Decimal("1e-10")
# An instant's predecessor: credits that expire at T were usable until T − 1 µs, and a
# period [start, end) is last in use at end − 1 µs.
JUST_BEFORE = timedelta(microseconds=1)
CHUNK = 500

Kind = RevenueEntry.Kind
Entry = LedgerEntry.Kind


def quantize_amount(amount: Decimal) -> Decimal:
    return amount.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_UP)


class RevenueError(Exception):
    """The ledger does not let a grant's revenue be computed (e.g. a rollover debit
    with no rollover grant to receive its value). Reported by `reconcile`."""


@dataclass(frozen=True)
class JournalRow:
    """A revenue row as computed from its source, before it is stored."""

    kind: str
    amount: Decimal
    currency: str
    customer_id: int
    recognised_at: datetime
    # When its source happened (the grant taking effect, the ledger entry, the invoice
    # or its void): a run at `now` writes only rows whose source is not after `now`.
    source_at: datetime
    grant_id: int | None = None
    ledger_entry_id: int | None = None
    invoice_line_id: int | None = None

    @property
    def key(self) -> tuple:
        """The exactly-once key the database enforces for this row."""
        if self.kind == Kind.DEFERRED and self.grant_id is not None:
            return (self.kind, "grant", self.grant_id)
        if self.ledger_entry_id is not None:
            return (self.kind, "entry", self.ledger_entry_id)
        return (self.kind, "line", self.invoice_line_id)

    def as_model(self) -> RevenueEntry:
        return RevenueEntry(kind=self.kind, amount=self.amount, currency=self.currency, customer_id=self.customer_id,
                            recognised_at=self.recognised_at, grant_id=self.grant_id,
                            ledger_entry_id=self.ledger_entry_id, invoice_line_id=self.invoice_line_id)


def stored_key(row: RevenueEntry) -> tuple:
    """`JournalRow.key` of a stored row."""
    if row.kind == Kind.DEFERRED and row.grant_id is not None:
        return (row.kind, "grant", row.grant_id)
    if row.ledger_entry_id is not None:
        return (row.kind, "entry", row.ledger_entry_id)
    return (row.kind, "line", row.invoice_line_id)


# --- Grants: deferred, recognised, breakage, transfers ----------------------------------

def grant_journal(grant: CreditGrant, entries: list[LedgerEntry], carried_cost: dict[int, Decimal]) -> list[JournalRow]:
    """Every revenue row of one grant, from its ledger entries in id order (the order
    they were committed in, under the customer's lock). `carried_cost` maps each of its
    `rollover` debits to the cost of the grant that received the credits.

    A grant without cost (promotional, manual, free plans) has no revenue rows.
    """
    if grant.cost <= ZERO:
        return []
    cost = quantize_amount(grant.cost)
    common = dict(currency=grant.currency, customer_id=grant.customer_id)
    opening = entries[0] if entries and entries[0].credits > ZERO else None
    # The deferred row of a rollover grant (its opening entry is a `rollover` entry) is
    # the transfer in; of any other grant, new money.
    rows = [JournalRow(kind=Kind.DEFERRED, amount=cost, recognised_at=grant.effective_at,
                       source_at=grant.effective_at, grant_id=grant.pk,
                       ledger_entry_id=opening.pk if opening else None, **common)]
    unrecognised, credits_left = cost, ZERO
    for entry in entries:
        if entry.credits > ZERO:  # the opening entry (or a positive adjustment): no money
            credits_left += entry.credits
            continue
        taken = -entry.credits
        credits_left -= taken
        empties = credits_left <= ZERO
        if entry.kind == Entry.ROLLOVER:
            if entry.pk not in carried_cost:
                raise RevenueError(f"rollover entry {entry.pk} of grant {grant.pk} has no rollover grant receiving "
                                   "its credits")
            carried = quantize_amount(carried_cost[entry.pk])
            rows.append(JournalRow(kind=Kind.DEFERRED, amount=-carried, recognised_at=entry.effective_at,
                                   source_at=entry.effective_at, ledger_entry_id=entry.pk, **common))
            unrecognised -= carried
            if empties and unrecognised != ZERO:
                # Everything was carried, but the new grant's cost is the carried share
                # rounded to 4 places: the sub-cent difference stays with this grant.
                rows.append(JournalRow(kind=Kind.BREAKAGE, amount=unrecognised,
                                       recognised_at=entry.effective_at - JUST_BEFORE, source_at=entry.effective_at,
                                       grant_id=grant.pk, ledger_entry_id=entry.pk, **common))
                unrecognised = ZERO
            continue
        if empties:
            amount = unrecognised  # the remainder: the grant's rows now add up to its cost
        else:
            amount = max(ZERO, min(quantize_amount(cost * taken / grant.credits), unrecognised))
        if entry.kind == Entry.CONSUME:
            kind, at = Kind.RECOGNISED, entry.effective_at
        else:  # expire, or a negative adjustment: value released without service
            kind, at = Kind.BREAKAGE, entry.effective_at - JUST_BEFORE
        rows.append(JournalRow(kind=kind, amount=amount, recognised_at=at, source_at=entry.effective_at,
                               grant_id=grant.pk, ledger_entry_id=entry.pk, **common))
        unrecognised -= amount
    return rows


def carried_costs(debits: list[LedgerEntry]) -> dict[int, Decimal]:
    """For each `rollover` debit, the cost of the rollover grant it fed. The period close
    writes the two entries together: the debit on the old grant, then the new grant's
    opening `rollover` entry for the same credits at the same instant."""
    carried = {}
    for debit in debits:
        candidates = LedgerEntry.objects.filter(
            customer_id=debit.customer_id, kind=Entry.ROLLOVER, credits__gt=0, effective_at=debit.effective_at,
            pk__gt=debit.pk,
        ).select_related("grant").order_by("pk")[:5]
        for credit in candidates:
            if credit.credits == -debit.credits:
                carried[debit.pk] = credit.grant.cost
                break
    return carried


def grants_journal(grants: list[CreditGrant]) -> dict[int, list[JournalRow] | RevenueError]:
    """`grant_journal` for many grants, loading their entries in two queries."""
    entries: dict[int, list[LedgerEntry]] = {g.pk: [] for g in grants}
    for entry in LedgerEntry.objects.filter(grant__in=[g.pk for g in grants]).order_by("pk").only(
            "pk", "customer_id", "grant_id", "kind", "credits", "effective_at"):
        entries[entry.grant_id].append(entry)
    debits = [e for rows in entries.values() for e in rows if e.kind == Entry.ROLLOVER and e.credits < ZERO]
    carried = carried_costs(debits)
    journal = {}
    for grant in grants:
        try:
            journal[grant.pk] = grant_journal(grant, entries[grant.pk], carried)
        except RevenueError as error:
            journal[grant.pk] = error
    return journal


def _journaled(kind: str):
    return Exists(RevenueEntry.objects.filter(kind=kind, ledger_entry=OuterRef("pk")))


def _grants_with_unjournaled_revenue(now: datetime) -> list[int]:
    """Grants with cost that have a source not yet in the journal."""
    costed = LedgerEntry.objects.filter(grant__cost__gt=0, effective_at__lte=now)
    pending = set(costed.filter(kind=Entry.CONSUME).exclude(_journaled(Kind.RECOGNISED))
                  .values_list("grant_id", flat=True).distinct())
    pending |= set(costed.filter(Q(kind=Entry.EXPIRE) | Q(kind=Entry.ADJUST, credits__lt=0))
                   .exclude(_journaled(Kind.BREAKAGE)).values_list("grant_id", flat=True).distinct())
    pending |= set(costed.filter(kind=Entry.ROLLOVER, credits__lt=0).exclude(_journaled(Kind.DEFERRED))
                   .values_list("grant_id", flat=True).distinct())
    pending |= set(
        CreditGrant.objects.filter(cost__gt=0, effective_at__lte=now)
        .exclude(Exists(RevenueEntry.objects.filter(kind=Kind.DEFERRED, grant=OuterRef("pk"))))
        .values_list("pk", flat=True)
    )
    return sorted(pending)


def _stored_keys_for_grants(grant_ids: list[int]) -> set[tuple]:
    rows = RevenueEntry.objects.filter(Q(grant__in=grant_ids) | Q(ledger_entry__grant__in=grant_ids)).only(
        "kind", "grant_id", "ledger_entry_id", "invoice_line_id")
    return {stored_key(row) for row in rows}


def _insert(rows: list[JournalRow]) -> int:
    """Insert in the order given, skipping rows already journaled (by a previous or a
    concurrent run). Returns the number of rows this run attempted."""
    if rows:
        with transaction.atomic():
            RevenueEntry.objects.bulk_create([row.as_model() for row in rows], ignore_conflicts=True,
                                             batch_size=CHUNK)
    return len(rows)


def _recognise_grants(now: datetime) -> int:
    written = 0
    grant_ids = _grants_with_unjournaled_revenue(now)
    for start in range(0, len(grant_ids), CHUNK):
        chunk = grant_ids[start:start + CHUNK]
        grants = list(CreditGrant.objects.filter(pk__in=chunk).order_by("pk"))
        journal = grants_journal(grants)
        stored = _stored_keys_for_grants(chunk)
        rows = []
        for grant in grants:
            computed = journal[grant.pk]
            if isinstance(computed, RevenueError):
                # Nothing is written for this grant until the ledger makes sense;
                # `manage.py reconcile` lists it.
                log.error("revenue of grant %s not recognised: %s", grant.pk, computed)
                continue
            rows += [row for row in computed if row.source_at <= now and row.key not in stored]
        written += _insert(rows)
    return written


# --- Overage ------------------------------------------------------------------------------

def overage_recognition(line: InvoiceLine) -> JournalRow:
    """The overage row of an invoice's overage line: the line's amount (already rounded
    once, by the pricing function), at the last instant of its period of use."""
    end = line.service_end or (line.period.end if line.period_id else line.invoice.issued_at)
    return JournalRow(kind=Kind.OVERAGE, amount=quantize_amount(line.amount), currency=line.invoice.currency,
                      customer_id=line.invoice.customer_id, recognised_at=end - JUST_BEFORE,
                      source_at=line.invoice.issued_at, invoice_line_id=line.pk)


def overage_reversal(line: InvoiceLine, recognised: Decimal) -> JournalRow:
    """Taking back the overage of a line whose invoice was voided after it had been
    recognised, in the month of the void.

    Its exactly-once key is the line's last overage ledger entry (`through_entry_id`):
    (overage, ledger_entry) is otherwise unused, and each overage line ends on an entry
    of its own (a later line of the same period needs newer overage entries)."""
    return JournalRow(kind=Kind.OVERAGE, amount=-recognised, currency=line.invoice.currency,
                      customer_id=line.invoice.customer_id, recognised_at=line.invoice.voided_at,
                      source_at=line.invoice.voided_at, ledger_entry_id=line.through_entry_id)


def _recognise_overage(now: datetime) -> int:
    lines = (
        InvoiceLine.objects.filter(kind=InvoiceLine.Kind.OVERAGE, invoice__issued_at__lte=now,
                                   invoice__status__in=[Invoice.Status.ISSUED, Invoice.Status.PAID])
        .exclude(Exists(RevenueEntry.objects.filter(kind=Kind.OVERAGE, invoice_line=OuterRef("pk"))))
        .select_related("invoice", "period").order_by("pk")
    )
    written = 0
    pending = list(lines)
    for start in range(0, len(pending), CHUNK):
        written += _insert([overage_recognition(line) for line in pending[start:start + CHUNK]])

    recognised = RevenueEntry.objects.filter(kind=Kind.OVERAGE, invoice_line=OuterRef("pk"))
    voided = (
        InvoiceLine.objects.filter(kind=InvoiceLine.Kind.OVERAGE, invoice__status=Invoice.Status.VOID,
                                   invoice__voided_at__lte=now, through_entry_id__isnull=False)
        .filter(Exists(recognised))
        .exclude(Exists(RevenueEntry.objects.filter(kind=Kind.OVERAGE, ledger_entry=OuterRef("through_entry_id"))))
        .select_related("invoice").order_by("pk")
    )
    reversals = []
    for line in voided:
        if not LedgerEntry.objects.filter(pk=line.through_entry_id).exists():
            log.error("overage line %s: its last ledger entry %s is missing; reversal not written", line.pk,
                      line.through_entry_id)
            continue
        amount = RevenueEntry.objects.get(kind=Kind.OVERAGE, invoice_line=line).amount
        reversals.append(overage_reversal(line, amount))
    return written + _insert(reversals)


def recognise_revenue(*, now: datetime) -> int:
    """Bring the revenue journal up to date with everything that happened up to `now`.
    Safe to run any number of times, and concurrently. Returns the number of rows this
    run wrote (a row a concurrent run wrote first may be counted by both)."""
    return _recognise_grants(now) + _recognise_overage(now)
