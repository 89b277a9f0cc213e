"""Forms for invites, joining and the player's page. They validate; the services write."""

import datetime as dt
import json
import math
import re

from django import forms

from players.models import NICKNAME_MESSAGE, nickname_validator

MAX_INVITE_HOURS = 720  # 30 days, players.services.INVITE_MAX_TTL
MAX_RTT_MS = 10_000


class InviteForm(forms.Form):
    hours = forms.IntegerField(label="Expires after (hours)", min_value=1, max_value=MAX_INVITE_HOURS, initial=24)
    max_uses = forms.IntegerField(label="How many people can use it", min_value=1, max_value=1000, initial=10)
    note = forms.CharField(label="Note (only you see it)", max_length=200, required=False)

    def ttl(self) -> dt.timedelta:
        return dt.timedelta(hours=self.cleaned_data["hours"])


class JoinForm(forms.Form):
    nickname = forms.CharField(
        max_length=32, validators=[nickname_validator],  # strips spaces at either end first
        error_messages={"max_length": NICKNAME_MESSAGE},
        help_text="What the others will see in the lobby: 2–32 characters, in any language.",
        widget=forms.TextInput(attrs={"autocomplete": "nickname", "autocapitalize": "off", "spellcheck": "false",
                                      "autofocus": True}),
    )


class ChooseNodeForm(forms.Form):
    node = forms.TypedChoiceField(coerce=int, label="Server")

    def __init__(self, *args, nodes, **kwargs):
        super().__init__(*args, **kwargs)
        self.nodes = {n.pk: n for n in nodes}
        self.fields["node"].choices = [(n.pk, n.name) for n in nodes]

    def chosen(self):
        return self.nodes[self.cleaned_data["node"]]


class RttForm(forms.Form):
    """Round-trip times the player's browser measured: a JSON object {node pk: milliseconds or null}."""

    rtts = forms.CharField(max_length=4000)

    def __init__(self, *args, node_ids, **kwargs):
        super().__init__(*args, **kwargs)
        self.node_ids = set(node_ids)

    def clean_rtts(self) -> dict[int, float | None]:
        try:
            raw = json.loads(self.cleaned_data["rtts"])
        except (ValueError, RecursionError):  # deeply nested brackets exhaust the parser's recursion
            raise forms.ValidationError("Not JSON.") from None
        if not isinstance(raw, dict):
            raise forms.ValidationError("Expected an object.")
        rtts: dict[int, float | None] = {}
        for key, value in raw.items():
            # ASCII digits only: "²".isdigit() is true, and int("²") raises.
            if not re.fullmatch(r"[0-9]{1,18}", key) or int(key) not in self.node_ids:
                continue  # a node removed since the page loaded: ignore it rather than fail the rest
            if value is None:
                rtts[int(key)] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and 0 <= value <= MAX_RTT_MS:
                rtts[int(key)] = round(float(value), 1)
            else:
                raise forms.ValidationError(f"Bad time for server {key}.")
        return rtts


class DeviceForm(forms.Form):
    name = forms.CharField(
        label="Device name", max_length=32,
        help_text="So you can tell its profile from the others: “laptop”, “phone”, “living-room PC”.",
        widget=forms.TextInput(attrs={"placeholder": "laptop", "autocomplete": "off"}),
    )
