from __future__ import annotations

from django import forms

from r1platform.accounts.scoping import teams_for
from r1platform.registry.models import Task

SHAPE_HELP = "TorchScript only: e.g. batch,64 or ids:batch,128:int64;mask:batch,128:int64"


class UploadForm(forms.Form):
    """A new model from one file. The file comes last, so every other field is already parsed
    when the streaming upload handler stops reading an oversized body at the file."""

    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(max_length=100)
    task = forms.ChoiceField(choices=Task.choices, initial=Task.OTHER)
    input_shape = forms.CharField(max_length=500, required=False, help_text=SHAPE_HELP)
    input_dtype = forms.CharField(
        max_length=20,
        required=False,
        initial="float32",
        help_text="Of the declared inputs (TorchScript); ONNX files declare their own.",
    )
    file = forms.FileField(
        required=False, help_text="An .onnx file, or a TorchScript .pt saved with torch.jit.save."
    )

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
        self.fields["file"].widget.attrs.update(accept=".onnx,.pt,.pth,.ts", required=True)

    def clean_team(self):
        return self.cleaned_data.get("team") or self.only_team

    def clean_file(self):
        if self.refusal:
            raise forms.ValidationError(self.refusal)
        uploaded = self.cleaned_data.get("file")
        if not uploaded:
            raise forms.ValidationError("Choose a model file to upload.")
        return uploaded

    def clean_input_dtype(self) -> str:
        return self.cleaned_data.get("input_dtype", "").strip() or "float32"
