"""Password reset (and the invitation's set-password page) in the portal's own look,
not the Django admin's."""

import re

import pytest

pytestmark = pytest.mark.django_db
ADMIN_LOOK = "Django administration"
PORTAL_LOOK = "/static/portal/portal.css"


def portal_page(response) -> str:
    page = response.content.decode()
    assert response.status_code == 200
    assert ADMIN_LOOK not in page and PORTAL_LOOK in page
    return page


def test_every_step_of_a_password_reset_is_a_portal_page(client, django_user_model, mailoutbox):
    django_user_model.objects.create_user("ap@acme.test", "ap@acme.test", "old-pw-123")

    form = portal_page(client.get("/portal/password_reset/"))
    sent = client.post("/portal/password_reset/", {"email": "ap@acme.test"}, follow=True)
    [mail] = mailoutbox
    link = re.search(r"https?://[^/]+(/portal/reset/\S+)", mail.body).group(1)
    confirm = client.get(link, follow=True)
    done = client.post(confirm.redirect_chain[-1][0], {"new_password1": "s3cret-Passw0rd!",
                                                       "new_password2": "s3cret-Passw0rd!"}, follow=True)

    assert "Reset your password" in form and 'name="email"' in form
    assert "Check your email" in portal_page(sent)
    page = portal_page(confirm)
    assert "Set your password" in page and 'name="new_password1"' in page and 'name="new_password2"' in page
    assert "Your password is set" in portal_page(done)
    assert client.login(username="ap@acme.test", password="s3cret-Passw0rd!")


def test_mismatched_passwords_are_shown_inline(client, django_user_model, mailoutbox):
    django_user_model.objects.create_user("ap@acme.test", "ap@acme.test", "old-pw-123")
    client.post("/portal/password_reset/", {"email": "ap@acme.test"})
    link = re.search(r"https?://[^/]+(/portal/reset/\S+)", mailoutbox[0].body).group(1)
    form_url = client.get(link, follow=True).redirect_chain[-1][0]

    page = portal_page(client.post(form_url, {"new_password1": "s3cret-Passw0rd!", "new_password2": "other-Pw-1"}))

    assert "The two password fields didn’t match." in page


def test_a_used_or_forged_link_says_so_in_the_portal(client):
    page = portal_page(client.get("/portal/reset/MQ/set-password/"))

    assert "This link no longer works" in page and 'href="/portal/password_reset/"' in page
