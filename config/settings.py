"""Overage settings. Everything that differs between a laptop and production comes
from the environment; the defaults give the embedded mode (SQLite, in-process tasks)."""

from decimal import Decimal
from pathlib import Path

import dj_database_url

from .env import email_settings_from_url, env_bool, env_int, env_list, env_rate, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-local-development-key-change-me"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- HTTPS ----------------------------------------------------------------------------
# With DEBUG off every default is the safe one (`manage.py check --deploy` passes with no
# warnings); each may be turned off by a deployment that knows why, e.g.
# SECURE_SSL_REDIRECT=0 for a production-mode run on plain http://localhost.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Behind a proxy that terminates TLS: SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO,https
# (the request header as Django names it, and the value meaning HTTPS). Set it only if the
# proxy always sets or overwrites that header, or any client could claim HTTPS; without it,
# the redirect above loops behind such a proxy.
_proxy_ssl_header = env_list("SECURE_PROXY_SSL_HEADER", [])
if _proxy_ssl_header:
    if len(_proxy_ssl_header) != 2 or not _proxy_ssl_header[0].startswith("HTTP_"):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER must be 'HTTP_<HEADER>,<value>', "
                                   f"e.g. 'HTTP_X_FORWARDED_PROTO,https', got {_proxy_ssl_header!r}")
    SECURE_PROXY_SSL_HEADER = tuple(_proxy_ssl_header)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
# Browsers remember for this long to use HTTPS only (a year in production); 0 = no header.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 365 * 86400)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
# Only marks the header as eligible; a domain joins browsers' preload lists only when its
# owner submits it (hstspreload.org).
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "django_htmx",
    "template_partials",
    "djstripe",
    "plans",
    "billing",
    "portal",
]

MIDDLEWARE = [
    "billing.api.middleware.ApiBodySizeLimit",
    "django.middleware.security.SecurityMiddleware",
    # config.middleware: Django's session, auth, messages and htmx middleware (and the
    # portal's login lockout), passed straight through by /api/ requests. CSRF stays
    # Django's own, for every request (`check --deploy` looks for it by name).
    "config.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "config.middleware.AuthenticationMiddleware",
    "config.middleware.LoginLockoutMiddleware",
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.unread_notifications",
            ],
        },
    }
]

# --- Database -----------------------------------------------------------------------
# DATABASE_URL=postgres://user@host:5432/name in production and CI; a SQLite file in
# the project folder otherwise, so a newcomer needs nothing but Python.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Transactions take SQLite's write lock when they begin (IMMEDIATE), so concurrent
    # writers queue for up to `timeout` seconds; deferred transactions would fail at once
    # with "database is locked" when upgrading a read lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=20, transaction_mode="IMMEDIATE")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache (Redis when configured) ----------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"  # everything is stored and computed in UTC
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

# Login brute-force protection (portal/login_throttle.py): the gate backend comes first.
AUTHENTICATION_BACKENDS = ["portal.login_throttle.LoginThrottleBackend", "django.contrib.auth.backends.ModelBackend"]
# This many failures for one username from one address within the window lock that pair
# out for the lockout; one address failing this often for any usernames is locked out too.
OVERAGE_LOGIN_MAX_FAILURES = env_int("OVERAGE_LOGIN_MAX_FAILURES", 5)
OVERAGE_LOGIN_MAX_FAILURES_PER_ADDRESS = env_int("OVERAGE_LOGIN_MAX_FAILURES_PER_ADDRESS", 50)
OVERAGE_LOGIN_WINDOW_SECONDS = env_int("OVERAGE_LOGIN_WINDOW_SECONDS", 15 * 60)
OVERAGE_LOGIN_LOCKOUT_SECONDS = env_int("OVERAGE_LOGIN_LOCKOUT_SECONDS", 15 * 60)
# Behind a proxy, the request header holding the client's address as the proxy sets it
# (e.g. HTTP_X_REAL_IP); empty = REMOTE_ADDR.
OVERAGE_LOGIN_IP_HEADER = env_str("OVERAGE_LOGIN_IP_HEADER", "")

LOGIN_URL = "/portal/login/"
LOGIN_REDIRECT_URL = "/portal/"
LOGOUT_REDIRECT_URL = "/portal/login/"

# --- Email --------------------------------------------------------------------------
globals().update(email_settings_from_url(env_str("EMAIL_URL", "console://")))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "billing@overage.localhost")

