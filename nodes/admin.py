"""The admin is an operators' tool: it lists, filters and searches, and its writes go through the services.

Private keys are never shown: the sealed columns are excluded from every form and list.
"""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.utils.html import format_html, format_html_join

from nodes import services
from nodes.forms import NodeFieldsForm, game_choice_field
from nodes.models import Lan, Link, Node, RevokedCertificate, SyncRun, VpnSession

RUN_KINDS = ("sync", "drift", "status")  # SyncRun.kind (nodes/syncing.py)
SEALED = ("ca_key_sealed", "tls_crypt_sealed", "ssh_private_key_sealed", "server_key_sealed", "link_key_sealed")


def _errors(exc: ValidationError) -> str:
    return "; ".join(exc.messages)


class LanAdminForm(forms.ModelForm):
    """Checks the LAN's nodes against the new settings, so a supernet its pools no longer fit is a form error."""

    discovery_games = game_choice_field()  # the dashboard's checkboxes and rules, not a JSON text box

    class Meta:
        model = Lan
        exclude = SEALED + ("ca_cert", "crl_pem")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "slug" in self.fields:  # a new LAN: derived from the name when left blank (services.create_lan)
            self.fields["slug"].required = False

    def clean(self):
        cleaned = super().clean()
        slug, owner = cleaned.get("slug"), cleaned.get("owner")
        if not self.instance.pk and slug and owner and Lan.objects.filter(owner=owner, slug=slug).exists():
            self.add_error("slug", f"{owner} already has a LAN with the short name “{slug}”; choose another or "
                                   "leave it blank.")
        if self.instance.pk and not self.errors:
            candidate = Lan(pk=self.instance.pk, supernet=cleaned["supernet"], pool_prefix=cleaned["pool_prefix"],
                            topology_mode=cleaned["topology_mode"])
            services.check_lan(candidate)  # its ValidationError becomes the form's error (the save plans)
        return cleaned


@admin.register(Lan)
class LanAdmin(admin.ModelAdmin):
    form = LanAdminForm
    list_display = ("name", "slug", "owner", "supernet", "pool_prefix", "topology_mode", "node_count", "created_at")
    list_filter = ("topology_mode",)
    search_fields = ("name", "slug", "owner__username")
    raw_id_fields = ("owner", "default_node")
    readonly_fields = ("ssh_public_key", "crl_number", "crl_next_update", "created_at")
    exclude = SEALED + ("ca_cert", "crl_pem")
    actions = ("replan_lans",)

    def get_readonly_fields(self, request, obj=None):
        # The slug is in the LAN's links and its CA's name: it never changes with the name.
        return (*self.readonly_fields, "slug") if obj else self.readonly_fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("owner").annotate(node_total=Count("nodes"))

    @admin.display(description="nodes", ordering="node_total")
    def node_count(self, obj):
        return obj.node_total

    def save_model(self, request, obj, form, change):
        if change:
            # Only what the form changed: a full save would write back a CRL loaded before a concurrent
            # revocation re-signed it.
            obj.save(update_fields=[f for f in form.changed_data if f in form.fields])
            services.replan(obj, reason="LAN settings changed", requested_by=request.user)
            return
        lan = services.create_lan(owner=obj.owner, name=obj.name, slug=obj.slug, supernet=obj.supernet,
                                  pool_prefix=obj.pool_prefix, topology_mode=obj.topology_mode,
                                  discovery_games=obj.discovery_games, discovery_ports=obj.discovery_ports)
        obj.pk = lan.pk
        obj.refresh_from_db()

    @admin.action(description="Re-plan and sync the nodes that change")
    def replan_lans(self, request, queryset):
        for lan in queryset:
            try:
                changed = services.replan(lan, reason="re-plan requested in the admin", requested_by=request.user)
            except ValidationError as exc:
                self.message_user(request, f"{lan}: {_errors(exc)}", messages.ERROR)
            else:
                self.message_user(request, f"{lan}: {len(changed)} node(s) will sync.")


