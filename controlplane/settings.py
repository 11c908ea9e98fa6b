"""Settings for every process (API, worker, beat), read from the environment with working defaults.

Every variable is listed in the README's configuration table; nothing machine-specific lives here.
"""
from __future__ import annotations

from pathlib import Path

import dj_database_url

from controlplane.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
DEFAULT_EXCEPTION_REPORTER_FILTER = "controlplane.errors.SettingsFilter"
# The default only suits a laptop; production sets SECRET_KEY (it also peppers API-key hashes).
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-secret-key-change-me")
# Earlier SECRET_KEYs (comma-separated) whose signatures still verify while a rotation rolls out: staff
# stay logged in to the admin (docs/OPERATIONS.md, "Rotate SECRET_KEY"). Never API keys (the pepper).
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS", "")
API_KEY_PEPPER = env_str("API_KEY_PEPPER", SECRET_KEY)
# docker/.env.example's values are public: copied unchanged, compose (which checks only that each is set)
# started a deployment whose SECRET_KEY and pepper anyone could read. Refused, as any "change-me" value.
for _name, _value in (("SECRET_KEY", SECRET_KEY), ("API_KEY_PEPPER", API_KEY_PEPPER)):
    if _value.strip().lower().startswith("change-me"):
        raise ValueError(f"environment variable {_name} is a placeholder (it starts with change-me): set a long "
                         "random value of your own (docker/.env.example's are public)")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
# Behind a TLS-terminating proxy (the admin's login needs both): the proxy's X-Forwarded-Proto says
# https, and the public origins are trusted for CSRF (e.g. https://resizer.example.com).
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # The admin's session and CSRF cookies then travel over TLS only.
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "identity",
    "resizer",
    "metering",
]

MIDDLEWARE = [
    "controlplane.metrics.DjangoMetricsBeforeMiddleware",
    "controlplane.middleware.RequestIdMiddleware",
    "controlplane.logs.RequestLogContextMiddleware",
    "controlplane.metrics.ResizeMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The admin's CSS and JavaScript, from the installed apps, with DEBUG off too (nothing else serves
    # /static/); a path lookup for every other request.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",  # no page of ours may be framed (DENY)
    "controlplane.metrics.DjangoMetricsAfterMiddleware",
]

# Database sessions (Django's), which refuse a cookie that cannot be a session key before any lookup.
SESSION_ENGINE = "controlplane.sessions"

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASE_URL = env_str("DATABASE_URL", "postgres://postgres:postgres@127.0.0.1:5432/resizer")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
DATABASES["default"].setdefault("OPTIONS", {})
# A dead database must fail a request in seconds, not hang it: the connect is bounded, and so is a
# query on a connection whose server vanished (data unacknowledged for 10 s, or an idle connection
# whose keepalives go unanswered for 25 s), which otherwise waits for the kernel's ~15 minutes.
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 2))
for _option, _value in (("keepalives", 1), ("keepalives_idle", 10), ("keepalives_interval", 5),
                        ("keepalives_count", 3), ("tcp_user_timeout", 10_000)):
    DATABASES["default"]["OPTIONS"].setdefault(_option, _value)
# A database that answers but does not get on (a table lock held by a migration or by hand, a runaway
# query) must not hold a request either: the longest a statement may run, and the longest it may wait
# for a lock, in seconds (0: no bound). gunicorn.conf.py sets both for the API (15 s, 5 s); workers, beat
# and manage.py keep none: a rollup, a billing run or a migration may rightly take minutes, and the
# metering statements bound themselves (METERING_SHIP_STATEMENT_TIMEOUT_SECONDS). Without them a
# management call or GET /v1/usage waited for as long as a lock was held.
DATABASE_STATEMENT_TIMEOUT_SECONDS = max(0.0, env_float("DATABASE_STATEMENT_TIMEOUT_SECONDS", 0))
DATABASE_LOCK_TIMEOUT_SECONDS = max(0.0, env_float("DATABASE_LOCK_TIMEOUT_SECONDS", 0))
_server_options = " ".join(f"-c {name}={int(seconds * 1000)}" for name, seconds in (
    ("statement_timeout", DATABASE_STATEMENT_TIMEOUT_SECONDS), ("lock_timeout", DATABASE_LOCK_TIMEOUT_SECONDS))
    if seconds > 0)
