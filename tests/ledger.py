"""The ledger invariant, asserted after scenarios: every cache equals its entries."""

from billing.ledger_audit import ledger_mismatches


def assert_ledger_consistent():
    mismatches = list(ledger_mismatches())
    assert mismatches == [], mismatches
