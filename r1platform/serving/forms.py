from __future__ import annotations

from django import forms

from r1platform.deployments.models import Deployment
from r1platform.serving.playground import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, Ask, Playground

MODES = [("completion", "Completion (the prompt continued)"), ("chat", "Chat (one user message)")]


class PlaygroundForm(forms.Form):
    """A playground request: the prompt, its bounds, and which production pool answers."""

    prompt = forms.CharField(
        max_length=MAX_PROMPT_CHARS,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 4, "placeholder": "Type a prompt"}),
    )
    max_tokens = forms.IntegerField(
        label="Max tokens", min_value=1, max_value=MAX_NEW_TOKENS, initial=64
    )
    temperature = forms.FloatField(
        min_value=0.0, max_value=2.0, initial=0.0, help_text="0 decodes greedily"
    )
    mode = forms.ChoiceField(choices=MODES, initial="completion")
    pool = forms.ChoiceField(label="Pool")

    def __init__(self, *args, playground: Playground, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.by_pool = {d.pool.name: d for d in playground.deployments}
        self.fields["pool"].choices = [
            (d.pool.name, f"{d.pool.name} (v{d.version.number})") for d in playground.deployments
        ]
        if playground.deployments:
            self.fields["pool"].initial = playground.deployments[0].pool.name
        if len(playground.deployments) <= 1:
            self.fields["pool"].widget = forms.HiddenInput()
        if not playground.chat:  # no chat template: completion only
            self.fields["mode"].choices = MODES[:1]
            self.fields["mode"].widget = forms.HiddenInput()

    def deployment(self) -> Deployment:
        return self.by_pool[self.cleaned_data["pool"]]

    def ask(self) -> Ask:
        data = self.cleaned_data
        return Ask(data["prompt"], data["max_tokens"], data["temperature"], data["mode"] == "chat")

    def error_text(self) -> str:
        parts = []
        for name, errors in self.errors.items():
            label = self[name].label if name in self.fields else ""
            parts.append(f"{label}: {' '.join(errors)}" if label else " ".join(errors))
        return "; ".join(parts)
