"""`check --deploy` is clean through documented variables, and tokens never reach a log (issue 14, items 10, 11)."""

import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.test import SimpleTestCase
from lanhub.logmask import MaskTokensFilter, mask

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
PRODUCTION = {"DEBUG": "False", "SECRET_KEY": "q8Zr-2vLxN4pT7wYb1KcFh9JmS3dGu6EaRo0iVnXyWlBtQz5Hj7Mk2Np9Rs4Tv6W", "LANHUB_KEY": "k" * 50, "ALLOWED_HOSTS": "lanhub.example",
              "SECURE_HSTS_SECONDS": "31536000", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "True",
              "SECURE_HSTS_PRELOAD": "True", "SECURE_SSL_REDIRECT": "True"}


def run_manage(*args, **env):
    # DJANGO_ALLOW_ASYNC_UNSAFE: the browser tests set it in this process; a deployment never has it.
    full_env = {k: v for k, v in os.environ.items() if k not in PRODUCTION and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    full_env.update(env)
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


class DeployCheckTests(SimpleTestCase):
    def test_check_deploy_is_clean_with_the_documented_production_variables(self):
        result = run_manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn("no issues", result.stdout)

    def test_without_the_https_variables_it_names_them(self):
        env = {k: v for k, v in PRODUCTION.items() if not k.startswith("SECURE_")}
        result = run_manage("check", "--deploy", "--fail-level", "WARNING", **env)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("SECURE_HSTS_SECONDS", result.stderr)
        self.assertIn("SECURE_SSL_REDIRECT", result.stderr)


class TokenMaskingTests(SimpleTestCase):
    def test_the_404_warning_does_not_carry_the_token(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.addFilter(MaskTokensFilter())
        logger = logging.getLogger("test.masking")
        logger.addHandler(handler)
        try:
            logger.warning("Not Found: %s", f"/me/{TOKEN}/profile/%C2%B2.ovpn")
            logger.warning("Not Found: %s", f"/join/{TOKEN}/")
        finally:
            logger.removeHandler(handler)
        self.assertNotIn(TOKEN, stream.getvalue())
        self.assertIn("Not Found: /me/…/profile/%C2%B2.ovpn", stream.getvalue())

    def test_the_django_console_handler_masks_tokens(self):
        with self.assertLogs("django.request", level="WARNING") as logs:
            response = self.client.get(f"/me/{TOKEN}/nothing-here/")
        self.assertEqual(response.status_code, 404)
        from django.conf import settings
        self.assertIn("mask_tokens", settings.LOGGING["handlers"]["console"]["filters"])
        self.assertTrue(logs.output)

    def test_the_gunicorn_access_log_masks_tokens(self):
        # The real gunicorn, started as the Procfile starts it, logging its access lines to a file.
        log_path = ROOT / "var" / f"access-test-{os.getpid()}.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [str(Path(sys.executable).parent / "gunicorn"), "lanhub.wsgi", "--bind", f"127.0.0.1:{port}",
                "--workers", "1", "--access-logfile", str(log_path), "--logger-class",
                "lanhub.logmask.GunicornLogger"]
        env = {k: v for k, v in os.environ.items() if k not in PRODUCTION}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                        conn.sendall(f"GET /me/{TOKEN}/?next=/join/{TOKEN}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     f"Referer: http://127.0.0.1/join/{TOKEN}/\r\nConnection: close\r\n\r\n"
                                     .encode())
                        conn.recv(64)
                        break
                except OSError:
                    time.sleep(0.3)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        line = log_path.read_text()
        log_path.unlink()
        self.assertIn("GET /me/…/?next=/join/…/", line)
        self.assertNotIn(TOKEN, line)

    def test_mask_leaves_other_paths_alone(self):
        self.assertEqual(mask("GET /lans/gamenight/ HTTP/1.1"), "GET /lans/gamenight/ HTTP/1.1")
