"""Reading rows by hand-written SQL on the metering hot path.

A single event is recorded in a group of a few, and each group read ~15 small things
under its customers' locks (customers, subscriptions, periods, grants, costs…). Through
the ORM each read cost 0.6-1 ms of CPU building and compiling its query, two thirds of a
group's cost; the same read written as SQL costs 0.1-0.3 ms. These helpers keep what the
ORM gives that matters: model instances (`Model.from_db`, as a `RawQuerySet` builds them)
and every value converted exactly as the ORM would (the backend's and the field's
converters: SQLite returns decimals as floats and datetimes as text). The SQL must stay
portable (SQLite and PostgreSQL); "one of these values" is written by `one_of`.
"""

from contextlib import contextmanager
from datetime import timezone
from functools import cache
from weakref import WeakKeyDictionary

from django.db import transaction
from django.db.models.expressions import Col


def in_list(values) -> str:
    """Placeholders for `IN (…)`: one per value ("NULL", which matches nothing, for none)."""
    return ", ".join(["%s"] * len(values)) or "NULL"


def one_of(column: str, values, db_type: str) -> tuple[str, list]:
    """SQL saying that `column` is one of `values` (of PostgreSQL type `db_type`), and its
    parameters. On PostgreSQL one parameter, an array: the statement then reads the same
    whatever the number of values, so psycopg's cache of parsed statements keeps it (it
    binds parameters on the client, as Django has it, and re-parsed a statement of over
    50 parameters on every run, quoting each value: a tenth of a batch's reads; nothing
    is prepared on the server). Elsewhere `IN (%s, …)`."""
    values = list(values)
    if transaction.get_connection().vendor == "postgresql":
        return f"{column} = ANY(%s::{db_type}[])", [values]
    return f"{column} IN ({in_list(values)})", values


def db_value(model, field_name: str, value):
    """`value` as a parameter compared with `model.field_name` (as the ORM would send it:
    SQLite compares datetimes as naive UTC text, UUIDs as hex)."""
    return model._meta.get_field(field_name).get_db_prep_value(value, transaction.get_connection(), prepared=False)


def fetch(model, where: str, params, *, order_by: str = "", for_update: bool = False,
          skip_locked: bool = False) -> list:
    """`model` instances (all concrete fields) for `SELECT … FROM <table> WHERE <where>`,
    optionally `ORDER BY` and locked `FOR UPDATE` (where the database can: not SQLite,
    whose transactions lock the whole file)."""
    reads = Together()
    found = reads.fetch(model, where, params, order_by=order_by, for_update=for_update, skip_locked=skip_locked)
    reads.run()
    return found


def fetch_values(sql: str, params, fields) -> list[tuple]:
    """Rows of any SELECT, each column converted as the ORM converts a value of the
    model field at its position in `fields` (None: taken as it comes)."""
    reads = Together()
    found = reads.values(sql, params, fields)
    reads.run()
    return found


