"""Settings for the example project, from the environment (12-factor).

Unset, everything runs embedded: a SQLite file and kombu's file-system broker
under ./var, so the demo needs no server. Set DATABASE_URL (PostgreSQL) and
CELERY_BROKER_URL (Redis) for the guarantees listed in the README.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("RECOVERY_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# --- Production safety (docs/production.md) ---------------------------------------------
# Off unless asked for: `manage.py demo` asks (manage.py), a deployment never has to remember to.
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
_DEMO_SECRET_KEY = "insecure-demo-key-change-me"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or (_DEMO_SECRET_KEY if DEBUG else "")
if not DEBUG and SECRET_KEY in ("", _DEMO_SECRET_KEY):
    # Sessions, password resets and signed values are forged with a known key: refuse to start.
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set (or is the published demo key) and DEBUG is off. Set it "
        "to a long random value, e.g. DJANGO_SECRET_KEY=$(python -c 'import secrets; "
        "print(secrets.token_urlsafe(50))'), the same for the web and worker processes; for "
        "the local demo run `make demo` (DJANGO_DEBUG=1). See docs/production.md.")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
# Outside DEBUG the admin is served over HTTPS only; each can be turned off where a proxy in
# front does the same (docs/production.md).
_HTTPS = not DEBUG
SECURE_SSL_REDIRECT = os.environ.get("DJANGO_SECURE_SSL_REDIRECT", "1" if _HTTPS else "0") == "1"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _HTTPS
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS",
                                         31536000 if _HTTPS else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = os.environ.get("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", "1") == "1"
SECURE_HSTS_PRELOAD = os.environ.get("DJANGO_SECURE_HSTS_PRELOAD", "1") == "1"
# Trust X-Forwarded-Proto only when a proxy that sets it (and strips the client's) is in
# front: otherwise any client could claim HTTPS.
SECURE_PROXY_SSL_HEADER = (("HTTP_X_FORWARDED_PROTO", "https")
                           if os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER") == "1" else None)
# An operator's session ends after a working day (Django's default is two weeks).
SESSION_COOKIE_AGE = int(os.environ.get("DJANGO_SESSION_COOKIE_AGE", 8 * 3600))
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "recovery",
    "dlq_admin",
    "tasks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"

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
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'demo.sqlite3'}",
        conn_max_age=600,
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # WAL lets the web server read while a worker writes; IMMEDIATE transactions take
    # the write lock up front instead of failing mid-transaction under contention.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
else:
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = 5

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
STATIC_URL = "static/"

# --- Celery (namespace CELERY_) --------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem"):
    _broker_dir = VAR_DIR / "broker"
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "control_folder": str(_broker_dir / "control"),
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
    }
    # Messages written atomically (config/filesystem_broker.py): the stock transport lets
    # a polling worker read a message file before it is filled.
    CELERY_BROKER_TRANSPORT = "config.filesystem_broker:Transport"
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_EVENT_SERIALIZER = "json"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- celery-recovery (docs/settings.md) ------------------------------------------------
RECOVERY = {
    "SPOOL_DIR": str(VAR_DIR / "recovery-spool"),
    # The partner API of tasks/partners.py: open after half of at least 4 calls in a minute
    # failed; one trial call a minute later (docs/fallbacks.md).
    "CIRCUITS": {
        "partner-api": {"failure_rate_threshold": 0.5, "minimum_calls": 4, "window_seconds": 60,
                        "open_seconds": 60, "half_open_max_calls": 1},
    },
    # Failure rehearsals (docs/rehearsals.md): on for the local demo (DEBUG), off otherwise
    # unless RECOVERY_REHEARSALS_ENABLED=1 says so (a staging environment).
    "REHEARSALS_ENABLED": DEBUG or os.environ.get("RECOVERY_REHEARSALS_ENABLED") == "1",
}
for _key, _cast in (("VISIBILITY_TIMEOUT_SECONDS", float), ("BROKER_DELAY_MAX_SECONDS", float),
                    ("MAX_DELIVERIES", int), ("SPOOL_DRAIN_INTERVAL_SECONDS", float)):
    if os.environ.get(f"RECOVERY_{_key}"):
        RECOVERY[_key] = _cast(os.environ[f"RECOVERY_{_key}"])
if os.environ.get("RECOVERY_SPOOL_DIR"):
    RECOVERY["SPOOL_DIR"] = os.environ["RECOVERY_SPOOL_DIR"]

# Content-Security-Policy ------------------------------------------------------------------
# django-csp (4.x) puts a policy on every response: scripts and styles only from this
# site's own static files (no inline <script>, event handler or style, so an injected one
# does not run), no plugins, no framing by another page, no foreign <base> or form target.
# Templates keep their JS and CSS in static files (dlq_admin/static/).
from csp.constants import NONE, SELF  # noqa: E402

MIDDLEWARE += ["csp.middleware.CSPMiddleware"]
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"recovery": {"level": os.environ.get("RECOVERY_LOG_LEVEL", "INFO")}},
}
