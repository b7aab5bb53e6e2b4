"""Owners invite teammates; the invitation is a one-time set-password link."""

import re

import pytest
from django.contrib.auth import get_user_model

from billing.models import CustomerMember
from tests.factories import make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NEUTRAL = "That person can&#x27;t be invited; ask them to use another email or contact support."


@pytest.fixture
def owner(client):
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def test_an_owner_invites_a_teammate_who_sets_a_password_and_logs_in(client, owner, mailoutbox):
    response = client.post("/portal/team/", {"email": "dev@acme.test"}, follow=True)

    assert "We emailed dev@acme.test a link to set their password." in response.content.decode()
    member = CustomerMember.objects.get(user__username="dev@acme.test")
    assert (member.customer, member.is_owner) == (owner, False)
    [mail] = mailoutbox
    assert mail.to == ["dev@acme.test"] and "Acme Corp" in mail.subject
    link = re.search(r"https?://[^/]+(/portal/reset/\S+)", mail.body).group(1)
    client.logout()
    form_page = client.get(link, follow=True)
    client.post(form_page.redirect_chain[-1][0], {"new_password1": "s3cret-Passw0rd!",
                                                  "new_password2": "s3cret-Passw0rd!"})
    assert client.login(username="dev@acme.test", password="s3cret-Passw0rd!")


def test_only_owners_invite_and_an_email_of_another_account_is_refused(client, owner, django_user_model):
    other = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    taken = django_user_model.objects.create_user("x@globex.test", "x@globex.test", "pw")
    CustomerMember.objects.create(user=taken, customer=other)

    refused = client.post("/portal/team/", {"email": "x@globex.test"})
    teammate = django_user_model.objects.create_user("t@acme.test", "t@acme.test", "pw")
    CustomerMember.objects.create(user=teammate, customer=owner)
    client.force_login(teammate)
    page = client.get("/portal/team/").content.decode()
    not_owner = client.post("/portal/team/", {"email": "new@acme.test"})

    assert NEUTRAL in refused.content.decode() and "another account" not in refused.content.decode()
    assert "Invite a teammate" not in page
    assert (not_owner.status_code, not_owner.content.decode()) == (403, "Only an account owner can invite teammates.")
    assert not django_user_model.objects.filter(username="new@acme.test").exists()


@pytest.mark.parametrize("username, email, staff, superuser", [
    ("admin", "admin@example.com", True, True),  # the superuser: matched by email, not username
    ("ops@example.com", "ops@example.com", True, False),  # a staff login
    ("x-globex", "Admin@Example.com", False, False),  # another customer's login, matched by email
])
def test_an_address_already_used_by_any_login_is_refused_neutrally_and_gets_no_email(
        client, owner, django_user_model, mailoutbox, username, email, staff, superuser):
    existing = django_user_model.objects.create_user(username, email, "pw", is_staff=staff, is_superuser=superuser)
    invited = email.lower()
    before = django_user_model.objects.count()

    response = client.post("/portal/team/", {"email": invited})

    page = response.content.decode()
    assert NEUTRAL in page
    assert "another account" not in page
    assert mailoutbox == []  # no reset link for the existing login, disguised or not
    assert django_user_model.objects.count() == before
    assert not CustomerMember.objects.filter(user=existing).exists()


def test_the_invitation_goes_to_the_new_member_only(client, owner, django_user_model, mailoutbox):
    response = client.post("/portal/team/", {"email": "dev@acme.test"}, follow=True)

    assert "We emailed dev@acme.test a link to set their password." in response.content.decode()
    assert [mail.to for mail in mailoutbox] == [["dev@acme.test"]]
    member = CustomerMember.objects.get(customer=owner, user__email="dev@acme.test")
    assert member.user.username == "dev@acme.test" and not member.user.is_staff


def test_inviting_a_teammate_again_resends_their_link_only(client, owner, django_user_model, mailoutbox):
    client.post("/portal/team/", {"email": "dev@acme.test"})
    client.post("/portal/team/", {"email": "DEV@acme.test"})

    assert [mail.to for mail in mailoutbox] == [["dev@acme.test"], ["dev@acme.test"]]
    assert django_user_model.objects.filter(email__iexact="dev@acme.test").count() == 1
