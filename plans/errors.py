class DomainError(Exception):
    """A refused request with a machine-readable `code`, a readable message, the
    offending `field` if any, and the HTTP status the API answers with."""

    status = 422
    code = "unprocessable"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.field = field
