"""Django settings, all read from the environment in this one place.

With nothing set, everything lives under ``R1_HOME`` (default ``./var``): SQLite, uploaded files,
a broker that needs no server (kombu's filesystem transport), and MLflow's SQLite store. Setting
``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``MLFLOW_TRACKING_URI`` moves each to a real service.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from r1platform.env import env_bool, env_int, env_list, env_path, env_str
from r1platform.queues import Queue, TaskName

BASE_DIR = Path(__file__).resolve().parent.parent
R1_HOME = env_path("R1_HOME", BASE_DIR / "var")

DEBUG = env_bool("R1_DEBUG", False)
SECRET_KEY = env_str("R1_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG and env_bool("R1_PRODUCTION", False):
        raise ImproperlyConfigured("R1_SECRET_KEY must be set in production")
    # The embedded default keeps one random key per R1_HOME, so sessions survive restarts.
    _key_file = R1_HOME / "secret_key"
    if not _key_file.exists():
        import secrets

        _key_file.parent.mkdir(parents=True, exist_ok=True)
        _key_file.write_text(secrets.token_urlsafe(50))
    SECRET_KEY = _key_file.read_text().strip()

ALLOWED_HOSTS = env_list("R1_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("R1_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    # Listed so the API docs page serves Swagger UI from ninja's own static files, not a CDN.
    "ninja",
    "django_celery_beat",
    "r1platform.core",
    "r1platform.accounts",
    "r1platform.registry",
    "r1platform.jobs",
    "r1platform.datasets",
    "r1platform.workers",
    "r1platform.certification",
    "r1platform.deployments",
    "r1platform.serving",
    "r1platform.schedules",
    "r1platform.notifications",
    "r1platform.monitoring",
]

MIDDLEWARE = [
    "r1platform.core.middleware.BodyLimitMiddleware",  # first: bodies over the limit stay unread
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "r1platform.urls"
WSGI_APPLICATION = "r1platform.wsgi.application"

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
                "r1platform.core.context_processors.platform",
            ],
        },
    },
]

# Database: SQLite under R1_HOME unless DATABASE_URL names a server.
_default_db = f"sqlite:///{R1_HOME / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=0)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the dashboard read while a worker writes; IMMEDIATE takes the write lock at the
    # start of a transaction instead of failing with "database is locked" half-way through.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "registry:model_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env_path("R1_STATIC_ROOT", R1_HOME / "static")
MEDIA_ROOT = env_path("R1_MEDIA_ROOT", R1_HOME / "media")
# Whitenoise serves files straight from the apps' folders when collectstatic has not run.
WHITENOISE_USE_FINDERS = True

# Uploads stream to a temporary file in chunks (never whole into memory): see core/storage.py.
R1_MAX_UPLOAD_BYTES = env_int("R1_MAX_UPLOAD_BYTES", 2 * 1024**3, minimum=1)
# What an uploaded archive (TorchScript zip, ONNX with its external data) may unpack to.
R1_MAX_UNPACKED_BYTES = env_int("R1_MAX_UNPACKED_BYTES", 2 * R1_MAX_UPLOAD_BYTES, minimum=1)
FILE_UPLOAD_HANDLERS = ["r1platform.core.storage.HashingUploadHandler"]
FILE_UPLOAD_TEMP_DIR = None  # set at start by core.apps so it lives on the storage volume
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2

# Where a job's pipeline writes its intermediate files (one folder per job, resumable).
R1_WORK_DIR = env_path("R1_WORK_DIR", R1_HOME / "work")

# --- Celery: broker without a server unless CELERY_BROKER_URL is set. ---
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
# A job's message that the broker does not take within this many seconds is left in the outbox
# (Job.sent_at empty): the launch answers 503 and the sweep sends it once the broker is back.
R1_BROKER_TIMEOUT_SECONDS = env_int("R1_BROKER_TIMEOUT_SECONDS", 5, minimum=1)
# How often beat sweeps the outbox (jobs queued but never taken by the broker).
R1_OUTBOX_SWEEP_SECONDS = env_int("R1_OUTBOX_SWEEP_SECONDS", 15, minimum=1)
_broker_dir = R1_HOME / "broker"
CELERY_TASK_SOFT_TIME_LIMIT = env_int("R1_JOB_SOFT_TIME_LIMIT", 6 * 3600, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("R1_JOB_TIME_LIMIT", CELERY_TASK_SOFT_TIME_LIMIT + 300, minimum=1)
if CELERY_TASK_TIME_LIMIT <= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured("R1_JOB_TIME_LIMIT must be above R1_JOB_SOFT_TIME_LIMIT")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _folder in ("queue", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # The exchange-to-queue bindings; kombu's default is ./control in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.2,
    }
else:
    # Redis re-delivers a message not acknowledged within visibility_timeout: keep it above the
    # longest hard limit, or a long job would be run twice at once.
    # A Redis that hangs (paused, half-open connection) fails a send or a command after
    # R1_BROKER_TIMEOUT_SECONDS instead of blocking a web request for ever (kombu's default).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": CELERY_TASK_TIME_LIMIT + 600,
        "socket_timeout": R1_BROKER_TIMEOUT_SECONDS,
        "socket_connect_timeout": R1_BROKER_TIMEOUT_SECONDS,
    }
# Each job goes to the queue its stages need (r1platform.queues.queue_for); this is the fallback.
CELERY_TASK_DEFAULT_QUEUE = Queue.CPU.value
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ALWAYS_EAGER = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# A running job writes a heartbeat this often; one silent for R1_HEARTBEAT_STALE is presumed dead.
R1_HEARTBEAT_SECONDS = env_int("R1_HEARTBEAT_SECONDS", 5, minimum=1)
R1_HEARTBEAT_STALE = env_int("R1_HEARTBEAT_STALE", 60, minimum=2)
# A job whose worker died this many times while running it is failed, not tried again (poison).
R1_MAX_JOB_ATTEMPTS = env_int("R1_MAX_JOB_ATTEMPTS", 3, minimum=1)
# A worker retries a job's must-land writes (its end, a stage's result) across a database outage
# (a restart, a fail-over) for this long before giving up on them.
R1_DB_RETRY_SECONDS = env_int("R1_DB_RETRY_SECONDS", 60, minimum=0)
# Each worker reports itself (host, queues, hardware profiles) when it starts and beats this
# often; one silent for R1_WORKER_LOST_SECONDS is shown as lost and its profiles as unserved.
R1_WORKER_BEAT_SECONDS = env_int("R1_WORKER_BEAT_SECONDS", 10, minimum=1)
R1_WORKER_LOST_SECONDS = env_int("R1_WORKER_LOST_SECONDS", 60, minimum=2)
# A serving process writes each model's traffic, errors and latency (a ServingWindow row) this
# often, for the model page's charts.
R1_SERVING_STATS_SECONDS = env_int("R1_SERVING_STATS_SECONDS", 60, minimum=1)
# Tokens of KV cache a served language model holds at most (all its requests in flight
# together); requests beyond it wait for room. 65,536 tokens of Gemma 3 270M are about 2.3 GB.
R1_LLM_KV_CACHE_TOKENS = env_int("R1_LLM_KV_CACHE_TOKENS", 65536, minimum=1024)
# The beat process runs the reaper: the stale running jobs of lost workers are re-queued. A tick
# not taken within a minute is dropped (the next one does the same work).
CELERY_BEAT_SCHEDULE = {
    "reap-lost-workers": {
        "task": TaskName.REAP.value,
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # Jobs whose message the broker did not take (it was down) are sent again.
    "send-unsent-jobs": {
        "task": TaskName.SEND_UNSENT_JOBS.value,
        "schedule": float(R1_OUTBOX_SWEEP_SECONDS),
        "options": {"expires": R1_OUTBOX_SWEEP_SECONDS},
    },
    # Versions whose MLflow mirror is pending (MLflow was down) are mirrored again.
    "mirror-versions-to-mlflow": {
        "task": TaskName.MIRROR_VERSIONS.value,
        "schedule": float(env_int("R1_MLFLOW_MIRROR_SECONDS", 60, minimum=5)),
        "options": {"expires": 55},
    },
}
# Schedules are PeriodicTask rows (django-celery-beat), edited from the dashboard and the API.
# The scheduler sends only while it holds the beat lease, so a second beat started by mistake
# enqueues nothing (r1platform/schedules/beat.py).
CELERY_BEAT_SCHEDULER = "r1platform.schedules.beat:LeaderScheduler"
# Cron expressions of schedules are read in this zone.
DJANGO_CELERY_BEAT_TZ_AWARE = True
CELERY_TIMEZONE = "UTC"
R1_BEAT_LEASE_SECONDS = env_int("R1_BEAT_LEASE_SECONDS", 30, minimum=2)

# --- Notifications: team webhooks (JSON POST, retried with backoff) and email. ---
EMAIL_BACKEND = env_str("R1_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("R1_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("R1_EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("R1_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = env_str("R1_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = env_bool("R1_EMAIL_TLS", False)
DEFAULT_FROM_EMAIL = env_str("R1_EMAIL_FROM", "r1platform@localhost")
R1_WEBHOOK_TIMEOUT_SECONDS = env_int("R1_WEBHOOK_TIMEOUT_SECONDS", 5, minimum=1)
R1_WEBHOOK_MAX_RETRIES = env_int("R1_WEBHOOK_MAX_RETRIES", 6, minimum=0)
# Retry n waits up to BACKOFF × 2^n seconds (full jitter, at most 10 minutes): with the defaults
# a receiver has up to about ten minutes (10 + 20 + ... + 320 s) to come back.
R1_WEBHOOK_BACKOFF_SECONDS = env_int("R1_WEBHOOK_BACKOFF_SECONDS", 10, minimum=1)
# Webhooks reach public addresses only; these networks (comma-separated CIDRs, e.g.
# "10.20.0.0/16,fd12::/64") are allowed too, for a receiver inside the platform's network.
R1_WEBHOOK_ALLOW_NETWORKS = env_list("R1_WEBHOOK_ALLOW_NETWORKS", [])
# Links in notifications point here.
R1_PUBLIC_URL = env_str("R1_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

# --- Metrics: /metrics on the web process. Under gunicorn and Celery's prefork each process
# writes its samples to PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) and the
# web process adds them up; without it, one process's registry is exposed. A bearer token, when
# set, is required to read it.
R1_METRICS_TOKEN = env_str("R1_METRICS_TOKEN", "")

# --- MLflow ---
_mlflow_db = f"sqlite:///{R1_HOME / 'mlflow' / 'mlflow.db'}"
MLFLOW_TRACKING_URI = env_str("MLFLOW_TRACKING_URI", _mlflow_db)
MLFLOW_ARTIFACT_ROOT = env_path("MLFLOW_ARTIFACT_ROOT", R1_HOME / "mlflow" / "artifacts")
# Where people open MLflow's UI; `manage.py up` serves it here for the embedded store.
MLFLOW_UI_URL = env_str(
    "MLFLOW_UI_URL",
    MLFLOW_TRACKING_URI if MLFLOW_TRACKING_URI.startswith("http") else "http://127.0.0.1:5000",
).rstrip("/")
# MLflow is best effort: each HTTP call gives up after this many seconds with no retry, and a
# process that found it unreachable skips it for R1_MLFLOW_RETRY_SECONDS (beat's mirror task
# catches up later). (MLflow's own MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES win when set.)
R1_MLFLOW_TIMEOUT_SECONDS = env_int("R1_MLFLOW_TIMEOUT_SECONDS", 5, minimum=1)
R1_MLFLOW_RETRY_SECONDS = env_int("R1_MLFLOW_RETRY_SECONDS", 30, minimum=0)
# A version MLflow refused (not merely unreachable) this many times is marked failed.
R1_MLFLOW_MIRROR_ATTEMPTS = env_int("R1_MLFLOW_MIRROR_ATTEMPTS", 5, minimum=1)
# Where the dashboard's MLflow links go: "ui" = MLflow's own UI at MLFLOW_UI_URL (a laptop);
# "proxy" = the platform's /mlflow/ pages, which show a team only its own runs, models and
# artifacts (MLflow itself has no login: keep it on an internal network).
R1_MLFLOW_LINKS = env_str("R1_MLFLOW_LINKS", "ui")
if R1_MLFLOW_LINKS not in ("ui", "proxy"):
    raise ImproperlyConfigured("R1_MLFLOW_LINKS must be 'ui' or 'proxy'")
# The largest artifact /mlflow/ hands out (bytes).
R1_MLFLOW_PROXY_MAX_BYTES = env_int("R1_MLFLOW_PROXY_MAX_BYTES", 2 * 1024**3, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("R1_LOG_LEVEL", "INFO")},
    "loggers": {"alembic": {"level": "WARNING"}, "mlflow": {"level": "WARNING"}},
}

if env_bool("R1_PRODUCTION", False):
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("R1_SSL_REDIRECT", True)
    # Prometheus scrapes /metrics over the internal network in plain HTTP.
    SECURE_REDIRECT_EXEMPT = [r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("R1_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
