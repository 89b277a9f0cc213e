"""Forms for hosts: they validate input and never save (the services write, convention 1)."""

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.forms.utils import flatatt
from django.utils.html import format_html, format_html_join

from nodes import games, services
from nodes.models import Lan, Node


def game_choice_field() -> forms.MultipleChoiceField:
    """The preset list as checkboxes: the dashboard's game form and the admin's LAN form use this same field."""
    return forms.MultipleChoiceField(
        choices=[(g.key, f"{g.label} ({g.ports_label})") for g in games.PRESETS], required=False,
        widget=forms.CheckboxSelectMultiple, label="Games",
        help_text="Their LAN announcements (broadcast or multicast) reach every player on every server.",
    )


def add_service_error(form: forms.BaseForm, exc: ValidationError) -> None:
    """Show a service's ValidationError on the form: on the field it names when the form has that field, else at
    the top. (form.add_error refuses a dict naming a field the form lacks, such as a model-only field.)"""
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for field, errors in exc.error_dict.items():
        target = field if field in form.fields else None
        messages = [m for e in errors for m in e.messages]
        if target is None and field != NON_FIELD_ERRORS:
            messages = [f"{field.replace('_', ' ').capitalize()}: {m}" for m in messages]
        form.add_error(target, messages)


class LanForm(forms.ModelForm):
    """Only for validation and widgets; services.create_lan builds the row (with its CA and keys)."""

    class Meta:
        model = Lan
        fields = ("name", "slug", "supernet", "pool_prefix", "topology_mode")
        labels = {"slug": "Short name"}
        help_texts = {"slug": "Used in links; leave blank to derive it from the name. It never changes."}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["slug"].required = False


class GameListForm(forms.ModelForm):
    """The LAN's game list on the dashboard; the model's validators (also run by the admin) check the ports."""

    discovery_games = game_choice_field()

    class Meta:
        model = Lan
        fields = ("discovery_games", "discovery_ports")
        labels = {"discovery_ports": "Custom UDP ports"}


class QuickSelect(forms.Select):
    """A <select> drawn in one pass. Django renders every <option> through a template (about half a millisecond
    each), and the upstream choice lists every node of the LAN on every dashboard load."""

    def render(self, name, value, attrs=None, renderer=None):
        widget = self.get_context(name, value, attrs)["widget"]
        options = format_html_join(
            "", '<option value="{}"{}>{}</option>',
            ((option["value"], " selected" if option["selected"] else "", option["label"])
             for _, group, _ in widget["optgroups"] for option in group),
        )
        return format_html('<select name="{}"{}>{}</select>', widget["name"], flatatt(widget["attrs"]), options)


class NodeFieldsForm(forms.ModelForm):
    """The rules and defaults of a node's fields, for the dashboard's add-server form and the admin's node form
    alike: the same fields (services.NODE_FIELDS), required or optional alike, with the same labels and hints.
    What is left blank gets its default in services.node_candidate (the slug from the name, the SSH host from the
    public address), the one place both forms and every other caller go through."""

    OPTIONAL = ("name", "ssh_host")  # derived by services.node_candidate when left blank

    class Meta:
        model = Node
        fields = services.NODE_FIELDS
        labels = {"udp_pool": "UDP pool", "tcp_pool": "TCP pool", "ssh_port": "SSH port", "ssh_user": "SSH user",
                  "udp_port": "UDP port", "tcp_port": "TCP port"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.OPTIONAL:
            if name in self.fields:
                self.fields[name].required = False
        if self.instance.pk and "name" in self.fields:
            self.fields["name"].disabled = True  # the slug never changes (services.update_node)
        placeholders = {"display_name": "Hong Kong", "name": "hong-kong", "country": "HK", "region": "asia/hk"}
        for name, placeholder in placeholders.items():
            if name in self.fields:
                self.fields[name].widget.attrs["placeholder"] = placeholder
        if "country" in self.fields:
            self.fields["country"].widget.attrs["maxlength"] = 2

    def clean(self):
        cleaned = super().clean()
        lan = cleaned.get("lan") or (self.instance.lan if self.instance.lan_id else None)
        if lan is not None and not self.instance.pk and cleaned.get("name"):
            try:
                services.check_new_slug(lan, cleaned["name"])
            except ValidationError as exc:
                add_service_error(self, exc)
        return cleaned

    def clean_display_name(self):
        return (self.cleaned_data.get("display_name") or "").strip()

    def clean_name(self):
        return (self.cleaned_data.get("name") or "").strip().lower()

    def clean_country(self):
        return (self.cleaned_data.get("country") or "").upper()

    def service_fields(self) -> dict:
        return {f: self.cleaned_data[f] for f in services.NODE_FIELDS if f in self.cleaned_data}


class NodeForm(NodeFieldsForm):
    """The dashboard's add-server form: the shared fields; the upstream choice is limited to the same LAN's
    nodes."""

    def __init__(self, *args, lan: Lan, **kwargs):
        # The unsaved instance carries the LAN so Node.clean() can check the pinned upstream's LAN.
        kwargs.setdefault("instance", Node(lan=lan))
        super().__init__(*args, **kwargs)
        upstream = self.fields["pinned_upstream"]
        upstream.queryset = Node.objects.filter(lan=lan).order_by("created_at", "pk").only(
            "lan_id", "name", "display_name")
        # (only the label's columns: the choices list every node of the LAN)
        upstream.label_from_instance = lambda node: node.display_name  # str(node) would fetch the LAN per option
        upstream.widget = QuickSelect(choices=list(iter(upstream.choices)))  # one query (list() alone counts first)
        upstream.help_text = "Leave empty to let LanHub choose where this server attaches."
