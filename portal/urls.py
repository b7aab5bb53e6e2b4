from portal.views import controls, dashboard, notifications, plans, team

app_name = "portal"
# Each page family lists its own routes (portal/views/<topic>.py).
urlpatterns = [
    *dashboard.urlpatterns,
    *controls.urlpatterns,
    *notifications.urlpatterns,
    *plans.urlpatterns,
    *team.urlpatterns,
]