if _server_options:  # after any `options` DATABASE_URL gives
    DATABASES["default"]["OPTIONS"]["options"] = f"{DATABASES['default']['OPTIONS'].get('options', '')} {_server_options}".strip()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Staff passwords (createsuperuser, the admin's password forms): at least 12 characters, not common,
# not all digits, not like the user's name. The admin's login is reachable through the load balancer;
# none of this applied before (createsuperuser took "password"; found by the security review).
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
STATIC_URL = "static/"
WHITENOISE_USE_FINDERS = True  # served from the apps' static directories: no collectstatic step

# --- the customer API ---------------------------------------------------------------------------
# Bodies over this are refused from Content-Length, before the body is read.
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 25 * 1024 * 1024, minimum=1)
# Declared input pixels (width x height), checked from the image header before decoding.
MAX_INPUT_PIXELS = env_int("MAX_INPUT_PIXELS", 50_000_000, minimum=1)
# The encoded output's bytes (422 output_too_large past it): within the pixel limit a noisy PNG was 117 MB.
MAX_OUTPUT_BYTES = env_int("MAX_OUTPUT_BYTES", 64 * 1024 * 1024, minimum=1)
# How long a synchronous POST /v1/resize waits for its job before answering 202 + Location.
SYNC_WAIT_SECONDS = env_float("SYNC_WAIT_SECONDS", 10.0)
# Results are downloaded right away; they are deleted after this (then GET .../result -> 410).
RESULT_TTL_SECONDS = env_int("RESULT_TTL_SECONDS", 600, minimum=1)
# The job document (status, facts, no image bytes) outlives its result so late readers get 410, not 404.
JOB_RETENTION_SECONDS = env_int("JOB_RETENTION_SECONDS", 86_400, minimum=1)
# Where uploads and results wait between the API and the workers (see docs/adr/0002).
STAGING_URL = env_str("STAGING_URL", f"file://{BASE_DIR / 'var' / 'staging'}")

# Django's own body limits stay below ours only for non-file form fields; files are ours to bound.
DATA_UPLOAD_MAX_MEMORY_SIZE = 1 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = MAX_UPLOAD_BYTES

# A body must keep arriving: a read that waits longer than this is 408 (a slow client must not hold a
# thread), and a whole upload must arrive within UPLOAD_TIMEOUT_SECONDS (25 MB at ~2 Mbit/s).
UPLOAD_IDLE_TIMEOUT_SECONDS = env_float("UPLOAD_IDLE_TIMEOUT_SECONDS", 10.0)
UPLOAD_TIMEOUT_SECONDS = env_float("UPLOAD_TIMEOUT_SECONDS", 120.0)
# After their first CLIENT_RATE_GRACE_SECONDS, a body must arrive and an answer be read at
# CLIENT_MIN_BYTES_PER_SECOND on average, or the request is cut (408 while reading; the connection
# closed while writing): a thread must not be held by a client that trickles or never reads.
CLIENT_MIN_BYTES_PER_SECOND = env_int("CLIENT_MIN_BYTES_PER_SECOND", 16 * 1024, minimum=0)
CLIENT_RATE_GRACE_SECONDS = env_float("CLIENT_RATE_GRACE_SECONDS", 5.0)
# Writing an answer: each write may wait this long for the client to take it, all of them together
# RESPONSE_TIMEOUT_SECONDS (a 25 MB image at ~2 Mbit/s).
RESPONSE_IDLE_TIMEOUT_SECONDS = env_float("RESPONSE_IDLE_TIMEOUT_SECONDS", 10.0)
RESPONSE_TIMEOUT_SECONDS = env_float("RESPONSE_TIMEOUT_SECONDS", 120.0)
# The body of any request but a resize (the management API's JSON, the admin's forms) is read whole,
# bounded in time as above and in size by this, before Django sees it: Django's own reads (a CSRF
# check reading a login form) had no timeout at all.
OTHER_BODY_MAX_BYTES = DATA_UPLOAD_MAX_MEMORY_SIZE + 64 * 1024
OTHER_BODY_TIMEOUT_SECONDS = 30.0
# A refused request's unread body up to this size is read and discarded, so the client reads its
# answer and keeps its connection; a larger one is cut (the connection closes).
REFUSED_BODY_DISCARD_BYTES = env_int("REFUSED_BODY_DISCARD_BYTES", 1024 * 1024, minimum=0)

