"""/healthz: is the database answering, is Redis answering, is at least one worker consuming?"""

import logging

import redis
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from lanhub.celery import app as celery_app

log = logging.getLogger(__name__)


def check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver error means "down"; details go to the log, not to the public
        log.warning("health: database down: %s", exc)
        return f"down: {exc.__class__.__name__}"
    return "ok"


def check_redis() -> str:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("health: Redis down: %s", exc)
        return f"down: {exc.__class__.__name__}"
    finally:
        client.close()
    return "ok"


def check_worker() -> str:
    try:
        # limit=1: return as soon as one worker answers instead of always waiting out the timeout.
        replies = celery_app.control.ping(timeout=1.0, limit=1)
    except Exception as exc:  # the broker itself may be unreachable
        log.warning("health: worker ping failed: %s", exc)
        return f"down: {exc.__class__.__name__}"
    if not replies:
        return "down: no worker answered within 1 s"
    return "ok"


@never_cache
@require_GET
def healthz(request):
    status = {"database": check_database(), "redis": check_redis()}
    # Asking workers over a dead broker only waits for a time-out; say so instead.
    status["worker"] = check_worker() if status["redis"] == "ok" else "unknown: Redis is down"
    healthy = all(value.startswith("ok") for value in status.values())
    return JsonResponse({"status": "ok" if healthy else "degraded", **status}, status=200 if healthy else 503)
