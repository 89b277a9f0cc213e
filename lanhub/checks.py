"""System checks that stop a production start with development secrets."""

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=False)
def production_secrets(app_configs, **kwargs):
    if settings.DEBUG:
        return []
    errors = []
    for name, dev_value, hint in (
        ("SECRET_KEY", settings.DEV_SECRET_KEY, "Set SECRET_KEY to a long random string."),
        (
            "LANHUB_KEY",
            settings.DEV_LANHUB_KEY,
            "Set LANHUB_KEY: it encrypts every private key at rest; keep it safe, losing it loses the PKI.",
        ),
    ):
        value = getattr(settings, name, "")
        if not value or value == dev_value:
            errors.append(
                Error(f"{name} is missing or still the development value while DEBUG is off.", hint=hint,
                      id=f"lanhub.E00{1 if name == 'SECRET_KEY' else 2}")
            )
    return errors
