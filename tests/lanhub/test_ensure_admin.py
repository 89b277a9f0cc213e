"""`make run`'s first admin: the generated password must be copyable as it is printed."""

import io
import os
from unittest import mock

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import TestCase


class EnsureAdminTests(TestCase):
    def run_command(self, password=None):
        out = io.StringIO()
        env = {k: v for k, v in os.environ.items() if k != "LANHUB_ADMIN_PASSWORD"}
        if password:
            env["LANHUB_ADMIN_PASSWORD"] = password
        with mock.patch.dict(os.environ, env, clear=True):
            call_command("ensure_admin", stdout=out, no_color=True)
        return out.getvalue()

    def test_the_generated_password_stands_alone_on_its_own_line(self):
        output = self.run_command()
        lines = output.splitlines()
        password = lines[-1]
        # A copy of that whole line (a triple-click) logs in: no period or words stuck to it.
        self.assertTrue(get_user_model().objects.get(username="admin").check_password(password), output)
        self.assertIn("shown only this once", lines[-2])

    def test_a_password_from_the_environment_is_never_printed(self):
        output = self.run_command("from-env-secret-1")
        self.assertNotIn("from-env-secret-1", output)
        self.assertTrue(get_user_model().objects.get(username="admin").check_password("from-env-secret-1"))

    def test_it_does_nothing_when_a_superuser_exists(self):
        get_user_model().objects.create_superuser("root", "r@example.org", "pw-123456")
        self.assertIn("nothing to do", self.run_command())
        self.assertFalse(get_user_model().objects.filter(username="admin").exists())
