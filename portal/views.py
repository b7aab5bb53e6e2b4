from django.shortcuts import render


def home(request):
    """Landing page until the customer portal lands: where to go next."""
    return render(request, "portal/home.html")
