import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lanhub.settings")

# gunicorn never runs Django's system checks: refuse here, before the first request, with development secrets.
from lanhub.checks import refuse_unsafe_start  # noqa: E402

refuse_unsafe_start("web")
application = get_wsgi_application()
