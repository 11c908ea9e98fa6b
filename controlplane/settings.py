"""Settings for every process (API, worker, beat), read from the environment with working defaults.

Every variable is listed in the README's configuration table; nothing machine-specific lives here.
"""
from __future__ import annotations

from pathlib import Path

import dj_database_url

from controlplane.env import env_bool, env_float, env_int, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
# The default only suits a laptop; production sets SECRET_KEY (it also peppers API-key hashes).
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-secret-key-change-me")
API_KEY_PEPPER = env_str("API_KEY_PEPPER", SECRET_KEY)
ALLOWED_HOSTS = env_str("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_prometheus",
    "identity",
    "resizer",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "controlplane.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

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
# A dead database must fail a request in seconds, not hang it.
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 2))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"

# --- the customer API ---------------------------------------------------------------------------
# Bodies over this are refused from Content-Length, before the body is read.
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 25 * 1024 * 1024, minimum=1)
# Declared input pixels (width x height), checked from the image header before decoding.
MAX_INPUT_PIXELS = env_int("MAX_INPUT_PIXELS", 50_000_000, minimum=1)
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

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["identity.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [],
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
}

# The broker, queue, publish and attempt settings live in celeryconfig.py (one place for the queue).

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
