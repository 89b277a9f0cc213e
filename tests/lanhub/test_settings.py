"""Settings come from the environment and fail loudly, naming the variable, when a value is wrong."""

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.test import SimpleTestCase, override_settings

from lanhub.checks import production_secrets

ROOT = Path(__file__).resolve().parents[2]


def run_manage(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DEBUG", "SECRET_KEY", "LANHUB_KEY")}
    full_env.update(env)
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


class SettingsTests(SimpleTestCase):
    def test_it_names_database_url_when_it_is_malformed(self):
        result = run_manage("check", DATABASE_URL="nosuchdb://what")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("DATABASE_URL", result.stderr)
        self.assertIn("ImproperlyConfigured", result.stderr)

    def test_it_names_debug_when_it_is_not_a_boolean(self):
        result = run_manage("check", DEBUG="perhaps")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("DEBUG is malformed", result.stderr)

    def test_it_refuses_production_with_development_secrets(self):
        result = run_manage("check", DEBUG="False", ALLOWED_HOSTS="lanhub.example")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("lanhub.E001", result.stderr)
        self.assertIn("lanhub.E002", result.stderr)

    def test_it_starts_in_production_with_real_secrets(self):
        result = run_manage("check", DEBUG="False", ALLOWED_HOSTS="lanhub.example", SECRET_KEY="s" * 50,
                            LANHUB_KEY="k" * 40)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_it_uses_postgresql_when_database_url_says_so(self):
        code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'lanhub.settings'); "
                "django.setup(); from django.conf import settings; print(settings.DATABASES['default']['ENGINE'])")
        result = subprocess.run([sys.executable, "-c", code],
                                cwd=ROOT, env={**os.environ, "DATABASE_URL": "postgres://u@127.0.0.1:5432/x"},
                                capture_output=True, text=True, timeout=60)
        self.assertIn("postgresql", result.stdout)

    @override_settings(DEBUG=False, SECRET_KEY=settings.DEV_SECRET_KEY, LANHUB_KEY="x" * 40)
    def test_the_check_reports_a_development_secret_key(self):
        ids = [e.id for e in production_secrets(None)]
        self.assertEqual(ids, ["lanhub.E001"])

    @override_settings(DEBUG=True)
    def test_the_check_is_quiet_in_development(self):
        self.assertEqual(production_secrets(None), [])
