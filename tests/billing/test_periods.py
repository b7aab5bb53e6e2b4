"""Period arithmetic: anchored on the subscription, clamped to short months, in UTC."""

import pytest

from billing.periods import add_months, as_utc, period_bounds_at, period_index_at, period_start
from tests.factories import utc


def test_month_end_anchor_clamps_without_drifting():
    anchor = utc(2026, 1, 31, 10)

    starts = [period_start(anchor, "month", i) for i in range(4)]

    assert starts == [utc(2026, 1, 31, 10), utc(2026, 2, 28, 10), utc(2026, 3, 31, 10), utc(2026, 4, 30, 10)]


def test_leap_day_yearly_anchor():
    anchor = utc(2028, 2, 29)

    assert period_start(anchor, "year", 1) == utc(2029, 2, 28)
    assert period_start(anchor, "year", 4) == utc(2032, 2, 29)


def test_period_containing_an_instant():
    anchor = utc(2026, 1, 31, 10)

    assert period_bounds_at(anchor, "month", utc(2026, 3, 31, 9, 59)) == (utc(2026, 2, 28, 10), utc(2026, 3, 31, 10))
    assert period_bounds_at(anchor, "month", utc(2026, 3, 31, 10)) == (utc(2026, 3, 31, 10), utc(2026, 4, 30, 10))
    assert period_index_at(anchor, "month", utc(2025, 12, 31, 12)) == -1
    assert period_index_at(anchor, "month", utc(2025, 12, 31)) == -2  # before Dec 31 10:00
    assert period_bounds_at(anchor, "year", utc(2027, 6, 1)) == (utc(2027, 1, 31, 10), utc(2028, 1, 31, 10))


def test_december_rolls_into_the_next_year():
    assert add_months(utc(2026, 12, 15), 1) == utc(2027, 1, 15)
    assert add_months(utc(2026, 12, 15), -12) == utc(2025, 12, 15)


def test_naive_datetimes_are_refused():
    from datetime import datetime

    with pytest.raises(ValueError):
        as_utc(datetime(2026, 1, 1))
