"""After logging out in another tab, the dashboard's poll (an htmx request) must not
swap the login page into the figures: it gets an HX-Redirect to the login page, whose
`next` is the page the visitor was on. Ordinary requests still get a 302."""

import pytest

pytestmark = pytest.mark.django_db
HTMX = {"HX-Request": "true"}


@pytest.mark.parametrize("url, page", [
    ("/portal/", "/portal/"),
    ("/portal/usage/?page=2", "/portal/usage/?feature=api"),
    ("/portal/usage/events.csv", "/portal/usage/"),
    ("/portal/plan/change/scale/", "/portal/"),
    ("/portal/team/", "/portal/team/"),
])
def test_an_anonymous_htmx_request_is_sent_to_login_as_a_whole_page(client, url, page):
    response = client.get(url, headers={**HTMX, "HX-Current-URL": f"http://testserver{page}"})

    assert response.status_code == 200
    assert response["HX-Redirect"] == "/portal/login/?next=" + page.replace("?", "%3F").replace("=", "%3D")
    assert b"password" not in response.content  # no login form to swap into the fragment


def test_without_a_current_url_the_requested_one_is_next(client):
    response = client.get("/portal/", headers=HTMX)

    assert (response.status_code, response["HX-Redirect"]) == (200, "/portal/login/?next=/portal/")


def test_a_post_from_htmx_is_redirected_too_and_changes_nothing(client):
    response = client.post("/portal/plan/change/scale/", headers=HTMX)

    assert (response.status_code, response["HX-Redirect"]) == (200, "/portal/login/?next=/portal/plan/change/scale/")


@pytest.mark.parametrize("url", ["/portal/", "/portal/usage/", "/portal/plan/change/scale/", "/portal/team/"])
def test_an_ordinary_anonymous_request_still_gets_the_login_redirect(client, url):
    response = client.get(url)

    assert (response.status_code, response["Location"]) == (302, f"/portal/login/?next={url}")
    assert "HX-Redirect" not in response