class Together:
    """Reads queued, then sent together by `run()`: on PostgreSQL in one round trip
    (psycopg's pipeline mode), elsewhere one after another. A group of single events
    read ~12 things under its customers' locks; each was a round trip of its own, a
    third of the group's time. The statements run in the order queued, each seeing
    what the ones before it did (a read queued after a lock reads under it).

    `fetch` and `values` return an empty list at once, filled by `run()`; `then`
    is called with the rows once all have arrived (and may query again)."""

    def __init__(self):
        self._queued: list[tuple[str, list, object, list, object]] = []

    def fetch(self, model, where: str, params, *, order_by: str = "", for_update: bool = False,
              skip_locked: bool = False, then=None) -> list:
        connection = transaction.get_connection()
        select, converters = _model_shape(model, connection)
        sql = f"{select} WHERE {where}"
        if order_by:
            sql += f" ORDER BY {order_by}"
        if for_update and connection.features.has_select_for_update:
            sql += " " + connection.ops.for_update_sql(skip_locked=skip_locked)
        alias = connection.alias

        def build(row):
            return model.from_db(alias, None, _converted(row, converters, connection) if converters else row)

        found: list = []
        self._queued.append((sql, list(params), build, found, then))
        return found

    def values(self, sql: str, params, fields, *, then=None) -> list:
        connection = transaction.get_connection()
        converters = _column_converters(tuple(fields), connection)
        build = (lambda row: tuple(_converted(row, converters, connection))) if converters else None
        found: list = []
        self._queued.append((sql, list(params), build, found, then))
        return found

    def run(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        connection = transaction.get_connection()
        if connection.vendor == "postgresql" and len(queued) > 1:
            connection.ensure_connection()
            cursors = []
            try:
                with connection.wrap_database_errors, connection.connection.pipeline():
                    for sql, params, _, _, _ in queued:
                        cursor = connection.cursor()
                        cursors.append(cursor)
                        _load_instants_in_c(cursor, connection)
                        cursor.execute(sql, params)
                results = [cursor.fetchall() for cursor in cursors]
            finally:
                for cursor in cursors:
                    cursor.close()
        else:
            results = []
            for sql, params, _, _, _ in queued:
                with connection.cursor() as cursor:
                    if connection.vendor == "postgresql":
                        _load_instants_in_c(cursor, connection)
                    cursor.execute(sql, params)
                    results.append(cursor.fetchall())
        for (_, _, build, found, _), result in zip(queued, results):
            found.extend(map(build, result) if build else result)
        for _, _, _, found, then in queued:
            if then is not None:
                then(found)


def _load_instants_in_c(cursor, connection) -> None:
    """Let `cursor` read timestamptz values with psycopg's C loader. Django registers a
    subclass of psycopg's pure-Python loader that replaces each value's zone with UTC:
    3 µs a value, a quarter of the CPU of a batch's reads. The C loader (0.3 µs) gives
    the same datetime, zone `timezone.utc`, when the session's TimeZone is UTC, which
    Django sets when USE_TZ is on; otherwise Django's loader stays."""
    loader = _c_timestamptz_loader()
    if (loader is not None and connection.timezone is timezone.utc
            and connection.connection.info.parameter_status("TimeZone") == "UTC"):
        cursor.cursor.adapters.register_loader("timestamptz", loader)


@cache
def _c_timestamptz_loader():
    """psycopg's C timestamptz loader, or None with the pure-Python psycopg."""
    from psycopg import postgres
    from psycopg.pq import Format

    loader = postgres.adapters.get_loader(postgres.types["timestamptz"].oid, Format.TEXT)
    return loader if loader.__module__.startswith("psycopg_binary") else None


@contextmanager
def queued(reads: Together | None):
    """What a reader that may be handed a `Together` queues on: `reads`, or a `Together`
    of its own, run when the block ends."""
    if reads is not None:
        yield reads
        return
    own = Together()
    yield own
    own.run()


def attach_related(instances, related_name: str, related: list, key: str) -> None:
    """Give each of `instances` its `related_name` objects from `related` (matched on
    their `key` attribute, in `related`'s order) as `prefetch_related` would have:
    `instance.<related_name>.all()` then answers from memory. (What Django's
    `prefetch_one_level` does; it offers no public way to hand over rows read by hand.)"""
    by_owner: dict = {}
    for item in related:
        by_owner.setdefault(getattr(item, key), []).append(item)
    for instance in instances:
        owned = by_owner.get(instance.pk, [])
        back = instance._meta.get_field(related_name).field  # the related model's foreign key
        for item in owned:
            back.set_cached_value(item, instance)  # item.<key> answers without a query
        queryset = getattr(instance, related_name).all()
        queryset._result_cache = owned
        queryset._prefetch_done = True
        if not hasattr(instance, "_prefetched_objects_cache"):
            instance._prefetched_objects_cache = {}
        instance._prefetched_objects_cache[related_name] = queryset


def _converted(row, converters, connection) -> list:
    row = list(row)
    for index, (functions, expression) in converters:
        value = row[index]
        for function in functions:
            value = function(value, expression, connection)
        row[index] = value
    return row


def _field_converters(field, connection) -> tuple[list, Col]:
    """What `SQLCompiler.get_converters` applies to a column of `field`: the backend's
    converters, then the field's own (`from_db_value`)."""
    # `get_col`, not `Col(table, field)`: for a foreign key its output field is the target
    # (a key to a UUID converts as a UUID on SQLite, as the ORM's does).
    column = field.get_col(field.model._meta.db_table)
    return connection.ops.get_db_converters(column) + column.get_db_converters(connection), column


# connection → model or fields → what is worked out once for it. Per connection: the
# converters are the connection's own bound methods.
_SHAPES: WeakKeyDictionary = WeakKeyDictionary()


def _column_converters(fields: tuple, connection) -> list:
    """(column index, (converters, column)) for the columns of `fields` that need any
    (a None field: none)."""
    shapes = _SHAPES.setdefault(connection, {})
    converters = shapes.get(fields)
    if converters is None:
        converters = shapes[fields] = [
            (index, convert) for index, convert in
            ((index, _field_converters(field, connection)) for index, field in enumerate(fields) if field is not None)
            if convert[0]]
    return converters


def _model_shape(model, connection) -> tuple[str, list]:
    """(SELECT … FROM table for every concrete field, their converters)."""
    shapes = _SHAPES.setdefault(connection, {})
    shape = shapes.get(model)
    if shape is None:
        meta, quote = model._meta, connection.ops.quote_name
        fields = meta.concrete_fields
        select = (f"SELECT {', '.join(f'{quote(meta.db_table)}.{quote(f.column)}' for f in fields)} "
                  f"FROM {quote(meta.db_table)}")
        shape = shapes[model] = (select, _column_converters(tuple(fields), connection))
    return shape
