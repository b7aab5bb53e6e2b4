"""Content negotiation with a shortcut for what every client sends.

DRF parses the Accept header and ranks media types for every request (about 5 % of an
entitlement check). The API renders only JSON, so a request that accepts anything or
asks for JSON by name, without a `?format=` override, gets the JSON renderer at once,
with the media type DRF itself would choose; anything else is negotiated as before.
"""

from rest_framework.negotiation import DefaultContentNegotiation

# Accept headers that mean "JSON will do" (no header at all, anything, JSON by name).
ACCEPTS_JSON = frozenset({"", "*/*", "application/json"})


class ApiContentNegotiation(DefaultContentNegotiation):
    def select_renderer(self, request, renderers, format_suffix=None):
        if (not format_suffix and renderers and renderers[0].media_type == "application/json"
                and request.META.get("HTTP_ACCEPT", "") in ACCEPTS_JSON
                and self.settings.URL_FORMAT_OVERRIDE not in request.query_params):
            return renderers[0], "application/json"
        return super().select_renderer(request, renderers, format_suffix)
