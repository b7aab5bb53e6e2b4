"""Portal logins of a customer account: owners invite teammates."""

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.template.loader import render_to_string
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from billing.errors import BillingError
from billing.models import Customer, CustomerMember

# Neutral on purpose: whether the address belongs to another customer's login, to staff
# or to anyone else is not the inviter's to know.
CANNOT_INVITE = "That person can't be invited; ask them to use another email or contact support."


@transaction.atomic
def member_invite(*, customer: Customer, email: str, invited_by) -> CustomerMember:
    """Add a login for `email` to `customer` (only an owner may). The new user's password
    is random and never shown: they set their own through the one-time link that
    `member_send_invitation` emails.

    Any other login already using the address, as its username or its email, is a
    conflict: Django's password reset reaches every active user with an email, so a
    second login sharing it (a superuser's, another customer's) must never be created
    beside it, nor be sent an invitation. Staff logins are never invited."""
    inviter = CustomerMember.objects.filter(user=invited_by, customer=customer, is_owner=True).first()
    if inviter is None:
        raise BillingError("Only an account owner can invite teammates.", code="not_owner", status=403)
    email = get_user_model().objects.normalize_email(email).strip()
    existing = list(get_user_model().objects.filter(Q(username__iexact=email) | Q(email__iexact=email))
                    .select_related("customer_membership"))
    if existing:
        if len(existing) == 1 and not (existing[0].is_staff or existing[0].is_superuser):
            member = getattr(existing[0], "customer_membership", None)
            if member is not None and member.customer_id == customer.pk:
                return member  # already on the team: inviting again resends the link
        raise BillingError(CANNOT_INVITE, code="email_unavailable", field="email")
    user = get_user_model().objects.create_user(username=email, email=email, password=secrets.token_urlsafe(32))
    return CustomerMember.objects.create(user=user, customer=customer, is_owner=False)


def member_send_invitation(*, member: CustomerMember, inviter, domain: str, use_https: bool) -> None:
    """Email `member` (and only that login) a one-time link to set their password: the
    set-password page of Django's reset flow, with a token for this user. Called once
    the member is committed (the view calls it after `member_invite` returns)."""
    user = member.user
    context = {
        "email": user.email, "domain": domain, "site_name": domain, "protocol": "https" if use_https else "http",
        "uid": urlsafe_base64_encode(force_bytes(user.pk)), "token": default_token_generator.make_token(user),
        "user": user, "customer": member.customer, "inviter": inviter,
    }
    # Email subject must not contain newlines.
    subject = "".join(render_to_string("portal/invite_subject.txt", context).splitlines())
    send_mail(subject, render_to_string("portal/invite_email.txt", context), None, [user.email])
