"""Players of a LAN, their devices, and the invite links that let friends become players.

Public links carry random tokens (never primary keys): `/join/<invite token>` and `/me/<player token>/`. The
player's token is their only credential, so it is as long as a session key.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from nodes.models import Lan, Node

TOKEN_BYTES = 24  # 192 random bits, 32 URL-safe characters
NICKNAME_MESSAGE = "Use 2–32 characters: letters in any language, digits, spaces, '-' or '_' (“Bob”, “小明”)."


def is_nickname(value) -> bool:
    """What a friend may call themselves: 2–32 printable characters in any script ("Bob Smith", "小明", "Zoë_99"),
    at least one of them a letter or a digit, no space at either end. One line of text: no newline or other control
    character can pass (str.isprintable), so a nickname is safe in a profile's header comment and in logs. It is
    only ever shown; certificates and file names use its ASCII slug (nodes/layout.py: player_cn)."""
    return (isinstance(value, str) and 2 <= len(value) <= 32 and value == value.strip() and value.isprintable()
            and any(ch.isalnum() for ch in value))


def nickname_validator(value) -> None:
    if not is_nickname(value):
        raise ValidationError(NICKNAME_MESSAGE, code="invalid")


# A device name is typed freely ("Anna's phone", "客厅电脑") and only ever shown or folded into a file name, so any
# printable text will do; \Z again, and no control characters (they would garble the profile's header comment).
DEVICE_NAME_RE = r"\A[^\x00-\x1f\x7f]{1,32}\Z"
DEVICE_NAME_MESSAGE = "Name the device in 1–32 characters, e.g. “laptop” or “phone”."
device_name_validator = RegexValidator(DEVICE_NAME_RE, DEVICE_NAME_MESSAGE)
FIRST_DEVICE_NAME = "first device"
DEVICE_REF_BYTES = 6  # 48 bits: picks one of a player's devices inside a URL the player's token already guards


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_device_ref() -> str:
    return secrets.token_urlsafe(DEVICE_REF_BYTES)


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
    """A member of a LAN, with one certificate per device (Device). Revoked players stay as rows, for history."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="players")
    nickname = models.CharField(max_length=32, validators=[nickname_validator])
    token = models.CharField(max_length=64, unique=True, default=new_token, editable=False)
    invite = models.ForeignKey(Invite, null=True, blank=True, on_delete=models.SET_NULL, related_name="players")
    preferred_node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
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

    @property
    def first_device(self) -> Device | None:
        """The device the player joined with (revoked or not): one query, for reports and tests that follow one
        device. Pages list `devices` instead."""
        return self.devices.order_by("created_at", "pk").first()

    @property
    def common_name(self) -> str:
        """The first device's certificate name."""
        device = self.first_device
        return device.common_name if device else ""

    @property
    def serial(self) -> str:
        """The first device's certificate serial (hex)."""
        device = self.first_device
        return device.serial if device else ""


class Device(models.Model):
    """One of a player's devices, with its own certificate.

    OpenVPN drops the first connection when a second one presents the same certificate, and gives out persistent
    addresses per common name (ifconfig-pool-persist): so each device has its own certificate, its own session and
    its own address. A lost device is revoked alone; revoking the player revokes every device. Revoked devices stay
    as rows, for history; their serials are in nodes.RevokedCertificate."""

    player = models.ForeignKey(Player, on_delete=models.CASCADE, related_name="devices")
    name = models.CharField(max_length=32, validators=[device_name_validator])
    # Picks the device in the player's own URLs (/me/<token>/devices/<ref>/...): random, never the pk.
    ref = models.CharField(max_length=16, unique=True, default=new_device_ref, editable=False)
    common_name = models.CharField(max_length=64, db_index=True, editable=False)
    cert_pem = models.TextField(editable=False)
    key_sealed = models.TextField(editable=False)
    serial = models.CharField(max_length=64, editable=False)
    issued_at = models.DateTimeField(default=timezone.now, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ("created_at", "pk")
        constraints = [
            # Among the devices in use: a lost "phone" can be followed by a new "phone".
            models.UniqueConstraint(models.functions.Lower("name"), "player", condition=Q(revoked_at__isnull=True),
                                    name="device_unique_active_name_per_player"),
        ]

    def __str__(self):
        return f"{self.name} of {self.player.nickname}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
