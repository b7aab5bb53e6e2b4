from portal.views import controls, credits, dashboard, invoices, notifications, plans, team, usage

app_name = "portal"
# Each page family lists its own routes (portal/views/<topic>.py).
urlpatterns = [
    *dashboard.urlpatterns,
    *usage.urlpatterns,
    *invoices.urlpatterns,
    *credits.urlpatterns,
    *controls.urlpatterns,
    *notifications.urlpatterns,
    *plans.urlpatterns,
    *team.urlpatterns,
]
