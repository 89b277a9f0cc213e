"""`manage.py lab up|status|down`: the whole LanHub in namespaces, left running between commands, then removed."""

import io
import re
import subprocess

import pytest
from django.core.management import call_command
from django.test import override_settings

from nodes.models import Lan
from tests.lab_helpers import require_lab

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]


def test_lab_up_connects_the_players_across_servers_and_lab_down_removes_everything(tmp_path):
    require_lab()
    with override_settings(VAR_DIR=tmp_path):
        out = io.StringIO()
        made = []
        try:
            call_command("lab", "up", nodes="hangzhou,hongkong", players="alice,bob", stdout=out)
            text = out.getvalue()
            made = re.findall(r"namespace (\S+),", text)
            assert len(made) == 2, text
            assert "sync hangzhou: completed" in text and "sync hongkong: completed" in text, text
            pings = re.findall(r"ping (\w+) -> (\w+) \(\S+\): (.+)", text)
            assert {(a, b) for a, b, _ in pings} == {("alice", "bob"), ("bob", "alice")}, text
            assert all(result.endswith(" ms") for _, _, result in pings), text
            status = io.StringIO()
            call_command("lab", "status", stdout=status)
            assert "player alice" in status.getvalue() and "openvpn running" in status.getvalue()
        finally:
            call_command("lab", "down", stdout=io.StringIO())
        assert not (tmp_path / "lab.json").exists()
    assert not Lan.objects.filter(slug="lab").exists()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert made and not set(made) & set(namespaces)
