"""Web, worker and beat refuse to start in production with development or missing secrets (issue 14, item 3).

Each test starts the real process (gunicorn, celery worker, celery beat) the way the Procfile does and watches it
exit with the message; the last one shows gunicorn does serve once the secrets are real, so the refusal is the
secrets' doing and not a broken command line.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.test import SimpleTestCase

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REAL = {"SECRET_KEY": "s" * 50, "LANHUB_KEY": "k" * 50}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY", "LANHUB_KEY")}
    env.update({"DEBUG": "False", "ALLOWED_HOSTS": "lanhub.example,127.0.0.1"}, **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, env, timeout=60):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class ProductionStartTests(SimpleTestCase):
    def gunicorn(self, port):
        return [str(BIN / "gunicorn"), "lanhub.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1"]

    def test_gunicorn_refuses_to_start_with_the_development_keys(self):
        result = _run(self.gunicorn(_free_port()), _env())
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("LanHub web refuses to start", result.stderr)
        self.assertIn("LANHUB_KEY is still the published development", result.stderr)
        self.assertIn("SECRET_KEY is still the published development", result.stderr)

    def test_gunicorn_refuses_to_start_with_empty_or_example_keys(self):
        result = _run(self.gunicorn(_free_port()),
                      _env(SECRET_KEY="", LANHUB_KEY="change-me-to-another-long-random-string"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("SECRET_KEY is missing", result.stderr)
        self.assertIn("LANHUB_KEY is still the published development or example value", result.stderr)

    def test_the_celery_worker_refuses_to_start_with_the_development_keys(self):
        result = _run([str(BIN / "celery"), "-A", "lanhub", "worker", "--concurrency", "1", "--queues",
                       "lanhub-startup-test"], _env(LANHUB_KEY="short"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("LanHub worker refuses to start", result.stderr)
        self.assertIn("LANHUB_KEY is shorter than 32 characters", result.stderr)

    def test_celery_beat_refuses_to_start_with_the_development_keys(self):
        schedule = ROOT / "var" / f"beat-startup-test-{os.getpid()}"
        try:
            result = _run([str(BIN / "celery"), "-A", "lanhub", "beat", "--schedule", str(schedule)], _env())
        finally:
            for path in schedule.parent.glob(schedule.name + "*"):
                path.unlink()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("LanHub beat refuses to start", result.stderr)

    def test_gunicorn_serves_once_the_secrets_are_real(self):
        port = _free_port()
        proc = subprocess.Popen(self.gunicorn(port), cwd=ROOT, env=_env(**REAL), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            answered = False
            for _ in range(100):  # up to ~30 s for the master to listen on a busy machine
                if proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                        s.sendall(b"GET /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                        answered = s.recv(64).startswith(b"HTTP/1.1 200")
                        break
                except OSError:
                    time.sleep(0.3)
            self.assertTrue(answered, f"gunicorn did not answer (exit {proc.poll()})")
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