# --- Celery -------------------------------------------------------------------------
# No broker configured: tasks run eagerly in-process (embedded mode).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TIMEZONE = "UTC"
CELERY_TASK_ACKS_LATE = True
# With late acks a task whose worker process dies (SIGKILL, OOM) is re-queued rather than
# acknowledged: every task is idempotent, so running it again is safe, losing it is not.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A message taken by a worker that vanished is redelivered after this long (Redis broker).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 900)}
# After a failed send, a process keeps follow-up tasks in the database (DeferredTask) for
# this long without trying the broker again; the beat sends them once it is back.
OVERAGE_BROKER_RETRY_SECONDS = env_int("OVERAGE_BROKER_RETRY_SECONDS", 10)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- REST API -----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["billing.api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["billing.api.auth.HasApiKeyScope"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "billing.api.errors.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "billing.api.negotiation.ApiContentNegotiation",
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "COERCE_DECIMAL_TO_STRING": True,
    "UNAUTHENTICATED_USER": None,
    # Per API key, by the scope the endpoint needs (OVERAGE_API_RATES below).
    "DEFAULT_THROTTLE_CLASSES": ["billing.api.throttling.ApiKeyRateThrottle"],
}


# Requests per API key to the endpoints of each scope (a batch of 1 000 events is one
# request). Ingestion is the product's hot path and gets the most room; admin writes
# (plans, customers, grants) the least, as a leaked admin key is the costliest. Counted
# in the cache: Redis in production, so the limit holds across web processes; without
# Redis per process. If the cache is unreachable, requests are let through (and logged).
OVERAGE_API_RATES = {
    "ingest": env_rate("OVERAGE_RATE_INGEST", "120000/min"),
    "read": env_rate("OVERAGE_RATE_READ", "6000/min"),
    "admin": env_rate("OVERAGE_RATE_ADMIN", "600/min"),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Overage API",
    "DESCRIPTION": "Metering, entitlement checks, plans, customers and invoices for credit-based pricing.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

# --- Stripe (optional; without keys Overage invoices locally) -------------------------
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_PUBLISHABLE_KEY = env_str("STRIPE_PUBLISHABLE_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "")  # e.g. a localstripe URL in development
# Stripe.js; in tests and local development the localstripe stand-in
# (STRIPE_API_BASE + "/js.stripe.com/v3/").
STRIPE_JS_URL = env_str("STRIPE_JS_URL", f"{STRIPE_API_BASE}/js.stripe.com/v3/" if STRIPE_API_BASE
                        else "https://js.stripe.com/v3/")
# dj-stripe reads its keys from these; live mode follows the key's prefix.
STRIPE_LIVE_MODE = STRIPE_SECRET_KEY.startswith(("sk_live_", "rk_live_"))
STRIPE_LIVE_SECRET_KEY = STRIPE_SECRET_KEY if STRIPE_LIVE_MODE else ""
STRIPE_TEST_SECRET_KEY = "" if STRIPE_LIVE_MODE else STRIPE_SECRET_KEY
DJSTRIPE_FOREIGN_KEY_TO_FIELD = "id"
# Stripe webhooks: billing/stripe_views.py (signature-checked with dj-stripe; deliveries
# kept as dj-stripe WebhookEventTriggers; Overage acts on each event once by its id).
# An automatic top-up whose payment fails this many times in a row is switched off.
OVERAGE_TOPUP_MAX_FAILURES = env_int("OVERAGE_TOPUP_MAX_FAILURES", 3)

# --- Billing rules --------------------------------------------------------------------
# Late events may land in a period until this long after its end; then it closes.
OVERAGE_PERIOD_GRACE_SECONDS = env_int("OVERAGE_PERIOD_GRACE_SECONDS", 3600)
# An event stamped further than this in the future is refused (clock skew allowance).
OVERAGE_CLOCK_SKEW_SECONDS = env_int("OVERAGE_CLOCK_SKEW_SECONDS", 300)
OVERAGE_RESERVATION_TTL_SECONDS = env_int("OVERAGE_RESERVATION_TTL_SECONDS", 300)
# Entitlement checks reuse a cached credit position at most this old (billing/services/positions.py).
# Only with Redis: a per-process cache would miss other processes' invalidations (0 = off).
OVERAGE_POSITION_CACHE_SECONDS = env_int("OVERAGE_POSITION_CACHE_SECONDS", 30 if REDIS_URL else 0)
# A web process re-reads an API key it authenticated at most this long ago (revocation delay).
OVERAGE_API_KEY_CACHE_SECONDS = env_int("OVERAGE_API_KEY_CACHE_SECONDS", 5)
OVERAGE_RESERVATION_MAX_TTL_SECONDS = env_int("OVERAGE_RESERVATION_MAX_TTL_SECONDS", 86400)
OVERAGE_MAX_BATCH_EVENTS = 1000
# An API body larger than this is refused with 413 before it is read (a full batch of
# 1 000 events with modest properties is well under 1 MB).
OVERAGE_API_MAX_BODY_BYTES = env_int("OVERAGE_API_MAX_BODY_BYTES", 5 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = max(OVERAGE_API_MAX_BODY_BYTES, 2621440)
# Group commit of single events (billing/services/group_commit.py): concurrent requests of
# a process share one transaction. For threaded web workers (gunicorn --threads).
OVERAGE_GROUP_COMMIT = env_bool("OVERAGE_GROUP_COMMIT", False)
OVERAGE_GROUP_COMMIT_MAX_EVENTS = env_int("OVERAGE_GROUP_COMMIT_MAX_EVENTS", 200)
# Threads of the check server (config/asgi.py) for everything it does not answer on its
# event loop: requests other than plain checks, and checks that need the database.
OVERAGE_CHECK_SERVER_THREADS = env_int("OVERAGE_CHECK_SERVER_THREADS", 16)
OVERAGE_INVOICE_PREFIX = env_str("OVERAGE_INVOICE_PREFIX", "OVG")
OVERAGE_INVOICE_DUE_DAYS = env_int("OVERAGE_INVOICE_DUE_DAYS", 14)
# The beat close fans due periods out to the workers in tasks of this many periods: small
# enough that every worker process gets a share, large enough that queueing costs little.
OVERAGE_CLOSE_CHUNK_PERIODS = env_int("OVERAGE_CLOSE_CHUNK_PERIODS", 200)
# Largest quantity one event may carry; anything larger is almost surely a bug upstream.
OVERAGE_MAX_EVENT_QUANTITY = Decimal(env_str("OVERAGE_MAX_EVENT_QUANTITY", "1000000000"))
# With the quantity bound this keeps one event's credits below 10^15, far inside the
# 18 integer digits of the credit columns.
OVERAGE_MAX_CREDITS_PER_UNIT = Decimal("1000000")
# Runaway guard: a last-hour burn below this many credits never counts as runaway.
OVERAGE_RUNAWAY_MIN_CREDITS = Decimal(env_str("OVERAGE_RUNAWAY_MIN_CREDITS", "100"))
# With a broker: at most one runaway check per customer per interval.
OVERAGE_RUNAWAY_CHECK_INTERVAL_SECONDS = env_int("OVERAGE_RUNAWAY_CHECK_INTERVAL_SECONDS", 60)
# Where alerts for the business go (runaway usage), e.g. ADMINS=ops@example.com,cfo@example.com
ADMINS = [("Billing", address) for address in env_list("ADMINS", [])]
# How far in the past a new subscription may start (each past period is opened with its
# included credits).
OVERAGE_MAX_BACKDATE_DAYS = env_int("OVERAGE_MAX_BACKDATE_DAYS", 400)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # One line per task run is noise when tasks run in-process (embedded mode).
    "loggers": {"celery.app.trace": {"level": env_str("CELERY_TRACE_LOG_LEVEL", "WARNING")}},
}

# Default beat schedule; django-celery-beat copies it into the database, where it can be
# edited in the admin.
CELERY_BEAT_SCHEDULE = {
    "expire-credit-grants": {"task": "billing.tasks.expire_credit_grants_task", "schedule": 300.0},
    "close-due-periods": {"task": "billing.tasks.close_due_periods_task", "schedule": 300.0},
    "bill-progressively": {"task": "billing.tasks.bill_progressively_due_task", "schedule": 300.0},
    "retry-due-webhooks": {"task": "billing.tasks.retry_due_webhooks_task", "schedule": 60.0},
    "requeue-deferred-tasks": {"task": "billing.tasks.requeue_deferred_tasks_task", "schedule": 60.0},
    "recognise-revenue": {"task": "billing.tasks.recognise_revenue_task", "schedule": 900.0},
}
