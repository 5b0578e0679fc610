from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from r1platform.accounts.models import Team
from r1platform.notifications import services
from r1platform.notifications.models import NotificationSettings

URL_HELP = "Each event is POSTed there as JSON. http:// or https:// only, to a public address."
SECRET_HELP = (
    "When set, each request carries X-R1-Signature: sha256=<HMAC-SHA256 of the body>. "
    "Left blank, the current secret is kept."
)
EMAILS_HELP = "Separated by commas or new lines. Sent through the platform's mail server."


class NotificationSettingsForm(forms.Form):
    """One team's channels; ``services.update_settings`` validates again and saves."""

    webhook_url = forms.CharField(
        label="Webhook URL", required=False, max_length=services.MAX_URL_LENGTH, help_text=URL_HELP
    )
    webhook_secret = forms.CharField(
        label="Signing secret",
        required=False,
        max_length=200,
        help_text=SECRET_HELP,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    clear_secret = forms.BooleanField(label="Remove the signing secret", required=False)
    emails = forms.CharField(
        label="Email recipients",
        required=False,
        help_text=EMAILS_HELP,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "ml-oncall@example.com"}),
    )
    events = forms.MultipleChoiceField(
        label="Events",
        required=False,
        choices=[(e, f"{services.EVENT_LABELS[e]} ({e})") for e in services.EVENTS],
        widget=forms.CheckboxSelectMultiple,
    )

    def __init__(self, *args, team: Team, config: NotificationSettings, **kwargs) -> None:
        # The prefix keeps ids unique when a member of several teams sees one form per team.
        kwargs.setdefault("prefix", f"team-{team.pk}")
        kwargs.setdefault(
            "initial",
            {
                "webhook_url": config.webhook_url,
                "emails": ", ".join(config.emails),
                "events": [e for e in services.EVENTS if config.is_on(e)],
            },
        )
        super().__init__(*args, **kwargs)
        self.team = team
        self.config = config
        self.fields["webhook_url"].widget.attrs["placeholder"] = "https://example.com/r1-hook"

    def clean_webhook_url(self) -> str:
        return services.check_webhook_url(self.cleaned_data["webhook_url"])

    def clean_emails(self) -> list[str]:
        return services.check_emails(self.cleaned_data["emails"])

    def save(self) -> NotificationSettings | None:
        """Save through the service; ``None`` (with the errors on the form) if it refused."""
        data = self.cleaned_data
        secret = "" if data["clear_secret"] else (data["webhook_secret"] or None)
        try:
            return services.update_settings(
                self.team,
                webhook_url=data["webhook_url"],
                emails=data["emails"],
                events=data["events"],
                webhook_secret=secret,
            )
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                self.add_error(field if field in self.fields else None, messages)
            return None
