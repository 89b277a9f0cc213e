from django.apps import AppConfig


class LanhubConfig(AppConfig):
    name = "lanhub"
    verbose_name = "LanHub"

    def ready(self):
        from lanhub import checks  # noqa: F401  (registers the system checks)
