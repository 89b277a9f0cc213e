"""LanHub settings: one file, read from the environment through django-environ.

Every value has a default that works on a fresh checkout (SQLite under var/, Redis on localhost), so
`make run` needs no configuration. Production sets DEBUG=False, and the `lanhub` system check then refuses
to start while SECRET_KEY or LANHUB_KEY is missing or still the development value (lanhub/checks.py).
A malformed value stops start-up with ImproperlyConfigured naming the variable.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

# Development values: usable locally, rejected by the system check when DEBUG is off.
DEV_SECRET_KEY = "lanhub-dev-secret-key-do-not-use-in-production"
DEV_LANHUB_KEY = "lanhub-dev-key-encryption-key-do-not-use-in-production"

env = environ.Env()
env_file = BASE_DIR / ".env"
if env_file.exists():
    environ.Env.read_env(env_file)


def _typed(name, cast, default):
    """Read one variable, turning a malformed value into a message that names it."""
    try:
        return cast(name, default=default)
    except (ValueError, TypeError, environ.ImproperlyConfigured) as exc:
        raise ImproperlyConfigured(f"{name} is malformed: {exc}") from None


def _strict_bool(name, default):
    # environ's bool() reads anything unknown as False; a typo in DEBUG must not silently flip production on.
    raw = env.str(name, default="").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} is malformed: {raw!r} is not one of true/false/yes/no/on/off/1/0")


DEBUG = _strict_bool("DEBUG", True)
# DEBUG as the environment set it. Test runners switch DEBUG itself off while tests run (pytest-django does), and
# the start-up refusal (lanhub/checks.py) must follow what the process was started with, not that switch.
DEBUG_FROM_ENVIRONMENT = DEBUG
SECRET_KEY = env.str("SECRET_KEY", default=DEV_SECRET_KEY)
LANHUB_KEY = env.str("LANHUB_KEY", default=DEV_LANHUB_KEY)
ALLOWED_HOSTS = _typed("ALLOWED_HOSTS", env.list, ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = _typed("CSRF_TRUSTED_ORIGINS", env.list, [])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")


def _database():
    url = env.str("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'lanhub.sqlite3'}")
    scheme = url.split(":", 1)[0]
    if "://" not in url or scheme not in environ.Env.DB_SCHEMES:
        raise ImproperlyConfigured(
            f"DATABASE_URL is malformed ({url!r}): expected e.g. postgres://user:password@host:5432/name "
            f"or sqlite:////absolute/path.sqlite3")
    try:
        config = environ.Env.db_url_config(url)
    except (ValueError, KeyError, environ.ImproperlyConfigured) as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is malformed ({url!r}): {exc}") from None
    if not config.get("ENGINE"):
        raise ImproperlyConfigured(f"DATABASE_URL has an unknown scheme: {url!r}")
    if config["ENGINE"].endswith("sqlite3"):
        # SQLite serialises writers; a timeout keeps the worker and the web from failing on a busy file. Tests
        # get a file too: the default in-memory test database uses a shared cache, whose table locks fail at
        # once instead of waiting, and the real-worker tests write from several threads.
        # IMMEDIATE: a transaction takes the write lock when it begins, so a writer waits (up to the timeout)
        # instead of failing at once with "database is locked" when it upgrades from reading.
        # WAL: readers never wait for the writer, and a commit is one fsync of the log instead of the rollback
        # journal's several (synchronous stays FULL, so a commit is as durable as before).
        config.setdefault("OPTIONS", {}).update(timeout=20, transaction_mode="IMMEDIATE",
                                                init_command="PRAGMA journal_mode=WAL;")
        config["TEST"] = {"NAME": str(VAR_DIR / "test-lanhub.sqlite3")}
    config["CONN_MAX_AGE"] = _typed("CONN_MAX_AGE", env.int, 60)
    config["CONN_HEALTH_CHECKS"] = True
    return config


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(f"REDIS_URL is malformed: {REDIS_URL!r} (expected redis://host:port/db)")

# The cache holds rate-limit counters; Redis is already required for Celery, so it serves here too.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env.str("CACHE_PREFIX", default="lanhub"),
    }
}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "lanhub.apps.LanhubConfig",
    "nodes.apps.NodesConfig",
    "players.apps.PlayersConfig",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Profile downloads answered here, before the session and sign-in middleware they do not use.
    "players.middleware.ProfileDownloadMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "lanhub.middleware.ContentSecurityPolicyMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into its lockout page.
    "axes.middleware.AxesMiddleware",
]

# Sign-in throttling (django-axes) for the host login and the admin login, which share the auth backend: after
# AXES_FAILURE_LIMIT wrong passwords for one user name from one address, that pair is locked out for
# AXES_COOLOFF_MINUTES, the right password included. Locking by user name alone would let anyone lock a host out;
# by address alone, a host behind carrier-grade NAT with others. Counters live in the cache (Redis).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_FAILURE_LIMIT = _typed("AXES_FAILURE_LIMIT", env.int, 5)
AXES_COOLOFF_TIME = _typed("AXES_COOLOFF_MINUTES", env.int, 15) / 60  # hours, as django-axes reads a number
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "lanhub.clientip.axes_client_ip"
AXES_VERBOSE = False
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

ROOT_URLCONF = "lanhub.urls"
WSGI_APPLICATION = "lanhub.wsgi.application"

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

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "nodes:lan_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "static")))  # collectstatic writes here
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # var/ also holds the SQLite file; whitenoise wants the folder
# In development whitenoise serves straight from static/ so no collectstatic is needed between edits.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# Addresses (or networks) of the reverse proxies in front of the portal. Only a request from one of them may name
# the client in X-Forwarded-For; anyone else could send that header to dodge the join limit and login throttling.
TRUSTED_PROXIES = _typed("TRUSTED_PROXIES", env.list, [])

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if not DEBUG else None
# HTTPS enforcement, named after the Django settings they set. They are off by default so a fresh checkout works
# over plain HTTP; `check --deploy` stays clean once a TLS deployment sets them (README, "Deploying for real").
SECURE_HSTS_SECONDS = _typed("SECURE_HSTS_SECONDS", env.int, 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _strict_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _strict_bool("SECURE_HSTS_PRELOAD", False)
SECURE_SSL_REDIRECT = _strict_bool("SECURE_SSL_REDIRECT", False)
# The proxy probes /healthz over plain HTTP; it must not be redirected.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
REFERRER_POLICY = "same-origin"

# Celery: Redis is both broker and result store. Tasks are acknowledged after they run, so a worker that dies
# mid-sync gets its task redelivered; the node claim in nodes/services.py makes a duplicate harmless.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = _typed("CELERY_TASK_SOFT_TIME_LIMIT", env.int, 600)
CELERY_TASK_TIME_LIMIT = _typed("CELERY_TASK_TIME_LIMIT", env.int, 660)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default="lanhub")

# How often the periodic tasks run (seconds). Drift repairs files and restarts dead instances; status reads
# every node's management interface; the CRL is renewed well before OpenVPN would reject an expired one.
LANHUB_DRIFT_INTERVAL = _typed("LANHUB_DRIFT_INTERVAL", env.int, 300)
# The session watcher (manage.py watch_sessions) pushes who is online; the poll is the slow safety net and reads
# link RTTs.
LANHUB_STATUS_INTERVAL = _typed("LANHUB_STATUS_INTERVAL", env.int, 60)
# A node the watcher holds (its connection shows it alive, its players are pushed) is polled only this often.
LANHUB_HELD_POLL_INTERVAL = _typed("LANHUB_HELD_POLL_INTERVAL", env.int, 1800)
LANHUB_WATCHER_PROCESSES = _typed("LANHUB_WATCHER_PROCESSES", env.int, 2)
LANHUB_CRL_RENEW_INTERVAL = _typed("LANHUB_CRL_RENEW_INTERVAL", env.int, 6 * 3600)
# A node that misses this many status polls in a row is marked down and the LAN is re-planned. A miss is looked at
# again after LANHUB_RECHECK_AFTER seconds rather than at the next round, so a node that died is failed over within
# about (polls - 1) x (recheck + SSH timeout) of its first miss, and a blip shorter than that fails nothing over.
LANHUB_DOWN_AFTER_POLLS = _typed("LANHUB_DOWN_AFTER_POLLS", env.int, 3)
LANHUB_RECHECK_AFTER = _typed("LANHUB_RECHECK_AFTER", env.int, 5)
LANHUB_SSH_TIMEOUT = _typed("LANHUB_SSH_TIMEOUT", env.int, 10)
# Nodes on the portal's own machine (loopback, its own addresses) or link-local addresses are refused as SSH
# targets, so the worker cannot be aimed at local services; the lab and the test suite (nodes here) allow them.
LANHUB_SSH_ALLOW_LOCAL_TARGETS = _strict_bool("LANHUB_SSH_ALLOW_LOCAL_TARGETS", False)
LANHUB_JOIN_RATE = _typed("LANHUB_JOIN_RATE", env.int, 20)  # joins per client address per hour
# "I lost my device" re-signs the CRL and syncs every node: a few per player per hour are plenty.
LANHUB_LOST_DEVICE_RATE = _typed("LANHUB_LOST_DEVICE_RATE", env.int, 3)
# Open lobbies each hold a web thread (a server-sent-events stream, players/lobby.py): at most this many per web
# process, the rest of its threads stay free for pages (Procfile: 128 threads a worker). Past it, lobbies poll.
LANHUB_LOBBY_STREAMS = _typed("LANHUB_LOBBY_STREAMS", env.int, 120)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    # Player and invite tokens are credentials: the filter masks them in every record (404 warnings name the path).
    "filters": {"mask_tokens": {"()": "lanhub.logmask.MaskTokensFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["mask_tokens"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"paramiko": {"level": "WARNING"}},
}
