"""Domain errors of the billing app; the API renders them as
`{"error": {"code", "message", "field"}}` with their `status`."""

from plans.errors import DomainError


class BillingError(DomainError):
    pass


class NotFound(BillingError):
    status = 404
    code = "not_found"


class Conflict(BillingError):
    status = 409
    code = "conflict"
