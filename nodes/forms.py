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
        help_texts = {"slug": "Short name used in links; leave blank to derive it from the name."}

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


class NodeForm(forms.ModelForm):
    """Fields exactly as services.NODE_FIELDS; the upstream choice is limited to the same LAN's nodes."""

    class Meta:
        model = Node
        fields = services.NODE_FIELDS
        labels = {"udp_pool": "UDP pool", "tcp_pool": "TCP pool", "ssh_host": "SSH host", "ssh_port": "SSH port",
                  "ssh_user": "SSH user", "udp_port": "UDP port", "tcp_port": "TCP port"}

    def __init__(self, *args, lan: Lan, **kwargs):
        # The unsaved instance carries the LAN so Node.clean() can check the pinned upstream's LAN.
        kwargs.setdefault("instance", Node(lan=lan))
        super().__init__(*args, **kwargs)
        upstream = self.fields["pinned_upstream"]
        upstream.queryset = Node.objects.filter(lan=lan).order_by("created_at", "pk").only("lan_id", "name")
        # (only the label's column: the choices list every node of the LAN)
        upstream.label_from_instance = lambda node: node.name  # str(node) would fetch the LAN for every option
        upstream.widget = QuickSelect(choices=upstream.choices)
        upstream.help_text = "Leave empty to let LanHub choose where this server attaches."
        self.fields["ssh_host"].required = False
        self.fields["ssh_host"].help_text = "Leave blank when it is the public address."
        self.fields["country"].widget.attrs.update({"placeholder": "HK", "maxlength": 2})
        self.fields["region"].widget.attrs["placeholder"] = "asia/hk"

    def clean_country(self):
        return (self.cleaned_data.get("country") or "").upper()

    def service_fields(self) -> dict:
        return {f: self.cleaned_data[f] for f in services.NODE_FIELDS if f in self.cleaned_data}
