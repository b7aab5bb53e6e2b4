from portal.views import dashboard

app_name = "portal"
# Each page family lists its own routes (portal/views/<topic>.py).
urlpatterns = [
    *dashboard.urlpatterns,
]
