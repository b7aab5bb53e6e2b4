"""Domain errors of the billing app; the API renders them as
`{"error": {"code", "message", "field"}}` with their `status`."""

from plans.errors import DomainError


class BillingError(DomainError):
    pass


class NeedsDatabase(Exception):
    """A read told not to touch the database (the check server answers plain checks on its
    event loop, billing/api/check_server.py) needed it: the request is answered in a
    thread instead, where it may. Not an answer to a client: never rendered."""


class NotFound(BillingError):
    status = 404
    code = "not_found"


class Conflict(BillingError):
    status = 409
    code = "conflict"
