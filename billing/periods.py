"""Billing-period arithmetic, all in UTC.

Periods are computed from the subscription's billing anchor, never by chaining one
period's end into the next: anchored on Jan 31, the periods start Jan 31, Feb 28
(29 in a leap year), Mar 31, Apr 30 … so a short month never shifts the anchor day for
good. A yearly plan anchored on Feb 29 renews on Feb 28 in common years.
"""

import calendar
from datetime import datetime, timezone

MONTHS_PER_INTERVAL = {"month": 1, "year": 12}


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, the day clamped to the target month's length."""
    month_index = anchor.month - 1 + months
    year = anchor.year + month_index // 12
    month = month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_start(anchor: datetime, interval: str, index: int) -> datetime:
    """Start of the `index`-th period after the anchor (index 0 starts at the anchor)."""
    return add_months(anchor, index * MONTHS_PER_INTERVAL[interval])


def period_index_at(anchor: datetime, interval: str, at: datetime) -> int:
    """Index of the period that contains `at` (negative if `at` precedes the anchor)."""
    step = MONTHS_PER_INTERVAL[interval]
    months = (at.year - anchor.year) * 12 + (at.month - anchor.month)
    index = months // step
    # The month estimate can be one period off either way (day and time within month).
    while period_start(anchor, interval, index) > at:
        index -= 1
    while period_start(anchor, interval, index + 1) <= at:
        index += 1
    return index


def period_bounds_at(anchor: datetime, interval: str, at: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the period containing `at`."""
    index = period_index_at(anchor, interval, at)
    return period_start(anchor, interval, index), period_start(anchor, interval, index + 1)


def as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetimes are not allowed; Overage works in UTC")
    return value.astimezone(timezone.utc)
