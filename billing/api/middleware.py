"""Refuse an oversized API request before anything reads its body."""

from django.conf import settings
from django.http import JsonResponse

from billing.api.errors import error_body


class ApiBodySizeLimit:
    """413 with the API's error body when an `/api/` request declares a body larger than
    OVERAGE_API_MAX_BODY_BYTES: decided from Content-Length alone, so a 50 MB upload is
    refused without being read or parsed. (Django itself would answer 400 later.) A
    body without Content-Length is read as empty by Django, so it cannot get around this."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path_info.startswith("/api/"):
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return JsonResponse(error_body("invalid_content_length", "Content-Length is not a number."),
                                    status=400)
            limit = settings.OVERAGE_API_MAX_BODY_BYTES
            if declared > limit:
                return JsonResponse(error_body(
                    "request_too_large", f"The request body is {declared} bytes; the limit is {limit} bytes "
                    f"(a batch carries at most {settings.OVERAGE_MAX_BATCH_EVENTS} events)."), status=413)
        return self.get_response(request)