# --- admission control (controlplane/admission.py, docs/adr/0006-admission-control.md) ------------
# Resizes one API process works on at once; past it 503 `overloaded`. Below the gunicorn threads
# (API_THREADS, 16) so a few threads stay free to refuse quickly and to answer /readyz.
ADMISSION_MAX_IN_FLIGHT = env_int("ADMISSION_MAX_IN_FLIGHT", max(1, env_int("API_THREADS", 16, minimum=1) - 4),
                                  minimum=1)
# No customer holds more than this share of a process's slots (at least one); past it 429 `customer_over_share`.
ADMISSION_CUSTOMER_SHARE = env_float("ADMISSION_CUSTOMER_SHARE", 0.5)
# Of a process's threads, the most one customer's requests (any endpoint) may hold at once, from
# authentication until their answer is written: a customer reading large results slowly (above the
# least rate) could otherwise hold every thread of every node. 429 customer_over_share past it.
CUSTOMER_MAX_THREADS = env_int("CUSTOMER_MAX_THREADS",
                               max(1, int(env_int("API_THREADS", 16, minimum=1) * ADMISSION_CUSTOMER_SHARE)), minimum=1)
# Ready jobs in the resize queue past which new resizes are 503 `queue_full` (0: no check). Size it as
# the workers' drain rate × 0.25 s: a job admitted at the bound still starts within the 0.5 s SLO.
ADMISSION_MAX_QUEUE_DEPTH = env_int("ADMISSION_MAX_QUEUE_DEPTH", 25, minimum=0)
# The in-flight limit that follows the queue wait (ADR 0007): after each interval in which no job this
# process waited on started within the target, it drops by a quarter; after each in which one did, it
# grows by one, up to ADMISSION_MAX_IN_FLIGHT. Past it 503 `queue_full` (target 0: no such limit).
# 0.25 s is half the 0.5 s SLO.
ADMISSION_TARGET_QUEUE_WAIT_SECONDS = env_float("ADMISSION_TARGET_QUEUE_WAIT_SECONDS", 0.25)
ADMISSION_QUEUE_WAIT_INTERVAL_SECONDS = env_float("ADMISSION_QUEUE_WAIT_INTERVAL_SECONDS", 0.5)
# At that limit a request stands in a FIFO line for the next slot given back, up to this long, before
# it is 503 `queue_full` (0: refused at once). In flight and in line together stay within
# ADMISSION_MAX_IN_FLIGHT, so the threads kept free stay free. Part of the SLO's 0.5 s with the queue
# wait's target (0.25 s) and the job itself: at 0.2 s the chaos suite's overload put the admitted
# requests' p99 at 537 ms (ADR 0007).
ADMISSION_LINE_WAIT_SECONDS = env_float("ADMISSION_LINE_WAIT_SECONDS", 0.1)
# How often each API process reads the queue's depth (off the request path); a request at the depth
# bound has the next reading taken at once (at most every 50 ms) and waits for it (ADR 0006).
ADMISSION_QUEUE_PROBE_SECONDS = env_float("ADMISSION_QUEUE_PROBE_SECONDS", 0.5)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["identity.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["identity.authentication.HasScope"],
    "DEFAULT_THROTTLE_CLASSES": ["identity.authentication.CustomerRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "controlplane.parsing.AcceptIsAnInput",
    "EXCEPTION_HANDLER": "controlplane.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
    # `format` is our output-format parameter, not DRF's renderer override.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Resizer API",
    "DESCRIPTION": "Resize images over HTTP. Authenticate with `Authorization: Bearer <key>`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # /v1/docs loads Swagger UI from this server's static files, the version pinned in requirements.txt.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- identity: the data plane's snapshot of the management plane (docs/adr/0003) ---------------
# How often each API process follows the change feed: the propagation bound is about this plus
# one query (published bound: 5 s).
AUTH_POLL_SECONDS = env_float("AUTH_POLL_SECONDS", 1.0)
# Changes this recent are re-read every poll: feed ids can commit out of order.
AUTH_FEED_LOOKBACK_SECONDS = env_int("AUTH_FEED_LOOKBACK_SECONDS", 30, minimum=1)
AUTH_RESYNC_SECONDS = env_float("AUTH_RESYNC_SECONDS", 300.0)
# With Postgres away, a snapshot this old is still trusted; past it the node answers 503.
AUTH_MAX_STALENESS_SECONDS = env_float("AUTH_MAX_STALENESS_SECONDS", 900.0)
AUTH_FIRST_SYNC_WAIT_SECONDS = env_float("AUTH_FIRST_SYNC_WAIT_SECONDS", 5.0)
# An API process not heard from for this long no longer holds a share of the rate limits.
AUTH_PROCESS_EXPIRY_SECONDS = env_int("AUTH_PROCESS_EXPIRY_SECONDS", 15, minimum=1)
# A customer whose keys were used this recently is not deleted (409 customer_recently_active): usage of
# its last jobs may still be in a spool or a queue, and usage of a deleted customer is never billed.
CUSTOMER_DELETE_QUIET_SECONDS = env_int("CUSTOMER_DELETE_QUIET_SECONDS", 3600, minimum=0)
AUTH_SNAPSHOT_PATH = env_str("AUTH_SNAPSHOT_PATH", str(BASE_DIR / "var" / "identity-snapshot.json"))
AUTH_SYNC_IN_BACKGROUND = True  # tests drive the sync themselves
# Limits of customers without a plan.
DEFAULT_PLAN_RATE_PER_SECOND = env_float("DEFAULT_PLAN_RATE_PER_SECOND", 50.0)
DEFAULT_PLAN_BURST = env_int("DEFAULT_PLAN_BURST", 100, minimum=1)
DEFAULT_PLAN_MONTHLY_QUOTA = env_int("DEFAULT_PLAN_MONTHLY_QUOTA", 0, minimum=0) or None  # 0 = unlimited

# --- metering and billing (docs/adr/0004) ---------------------------------------------------------
# Usage records are fsynced here before a job is announced, then shipped to Postgres in batches.
METERING_SPOOL_DIR = env_str("METERING_SPOOL_DIR", str(BASE_DIR / "var" / "spool" / "usage"))
# The staging table's database; empty = the default database above.
METERING_DATABASE_URL = env_str("METERING_DATABASE_URL", "")
# A process ships its spool on this period, or sooner when this many records are waiting.
METERING_FLUSH_SECONDS = env_float("METERING_FLUSH_SECONDS", 1.0)
METERING_BATCH_RECORDS = env_int("METERING_BATCH_RECORDS", 1000, minimum=1)
# A shipper thread in every process that emits records (off: ship with `manage.py metering_run ship`).
METERING_SHIPPER = env_bool("METERING_SHIPPER", True)
# The rollup re-reads records received this long before its watermark (commits land out of order).
METERING_LOOKBACK_SECONDS = env_int("METERING_LOOKBACK_SECONDS", 300, minimum=0)
# A shipment's transaction: each statement (its COPY, its INSERT) runs at most this long, and the
# transaction may sit idle (after its INSERT, before its COMMIT: a paused container, a partition) at
# most this long before Postgres aborts it; its segments stay and ship again. A shipped row's
# received_at (its INSERT's clock) becomes visible at most their sum later, so the look-back must be longer.
METERING_SHIP_STATEMENT_TIMEOUT_SECONDS = env_int("METERING_SHIP_STATEMENT_TIMEOUT_SECONDS", 60, minimum=1)
METERING_SHIP_IDLE_TIMEOUT_SECONDS = env_int("METERING_SHIP_IDLE_TIMEOUT_SECONDS", 60, minimum=1)
if METERING_LOOKBACK_SECONDS <= METERING_SHIP_STATEMENT_TIMEOUT_SECONDS + METERING_SHIP_IDLE_TIMEOUT_SECONDS:
    raise ValueError(
        f"METERING_LOOKBACK_SECONDS={METERING_LOOKBACK_SECONDS} must exceed METERING_SHIP_STATEMENT_TIMEOUT_SECONDS"
        f" + METERING_SHIP_IDLE_TIMEOUT_SECONDS ({METERING_SHIP_STATEMENT_TIMEOUT_SECONDS}"
        f" + {METERING_SHIP_IDLE_TIMEOUT_SECONDS}): a shipment committing that late would never be rolled up")
# How long a rollup or billing run waits for the one running before it, then skips (the next run
# catches up): each waiting run holds a worker process that resizes need.
METERING_LOCK_WAIT_SECONDS = env_float("METERING_LOCK_WAIT_SECONDS", 30.0)
# Raw records older than this are archived and leave the staging table; the rollup ignores records
# whose event is older than this minus a day, so it never recomputes a window that was archived.
METERING_ARCHIVE_AFTER_DAYS = env_int("METERING_ARCHIVE_AFTER_DAYS", 62, minimum=2)
METERING_ARCHIVE_URL = env_str("METERING_ARCHIVE_URL", f"file://{BASE_DIR / 'var' / 'archive'}")
# A billing period stays in grace (late usage still lands on its invoice) this long after it ends.
BILLING_GRACE_DAYS = env_int("BILLING_GRACE_DAYS", 3, minimum=0)
# The rollup ignores events older than the archive age minus a day: a period's first day must still be
# rolled up when the period finalizes, up to 31 + BILLING_GRACE_DAYS days later.
if METERING_ARCHIVE_AFTER_DAYS <= 31 + BILLING_GRACE_DAYS + 1:
    raise ValueError(
        f"METERING_ARCHIVE_AFTER_DAYS={METERING_ARCHIVE_AFTER_DAYS} must exceed 31 + BILLING_GRACE_DAYS + 1"
        f" ({31 + BILLING_GRACE_DAYS + 1}): usage of a month must still be rolled up when its invoice is finalized")

# The broker, queue, publish and attempt settings live in celeryconfig.py (one place for the queue).

# --- observability (docs/adr/0005-observability.md, docs/OPERATIONS.md) ----------------------------
# Each Celery worker's main process serves its pool's metrics here (host:port; empty or port 0: off).
WORKER_METRICS_BIND = env_str("WORKER_METRICS_BIND", "127.0.0.1:9808")
# json: one JSON object a line with the request id (and job id) of the work being done; plain: for people.
LOG_FORMAT = env_str("LOG_FORMAT", "json")
if LOG_FORMAT not in ("json", "plain"):
    raise ValueError(f"environment variable LOG_FORMAT={LOG_FORMAT!r} is not json or plain")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "controlplane.logs.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "controlplane.logs.json_formatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
