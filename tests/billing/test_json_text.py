"""The hot path's JSON: `compact_encoder` must write exactly what `JSONEncoder` writes,
and an event's fingerprint must never change (stored fingerprints tell a retry from a
different event reusing its id, forever)."""

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.services.json_text import compact_encoder
from billing.services.metering import EventInput

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_compact_encoder_writes_what_the_standard_encoder_writes(value, sort_keys):
    expected = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys, default=str).encode(value)
    assert compact_encoder(sort_keys=sort_keys, default=str)(value) == expected


def test_compact_encoder_hands_other_values_to_default_and_refuses_without_one():
    assert compact_encoder(default=str)({"at": Decimal("1.50")}) == '{"at":"1.50"}'
    try:
        compact_encoder()({"at": Decimal("1.50")})
    except TypeError:
        pass
    else:
        raise AssertionError("a value JSON cannot hold must be refused, as json.dumps refuses it")


def test_fingerprints_are_what_they_have_always_been():
    """Pinned: computed at aab7c38, before `compact_encoder`, by the encoder the stored
    fingerprints were made with (`JSONEncoder(sort_keys=True, separators=(",", ":"),
    default=str)`)."""
    cases = [
        (EventInput(event_id="e1", customer="acme", feature="gpt-4", quantity=Decimal("1.000000")),
         "2d30e1d04447c933613f989500440795709f8cc10404a38320287940d581296e"),
        (EventInput(event_id="e2", customer="acme", feature="gpt-4", quantity=Decimal("2.50"),
                    timestamp=datetime(2026, 5, 10, 11, 30, 0, 1, tzinfo=timezone(timedelta(hours=2))),
                    properties={"model": "gpt-4o", "tokens": 1234, "ratio": 0.25, "ok": True, "none": None}),
         "cdce939e3757a7ec49ee3d5c9b50dc6ffa0f3741a439d329580246451bdaadc8"),
        (EventInput(event_id="e3", customer="ünï \"c\"", feature="f", quantity=Decimal("1E+3"),
                    properties={"z": [1, 2.5, None, {"b": "☃", "a": "\\t"}], "a": {"y": 1, "x": "\u00e9"}},
                    reservation_id="6d9f1f6e-7a0c-4d55-9d7b-6a1d2f8e9c01"),
         "ffe0ed1d63998b0f0d38d547ee2531910831b8d23d6d7725c9294ae6779a8e19"),
    ]
    assert [event.fingerprint() for event, _ in cases] == [pinned for _, pinned in cases]
