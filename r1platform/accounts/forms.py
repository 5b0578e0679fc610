from __future__ import annotations

from django import forms

from r1platform.accounts.scoping import teams_for


class TeamUploadForm(forms.Form):
    """Base of the upload forms: the team the upload goes to, and the streamed file's refusal.

    Subclasses declare ``file`` last, so every other field is already parsed when the streaming
    upload handler stops reading an oversized body at the file.
    """

    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    missing_file_message = "Choose a file to upload."

    def __init__(self, user, *args, refusal: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refusal = refusal
        teams = teams_for(user).order_by("name")
        self.fields["team"].queryset = teams
        first_two = list(teams[:2])
        # A member of one team never picks it: the field is hidden and defaults to that team.
        self.only_team = first_two[0] if len(first_two) == 1 else None
        if self.only_team is not None:
            self.fields["team"].widget = forms.HiddenInput()
            self.fields["team"].initial = self.only_team.pk
            self.fields["team"].required = False
        self.fields["name"].widget.attrs.update(autocomplete="off", autofocus=True)

    def clean_team(self):
        return self.cleaned_data.get("team") or self.only_team

    def clean_file(self):
        if self.refusal:
            raise forms.ValidationError(self.refusal)
        uploaded = self.cleaned_data.get("file")
        if not uploaded:
            raise forms.ValidationError(self.missing_file_message)
        return uploaded
