from __future__ import annotations

from django import forms

from r1platform.deployments.models import ServingPool, Stage
from r1platform.registry.history import slower_than_upload
from r1platform.registry.models import ModelVersion, RegisteredModel

REASON_WIDGET = forms.Textarea(attrs={"rows": 2, "placeholder": "why (kept in the audit log)"})


class PoolChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: ServingPool) -> str:
        return f"{obj.name} ({obj.profile.label})"


class VersionChoiceField(forms.ModelChoiceField):
    slower: frozenset[int] = frozenset()  # versions slower than their upload (set by the form)

    def label_from_instance(self, obj: ModelVersion) -> str:
        warning = " · ⚠ slower than its upload" if obj.pk in self.slower else ""
        return f"v{obj.number} · {obj.label}{warning}"


class PromoteForm(forms.Form):
    """Which version, where and at which stage; the service asks the gate."""

    version = VersionChoiceField(queryset=ModelVersion.objects.none(), empty_label=None)
    pool = PoolChoiceField(queryset=ServingPool.objects.select_related("profile"), empty_label=None)
    stage = forms.ChoiceField(choices=Stage.choices, initial=Stage.STAGING)
    reason = forms.CharField(required=False, max_length=2000, widget=REASON_WIDGET)

    def __init__(self, *args, model: RegisteredModel, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["version"].queryset = model.versions.order_by("-number")
        self.fields["version"].slower = frozenset(slower_than_upload(model))


class RollbackForm(forms.Form):
    pool = forms.ModelChoiceField(queryset=ServingPool.objects.all(), to_field_name="name")
    stage = forms.ChoiceField(choices=Stage.choices, initial=Stage.PRODUCTION)
    reason = forms.CharField(required=False, max_length=2000)


class DecisionForm(forms.Form):
    reason = forms.CharField(required=False, max_length=2000)
