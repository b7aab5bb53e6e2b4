"""The account's team: who can log in, and inviting a teammate (owners)."""

from django import forms
from django.contrib import messages
from django.contrib.sites.shortcuts import get_current_site
from django.http import HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import path

from billing.models import CustomerMember
from billing.services.team import member_invite, member_send_invitation
from plans.errors import DomainError
from portal.access import customer_of, portal_login_required


class InviteForm(forms.Form):
    email = forms.EmailField(label="Teammate's email")


@portal_login_required
def team(request):
    customer = customer_of(request)
    is_owner = CustomerMember.objects.filter(user=request.user, customer=customer, is_owner=True).exists()
    if request.method == "POST" and not is_owner:
        return HttpResponseForbidden("Only an account owner can invite teammates.")
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            member = member_invite(customer=customer, email=form.cleaned_data["email"], invited_by=request.user)
        except DomainError as error:
            form.add_error("email" if error.field == "email" else None, error.message)
        else:
            # A one-time set-password link for this member's login only; no password mailed.
            member_send_invitation(member=member, inviter=request.user, domain=get_current_site(request).domain,
                                   use_https=request.is_secure())
            messages.success(request, f"We emailed {member.user.email} a link to set their password.")
            return redirect("portal:team")
    members = CustomerMember.objects.filter(customer=customer).select_related("user").order_by("-is_owner",
                                                                                             "user__username")
    return render(request, "portal/team.html", {"customer": customer, "members": members, "form": form,
                                                "is_owner": is_owner})


urlpatterns = [
    path("team/", team, name="team"),
]