class NodeAdminForm(NodeFieldsForm):
    """The dashboard's fields and rules (NodeFieldsForm), plus the LAN and what an operator may reset. Plans the
    LAN with the node as entered, so an impossible node is a form error, not a failed save."""

    class Meta(NodeFieldsForm.Meta):
        fields = ("lan", *services.NODE_FIELDS, "ssh_host_key", "healthy")

    def clean(self):
        cleaned = super().clean()
        lan = cleaned.get("lan") or (self.instance.lan if self.instance.pk else None)
        if self.errors or lan is None:
            return cleaned
        # The node as the service would save it, defaults applied (services.node_candidate), on a copy: the form
        # still holds what the operator typed.
        original = Node(pk=self.instance.pk, lan=lan, created_at=self.instance.created_at,
                        name=self.instance.name if self.instance.pk else "")
        fields = {f: cleaned[f] for f in services.NODE_FIELDS if f in cleaned}
        candidate = services.node_candidate(lan=lan, instance=original, **fields)
        try:
            services.check_node(candidate)
        except ValidationError as exc:
            raise ValidationError(exc.messages) from None
        return cleaned


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    form = NodeAdminForm
    list_display = ("display_name", "name", "lan", "region", "priority", "public_address", "state", "healthy",
                    "sync_state", "udp_pool", "tcp_pool", "openvpn_version", "last_seen_at")
    list_filter = ("state", "healthy", "sync_state", "lan")
    search_fields = ("display_name", "name", "region", "public_address", "ssh_host", "lan__name")
    list_select_related = ("lan",)
    raw_id_fields = ("lan", "pinned_upstream")
    exclude = SEALED + ("server_cert", "link_cert", "sync_generation")
    readonly_fields = ("state", "sync_state", "missed_polls", "last_seen_at", "openvpn_version", "last_error",
                       "sync_progress", "recent_runs", "authorized_keys_line", "created_at")
    actions = ("sync_nodes",)
    change_form_template = "admin/nodes/node/change_form.html"

    @admin.display(description="Paste into ~/.ssh/authorized_keys on the server")
    def authorized_keys_line(self, obj):
        return obj.lan.ssh_public_key if obj.pk else "Save the node first; the LAN's deploy key is shown here."

    @admin.display(description="Current sync")
    def sync_progress(self, obj):
        run = obj.sync_runs.first() if obj.pk else None
        if run is None:
            return "No sync yet."
        return format_html(
            '<div class="lh-sync" data-status-url="/nodes/{}/status.json"><span class="lh-sync-step">{} — {}</span>'
            ' <progress max="100" value="{}">{}%</progress></div>',
            obj.pk, run.get_status_display(), run.current_step or "waiting", run.progress, run.progress,
        )

    @admin.display(description="Last runs")
    def recent_runs(self, obj):
        runs = obj.sync_runs.all()[:10] if obj.pk else []
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.kind, r.get_status_display(), r.reason,
              r.error or "") for r in runs),
        )
        return format_html("<table><tr><th>when</th><th>kind</th><th>status</th><th>why</th><th>error</th></tr>"
                           "{}</table>", rows) if runs else "No runs yet."

    def get_readonly_fields(self, request, obj=None):
        # Moving a node to another LAN would strand its certificates: remove it and add it there instead. Its slug
        # never changes (its files and certificates carry it); the display name does.
        return (*self.readonly_fields, "lan", "name") if obj else self.readonly_fields

    def save_model(self, request, obj, form, change):
        # On a change the operator may also clear the pinned host key (to accept a new one) or flip health.
        keys = services.NODE_FIELDS + (("ssh_host_key", "healthy") if change else ())
        fields = {f: form.cleaned_data[f] for f in keys if f in form.cleaned_data}
        if change:
            # The form already wrote its values onto obj; the service gets the stored row and the changes.
            original = Node.objects.get(pk=obj.pk)
            changed = {f: v for f, v in fields.items() if getattr(original, f) != v}
            services.update_node(original, requested_by=request.user, **changed)
            return
        node = services.create_node(lan=obj.lan, requested_by=request.user, **fields)
        obj.pk = node.pk
        obj.refresh_from_db()

    def delete_model(self, request, obj):
        self._deleted(request, obj.display_name, services.delete_node(obj, requested_by=request.user))

    def delete_queryset(self, request, queryset):
        for node in queryset:
            self._deleted(request, node.display_name, services.delete_node(node, requested_by=request.user))

    def _deleted(self, request, name, problem):
        if problem:
            self.message_user(request, f"{name} was removed from the LAN, but LanHub could not clean up the server "
                                       f"({problem}); stop its OpenVPN by hand if it still runs.", messages.WARNING)

    @admin.action(description="Sync now")
    def sync_nodes(self, request, queryset):
        for node in queryset:
            services.request_sync(node, reason="sync requested in the admin", requested_by=request.user)
        self.message_user(request, f"{queryset.count()} node(s) queued for sync.")


