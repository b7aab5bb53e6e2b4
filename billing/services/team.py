"""Portal logins of a customer account: owners invite teammates."""

import secrets

from django.contrib.auth import get_user_model
from django.db import transaction

from billing.errors import BillingError
from billing.models import Customer, CustomerMember


@transaction.atomic
def member_invite(*, customer: Customer, email: str, invited_by) -> CustomerMember:
    """Add a login for `email` to `customer` (only an owner may). The new user's password
    is random and never shown: they set their own through the emailed one-time link
    (Django's reset flow, which only serves users with a usable password)."""
    inviter = CustomerMember.objects.filter(user=invited_by, customer=customer, is_owner=True).first()
    if inviter is None:
        raise BillingError("Only an account owner can invite teammates.", code="not_owner", status=403)
    email = get_user_model().objects.normalize_email(email).strip()
    user = get_user_model().objects.filter(username__iexact=email).first()
    if user is not None:
        member = CustomerMember.objects.filter(user=user).first()
        if member is not None and member.customer_id == customer.pk:
            return member  # already on the team: inviting again resends the link
        raise BillingError("This email already has a login for another account.", code="email_taken",
                           field="email")
    user = get_user_model().objects.create_user(username=email, email=email, password=secrets.token_urlsafe(32))
    return CustomerMember.objects.create(user=user, customer=customer, is_owner=False)
