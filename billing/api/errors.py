"""Every API error has one shape: {"error": {"code", "message", "field"}}."""

from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from plans.errors import DomainError

_CODES = {
    exceptions.ParseError: "malformed_json",
    exceptions.NotAuthenticated: "unauthenticated",
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.PermissionDenied: "insufficient_scope",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.Throttled: "rate_limited",
}
_MISSING = {"required", "null", "blank"}


def error_body(code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field}}


def first_validation_error(detail, path: str = "") -> tuple[str | None, str, str]:
    """(field path, message, detail code) of the first error in a DRF error tree, e.g.
    ('overage_tiers[1].up_to', 'A valid number is required.', 'invalid')."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                child = path
            elif isinstance(key, int):  # ListField reports item errors as {index: …}
                child = f"{path}[{key}]"
            else:
                child = f"{path}.{key}" if path else str(key)
            return first_validation_error(value, child)
    if isinstance(detail, list):
        for index, value in enumerate(detail):
            if isinstance(value, (dict, list)) and value:
                return first_validation_error(value, f"{path}[{index}]")
            if not isinstance(value, (dict, list)):
                return path or None, str(value), getattr(value, "code", "invalid")
    return path or None, str(detail), getattr(detail, "code", "invalid")


def validation_error_body(detail) -> dict:
    field, message, code = first_validation_error(detail)
    if code in _MISSING:
        return error_body("missing_field", message, field)
    return error_body("invalid", f"{field}: {message}" if field else message, field)


def api_exception_handler(exc, context):
    if isinstance(exc, DomainError):
        return Response(error_body(exc.code, exc.message, exc.field), status=exc.status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = validation_error_body(exc.detail)
        response.status_code = status.HTTP_400_BAD_REQUEST
        return response
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), "error")
    response.data = error_body(code, str(exc.detail))
    return response