@admin.register(Link)
class LinkAdmin(admin.ModelAdmin):
    list_display = ("downstream", "upstream", "address", "state", "rtt_ms", "updated_at")
    list_filter = ("state", "lan")
    search_fields = ("upstream__name", "downstream__name")
    # Both ends print as "name (LAN)": their LANs come in the same query.
    list_select_related = ("upstream__lan", "downstream__lan")
    readonly_fields = ("lan", "upstream", "downstream", "address", "state", "rtt_ms", "updated_at")

    def has_add_permission(self, request):
        return False  # links are planned, never entered by hand; pin an upstream on the node instead


class RunKindFilter(admin.SimpleListFilter):
    """The kinds are known: listing them needs no SELECT DISTINCT over two weeks of runs."""

    title = "kind"
    parameter_name = "kind"

    def lookups(self, request, model_admin):
        return [(kind, kind) for kind in RUN_KINDS]

    def queryset(self, request, queryset):
        return queryset.filter(kind=self.value()) if self.value() else queryset


@admin.register(SyncRun)
class SyncRunAdmin(admin.ModelAdmin):
    list_display = ("node", "kind", "status", "current_step", "progress", "reason", "created_at", "finished_at")
    list_filter = ("status", RunKindFilter)
    search_fields = ("node__name", "reason", "error")
    list_select_related = ("node__lan",)  # a node prints as "name (LAN)"
    readonly_fields = [f.name for f in SyncRun._meta.fields]
    # Two weeks of drift checks are hundreds of thousands of rows: no second COUNT(*) over all of them.
    show_full_result_count = False

    def has_add_permission(self, request):
        return False


@admin.register(RevokedCertificate)
class RevokedCertificateAdmin(admin.ModelAdmin):
    list_display = ("common_name", "serial", "lan", "revoked_at", "reason")
    search_fields = ("common_name", "serial")
    list_select_related = ("lan",)
    readonly_fields = ("lan", "serial", "common_name", "revoked_at", "reason")

    def has_add_permission(self, request):
        return False  # revoke a player instead; that also re-signs the CRL and syncs the nodes


@admin.register(VpnSession)
class VpnSessionAdmin(admin.ModelAdmin):
    list_display = ("common_name", "node", "vpn_address", "real_address", "connected_since", "bytes_in",
                    "bytes_out", "seen_at")
    search_fields = ("common_name", "vpn_address", "real_address")
    list_select_related = ("node__lan",)  # a node prints as "name (LAN)"
    readonly_fields = [f.name for f in VpnSession._meta.fields]
    show_full_result_count = False  # one COUNT(*) per page is enough on a table the watcher keeps busy

    def has_add_permission(self, request):
        return False
