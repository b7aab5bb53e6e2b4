"""Production settings: `check --deploy` passes with no warnings on the defaults, HTTPS is
enforced (also behind a TLS-terminating proxy), SECRET_KEY is required, and no secret
is committed. Each production start runs in a subprocess: settings are read once."""

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Settings a developer's shell or CI may export that would change what is tested here;
# DJANGO_ALLOW_ASYNC_UNSAFE is set by the browser tests (Playwright) in this process.
OVERRIDDEN = ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
              "DJANGO_ALLOW_ASYNC_UNSAFE")


def production_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OVERRIDDEN)}
    env.update({"DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50),
                "ALLOWED_HOSTS": "billing.example.com", **extra})
    return {k: v for k, v in env.items() if v is not None}


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_check_deploy_passes_with_no_warnings_on_the_production_defaults():
    done = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], production_env())

    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


def test_check_deploy_catches_a_weak_secret_key():
    done = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
               production_env(SECRET_KEY="short-and-guessable"))

    assert done.returncode != 0 and "security.W009" in done.stdout + done.stderr


@pytest.mark.parametrize("secret_key", [None, ""])
def test_production_mode_refuses_to_start_without_a_secret_key(secret_key):
    done = run(["manage.py", "check"], production_env(SECRET_KEY=secret_key))

    assert done.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in done.stderr


REQUESTS = """
import django; django.setup()
from django.test import Client
client = Client(HTTP_HOST="billing.example.com")
plain = client.get("/portal/login/")
print("plain", plain.status_code, plain.get("Location"))
tls = client.get("/portal/login/", secure=True)
print("tls", tls.status_code, tls.get("Strict-Transport-Security"), tls.cookies["csrftoken"]["secure"])
proxied = client.get("/portal/login/", HTTP_X_FORWARDED_PROTO="https")
print("proxied", proxied.status_code)
"""


def test_production_redirects_to_https_and_sends_hsts_and_secure_cookies():
    done = run(["-c", REQUESTS], production_env())

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "plain 301 https://billing.example.com/portal/login/"
    assert lines[1] == "tls 200 max-age=31536000; includeSubDomains; preload True"
    assert lines[2] == "proxied 301"  # the header is not trusted unless configured


def test_behind_a_proxy_the_forwarded_protocol_is_trusted_when_configured():
    done = run(["-c", REQUESTS], production_env(SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https"))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2] == "proxied 200"


def test_each_https_setting_can_be_turned_off_by_the_environment():
    done = run(["-c", REQUESTS], production_env(SECURE_SSL_REDIRECT="0", SECURE_HSTS_SECONDS="0",
                                                CSRF_COOKIE_SECURE="0"))

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["plain 200 None", "tls 200 None "]


def test_a_malformed_proxy_header_setting_stops_the_start():
    done = run(["manage.py", "check"], production_env(SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"))

    assert done.returncode != 0 and "SECURE_PROXY_SSL_HEADER must be" in done.stderr


def test_development_defaults_stay_on_plain_http():
    env = {k: v for k, v in os.environ.items() if not k.startswith(OVERRIDDEN)}
    code = ("import django; django.setup(); from django.conf import settings as s; "
            "print(s.DEBUG, s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.SECURE_HSTS_SECONDS)")
    done = run(["-c", code], {**env, "DJANGO_SETTINGS_MODULE": "config.settings"})

    assert done.stdout.split() == ["True", "False", "False", "0"], done.stderr


# Shapes of real credentials; test placeholders ("sk_test_…" for localstripe, "bench-…-not-secret")
# do not match.
SECRET_SHAPES = {
    "Stripe live key": re.compile(r"\b[sr]k_live_[0-9a-zA-Z]{16,}"),
    "Stripe webhook secret": re.compile(r"\bwhsec_[0-9a-zA-Z]{24,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Overage API key": re.compile(r"\bovg_[0-9a-f]{12}_[0-9A-Za-z_-]{40,}"),
}


def test_no_secret_is_committed():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = [name for name in files.decode().split("\0") if name]
    assert not [n for n in names if Path(n).name in (".env", "db.sqlite3") or n.endswith((".pem", ".key"))]
    found = []
    for name in names:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [(name, what) for what, shape in SECRET_SHAPES.items() if shape.search(text)]
    assert found == []
