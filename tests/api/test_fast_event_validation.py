"""`validated_event` (the batch's shortcut) must answer exactly what `EventSerializer`
answers: the same validated data, or the same errors, for any item."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rest_framework import serializers

from billing.api.serializers import EventSerializer, validated_event

text = st.one_of(
    st.text(max_size=6), st.text(alphabet="ab -_\x00\t\n", max_size=4), st.just(""), st.just(" x "),
    st.just("é"), st.just("x" * 255), st.just("x" * 256), st.just("f" * 65), st.integers(), st.none(), st.booleans(),
)
scalar = st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                   st.booleans(), st.none())
properties = st.one_of(
    st.dictionaries(st.text(max_size=4), scalar, max_size=4),
    st.dictionaries(st.text(max_size=3), st.lists(scalar, max_size=2) | st.dictionaries(st.text(max_size=2), scalar),
                    max_size=2),
    st.just({"big": "x" * (16 * 1024)}), st.just({"nul": "a\x00"}), st.lists(scalar, max_size=2), st.text(max_size=3),
)
quantity = st.one_of(
    st.integers(-2, 2), st.integers(999_999_999, 1_000_000_001), st.just("1.5"), st.just("0.0000001"),
    st.just("1e3"), st.just(" 2 "), st.just("abc"), st.just(1.25), st.just(True), st.none(), st.just("1" * 30),
    # Plain decimal strings (the shortcut's own pattern and bounds) and their edges.
    st.decimals(min_value=-1, max_value=2 * 10**9, places=7, allow_nan=False, allow_infinity=False).map(str),
    st.decimals(min_value=0, max_value=10**3, places=6, allow_nan=False, allow_infinity=False).map(
        lambda d: format(d, "f")),
    st.sampled_from(["0.000001", "0.0000010", "1000000000", "1000000000.000000", "1000000000.000001",
                     "999999999.999999", "00.5", ".5", "5.", "+1", "-0", "0", "0.0", "1.", "1_000", "١"]),
)
timestamp = st.one_of(st.just("2026-05-10T12:00:00Z"), st.just("2026-05-10T12:00:00+02:00"), st.just("2026-05-10"),
                      st.just("2026-05-10T12:00:00"), st.just("yesterday"), st.integers(), st.none())
reservation = st.one_of(st.uuids().map(str), st.just("not-a-uuid"), st.none(), st.integers())


@st.composite
def items(draw):
    item = {}
    for name, values in (("id", text), ("customer", text), ("feature", text), ("quantity", quantity),
                         ("timestamp", timestamp), ("properties", properties), ("reservation_id", reservation),
                         ("unknown", scalar)):
        # Mostly plausible events, with each field sometimes missing or odd.
        if draw(st.integers(0, 9)) < (1 if name in ("timestamp", "reservation_id", "unknown") else 9):
            item[name] = draw(values)
    if draw(st.integers(0, 3)) == 0:
        item.update({"id": "evt-1", "customer": "acme", "feature": "api", "quantity": draw(quantity)})
    return item


def outcome(validate, item):
    try:
        return "ok", dict(validate(item))
    except serializers.ValidationError as error:
        return "error", error.detail


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(items(), st.lists(st.integers(), max_size=2), st.text(max_size=3), st.none()))
def test_the_shortcut_answers_what_the_serializer_answers(item):
    assert outcome(validated_event, item) == outcome(EventSerializer().run_validation, item)


def test_a_plain_event_takes_the_shortcut():
    """Guard against a shortcut that silently never applies (the property above would
    still pass)."""
    from billing.api.serializers import _plain_event

    item = {"id": "e1", "customer": "acme", "feature": "api", "quantity": 2, "properties": {"model": "small", "n": 3}}
    assert _plain_event(item) == EventSerializer().run_validation(item)
    assert _plain_event({**item, "timestamp": "2026-05-10T12:00:00Z", "quantity": "0.5"}) is not None
    assert _plain_event({**item, "id": " e1"}) is None  # the serializer trims: it decides


check_bodies = st.fixed_dictionaries({}, optional={
    "customer": text, "feature": text, "quantity": quantity,
    "reserve": st.one_of(st.booleans(), st.just("true"), st.just(1), st.none()),
    "reservation_ttl_seconds": st.one_of(st.integers(-1, 100_000), st.just("60"), st.none()),
    "unknown": scalar,
})


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(check_bodies, st.lists(st.integers(), max_size=1), st.none()))
def test_the_check_shortcut_answers_what_the_serializer_answers(body):
    from billing.api.serializers import EntitlementCheckSerializer, validated_check

    assert outcome(validated_check, body) == outcome(EntitlementCheckSerializer().run_validation, body)


@pytest.mark.django_db
def test_a_lone_surrogate_decoded_by_another_charset_is_refused(api):
    """The parser skips its walk for UTF-8 bodies without a surrogate escape; a codec that
    decodes the escape itself (unicode_escape) must still be walked."""
    body = b'{"id": "e1", "customer": "acme", "feature": "api", "quantity": 1, "properties": {"p": "\\ud800"}}'
    response = api.post("/api/v1/events", body, content_type="application/json; charset=unicode_escape")
    assert response.status_code == 400, response.content


@pytest.mark.parametrize("size", [16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1])
@pytest.mark.parametrize("filler", ["x", "\U0001f600", "\n", '"'])
def test_properties_at_the_size_limit_are_judged_as_the_serializer_judges(size, filler):
    """The shortcut skips measuring properties only when a bound proves them small: at
    the limit, with characters that escape to 2, 6 or 12, both must agree."""
    import json as _json

    base = {"id": "e1", "customer": "acme", "feature": "api", "quantity": "1"}
    overhead = len(_json.dumps({"p": ""}, separators=(",", ":")))
    unit = len(_json.dumps(filler)) - 2
    text = filler * ((size - overhead) // unit) + "x" * ((size - overhead) % unit)
    item = {**base, "properties": {"p": text}}
    assert len(_json.dumps(item["properties"], separators=(",", ":"))) == size
    assert outcome(validated_event, item) == outcome(EventSerializer().run_validation, item)
