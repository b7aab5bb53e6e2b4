"""Every write path of the billing app, one transaction each, by topic:

- customers: customers, subscriptions, opening billing periods
- ledger: granting, consuming and expiring credits (the only code that writes entries)
- metering: recording usage events (single and batch, idempotent)
- entitlements: may this customer use this feature now; reservations
- api_keys: creating and checking integrators' keys
"""
