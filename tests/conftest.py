"""Fixtures shared by the whole suite."""

import pytest
from django.conf import settings


@pytest.fixture(autouse=True)
def _ssh_targets_on_this_machine(request):
    """Test nodes live on this machine (sshd on 127.0.0.1, namespaces): allow them as SSH targets, as the lab
    does. Tests of the refusal itself override the setting back off."""
    if not settings.configured:
        yield
        return
    old = getattr(settings, "LANHUB_SSH_ALLOW_LOCAL_TARGETS", False)
    settings.LANHUB_SSH_ALLOW_LOCAL_TARGETS = True
    yield
    settings.LANHUB_SSH_ALLOW_LOCAL_TARGETS = old
