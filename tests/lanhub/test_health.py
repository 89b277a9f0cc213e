"""/healthz answers 200 only when the database, Redis and a worker all answer."""

import socket
import subprocess
import time

from django.test import TestCase, TransactionTestCase, override_settings

from tests.celery_worker import real_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A Redis server of the test's own on a free loopback port, which the test can stop."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the private Redis did not start within 10 s")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class HealthRedisTests(TestCase):
    def test_it_reports_redis_down_when_it_stops(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            redis = PrivateRedis(tmp)
            try:
                with override_settings(REDIS_URL=redis.url):
                    up = self.client.get("/healthz").json()
                    self.assertEqual(up["redis"], "ok")
                    redis.stop()
                    response = self.client.get("/healthz")
            finally:
                if redis.proc.poll() is None:
                    redis.stop()
        self.assertEqual(response.status_code, 503)
        body = response.json()
        self.assertTrue(body["redis"].startswith("down"), body)
        self.assertEqual(body["database"], "ok")
        self.assertEqual(body["status"], "degraded")

    def test_it_refuses_post(self):
        self.assertEqual(self.client.post("/healthz").status_code, 405)


class HealthWorkerTests(TransactionTestCase):
    def test_it_is_healthy_only_while_a_worker_answers(self):
        with real_worker():
            response = self.client.get("/healthz")
            self.assertEqual(response.status_code, 200, response.json())
            self.assertTrue(response.json()["worker"].startswith("ok"))
        # The worker is gone: no one consumes the queue any more.
        after = self.client.get("/healthz")
        self.assertEqual(after.status_code, 503)
        self.assertTrue(after.json()["worker"].startswith("down"))
