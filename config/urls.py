from django.contrib import admin
from django.urls import include, path
from billing.stripe_views import stripe_webhook
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(("billing.api.urls", "api"), namespace="api")),
    path("api/schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path("api/docs/", SpectacularRedocView.as_view(url_name="schema", authentication_classes=[],
                                                    permission_classes=[]), name="api-docs"),
    # Stripe webhooks (signature-checked; every delivery kept by dj-stripe's models).
    path("stripe/webhook/<uuid:uuid>/", stripe_webhook, name="stripe-webhook"),
    # Login, logout and password reset (Django auth; their templates in templates/registration/).
    path("portal/", include("django.contrib.auth.urls")),
    path("portal/", include("portal.urls")),
    path("", include("portal.root_urls")),
]
