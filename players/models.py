"""Players of a LAN and the invite links that let friends become players.

Public links carry random tokens (never primary keys): `/join/<invite token>` and `/me/<player token>/`. The
player's token is their only credential, so it is as long as a session key.
"""

import secrets

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from nodes.models import Lan, Node

TOKEN_BYTES = 24  # 192 random bits, 32 URL-safe characters
# \Z, not $: "$" also matches before a trailing newline, and a name with a newline must never pass.
NICKNAME_RE = r"\A[A-Za-z0-9_-]{2,32}\Z"
nickname_validator = RegexValidator(NICKNAME_RE, "Use 2–32 letters, digits, '-' or '_'.")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Invite(models.Model):
    """A link a host shares with friends. Redeeming it locks the row, so limits hold under concurrency."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="invites")
    token = models.CharField(max_length=64, unique=True, default=new_token, editable=False)
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField()
    max_uses = models.PositiveIntegerField(default=10, validators=[MinValueValidator(1), MaxValueValidator(1000)])
    uses = models.PositiveIntegerField(default=0, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(condition=Q(uses__lte=models.F("max_uses")), name="invite_uses_within_limit"),
        ]

    def __str__(self):
        return f"Invite to {self.lan} ({self.uses}/{self.max_uses})"

    def problem(self, now=None) -> str | None:
        """Why this invite cannot be used now, or None."""
        now = now or timezone.now()
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.uses >= self.max_uses:
            return "used_up"
        return None


class Player(models.Model):
    """A member of a LAN with a personal certificate. Revoked players stay as rows, for the CRL and history."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="players")
    nickname = models.CharField(max_length=32, validators=[nickname_validator])
    token = models.CharField(max_length=64, unique=True, default=new_token, editable=False)
    invite = models.ForeignKey(Invite, null=True, blank=True, on_delete=models.SET_NULL, related_name="players")
    preferred_node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    common_name = models.CharField(max_length=64, editable=False)
    cert_pem = models.TextField(blank=True, editable=False)
    key_sealed = models.TextField(blank=True, editable=False)
    serial = models.CharField(max_length=64, blank=True, editable=False)
    issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    joined_from = models.GenericIPAddressField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ("nickname",)
        constraints = [
            # Case-insensitive: "Bob" and "bob" would be the same person in a game lobby.
            models.UniqueConstraint(models.functions.Lower("nickname"), "lan", name="player_unique_nickname_per_lan"),
        ]

    def __str__(self):
        return f"{self.nickname} ({self.lan})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
