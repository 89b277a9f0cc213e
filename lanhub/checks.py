"""System checks that stop a production start with development secrets.

The same rule runs twice: as a Django system check (`manage.py check`, runserver, migrate), and at the start of
every long-running process (gunicorn through lanhub/wsgi.py, the Celery worker and beat through lanhub/celery.py),
because gunicorn and Celery never run Django's checks. A portal that started with the published development
LANHUB_KEY would decrypt every player's private key for anyone who read the source.
"""

import sys

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.checks import Error, Tags, register

# Secrets shorter than this are guesses waiting to happen; token_urlsafe(48) gives 64 characters.
MIN_SECRET_LENGTH = 32
# Values that only ever appear in examples (.env.example) are as public as the development defaults.
PLACEHOLDER_PREFIXES = ("change-me", "changeme")

HINTS = {
    "SECRET_KEY": "Set SECRET_KEY to a long random string.",
    "LANHUB_KEY": "Set LANHUB_KEY: it encrypts every private key at rest; keep it safe, losing it loses the PKI.",
}


def secret_problems(*, debug: bool | None = None) -> list[tuple[str, str]]:
    """(variable, what is wrong) for every secret that must not reach production; empty while DEBUG is on."""
    if settings.DEBUG if debug is None else debug:
        return []
    problems = []
    for name, dev_value in (("SECRET_KEY", settings.DEV_SECRET_KEY), ("LANHUB_KEY", settings.DEV_LANHUB_KEY)):
        try:
            value = getattr(settings, name, "") or ""
        except ImproperlyConfigured:  # Django refuses to hand out an empty SECRET_KEY at all
            value = ""
        if not value:
            problems.append((name, f"{name} is missing while DEBUG is off."))
        elif value == dev_value or value.lower().startswith(PLACEHOLDER_PREFIXES):
            problems.append((name, f"{name} is still the published development or example value while DEBUG is off."))
        elif len(value) < MIN_SECRET_LENGTH:
            problems.append((name, f"{name} is shorter than {MIN_SECRET_LENGTH} characters while DEBUG is off."))
    return problems


@register(Tags.security, deploy=False)
def production_secrets(app_configs, **kwargs):
    return [Error(message, hint=HINTS[name], id=f"lanhub.E00{1 if name == 'SECRET_KEY' else 2}")
            for name, message in secret_problems()]


def refuse_unsafe_start(process: str) -> None:
    """Stop a web, worker or beat process before it serves anything when the secrets are unsafe."""
    problems = secret_problems(debug=getattr(settings, "DEBUG_FROM_ENVIRONMENT", settings.DEBUG))
    if not problems:
        return
    lines = [f"LanHub {process} refuses to start:"]
    lines += [f"  - {message} {HINTS[name]}" for name, message in problems]
    lines.append('  Generate one with: python -c "import secrets; print(secrets.token_urlsafe(48))"')
    print("\n".join(lines), file=sys.stderr, flush=True)
    # An exception, not SystemExit: gunicorn respawns a worker that exits, but halts the master when one fails to
    # boot; Celery stops the worker or beat on an exception from its init signal.
    raise ImproperlyConfigured(f"LanHub {process} refuses to start: " + " ".join(m for _, m in problems))
