"""Operators' view of players and invites; revocation goes through the services (new CRL, nodes synced).

Player and invite tokens are credentials (a player token downloads the player's private key; an invite token
makes a new player), so they are never shown here, not even read-only to staff who may only view: TOKEN_FIELDS
are excluded from every form, list and search. Hosts hand out their own invite links from their dashboard.
"""

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from players import services
from players.models import Device, Invite, Player

TOKEN_FIELDS = ("token",)


class DeviceInline(admin.TabularInline):
    """A player's devices, read-only: certificates are issued and revoked by the services, never typed in."""

    model = Device
    extra = 0
    can_delete = False
    fields = ("name", "common_name", "serial", "issued_at", "revoked_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False  # the player adds devices on their page, which issues the certificate


@admin.register(Player)
class PlayerAdmin(admin.ModelAdmin):
    list_display = ("nickname", "lan", "preferred_node", "created_at", "last_seen_at", "revoked_at")
    list_filter = ("lan", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("nickname", "devices__common_name", "lan__name")
    list_select_related = ("lan", "preferred_node__lan")  # a node prints as "name (LAN)"
    raw_id_fields = ("lan", "invite", "preferred_node")
    exclude = TOKEN_FIELDS
    inlines = (DeviceInline,)
    # A player belongs to one LAN for life: its certificates come from that LAN's CA and their revocation goes to
    # that LAN's CRL.
    readonly_fields = ("lan", "invite", "joined_from", "created_at", "revoked_at")
    actions = ("revoke_players", "reissue_players")

    def has_add_permission(self, request):
        return False  # players join through an invite, which issues their certificate

    @admin.action(description="Revoke (CRL updated on every node, sessions killed)")
    def revoke_players(self, request, queryset):
        for player in queryset:
            services.revoke_player(player, reason=f"revoked in the admin by {request.user}")
        self.message_user(request, f"{queryset.count()} player(s) revoked; the nodes are syncing.")

    @admin.action(description="Re-issue the certificates of all their devices")
    def reissue_players(self, request, queryset):
        for player in queryset:
            try:
                services.reissue_player(player)
            except ValidationError as exc:
                self.message_user(request, f"{player}: {'; '.join(exc.messages)}", messages.ERROR)


@admin.register(Invite)
class InviteAdmin(admin.ModelAdmin):
    list_display = ("lan", "note", "uses", "max_uses", "expires_at", "revoked_at", "created_at")
    list_filter = ("lan", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("note", "lan__name")
    list_select_related = ("lan",)
    raw_id_fields = ("lan", "created_by")
    exclude = TOKEN_FIELDS
    readonly_fields = ("uses", "revoked_at", "created_at")
    actions = ("revoke_invites",)

    @admin.action(description="Revoke")
    def revoke_invites(self, request, queryset):
        for invite in queryset:
            services.revoke_invite(invite)
        self.message_user(request, f"{queryset.count()} invite(s) revoked.")
