import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the first superuser when none exists. The password comes from LANHUB_ADMIN_PASSWORD, or is "
        "generated and printed once. Does nothing when a superuser already exists."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--email", default="admin@localhost")

    def handle(self, *args, username, email, **options):
        import os

        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("A superuser exists already; nothing to do.")
            return
        password = os.environ.get("LANHUB_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email=email, password=password)
        if os.environ.get("LANHUB_ADMIN_PASSWORD"):
            self.stdout.write(self.style.SUCCESS(f"Created superuser {username!r} with the password from "
                                                 "LANHUB_ADMIN_PASSWORD."))
            return
        # The password stands alone on its line, so a copy (double-click, triple-click) takes nothing else.
        self.stdout.write(self.style.SUCCESS(f"Created superuser {username!r}. Its password, shown only this once:"))
        self.stdout.write(password)
