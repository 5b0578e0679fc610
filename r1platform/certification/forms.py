from __future__ import annotations

import json
import uuid

from django import forms

from pipelines.certification.report import Level
from pipelines.certification.settings import TEXT_GOLDEN_KINDS, CertifySettings
from pipelines.llm.kinds import is_text_format
from r1platform.certification.services import THRESHOLDS, runnable_profiles
from r1platform.datasets.models import Dataset
from r1platform.jobs.forms import dataset_label
from r1platform.registry.models import ModelVersion

LEVEL_HELP = (
    "basic: checks 1–5 + API success rate · performance: + budget, serving contract and QPS per "
    "card (a language model: output tokens/s per card) · scenario: + test cases"
)


def threshold_help() -> list[dict]:
    """Each threshold the form's JSON may set: name, default and description."""
    properties = CertifySettings.model_json_schema().get("properties", {})
    return [
        {
            "name": name,
            "default": json.dumps(properties[name].get("default")),
            "description": properties[name].get("description", ""),
        }
        for name in THRESHOLDS
        if name in properties
    ]


class SuiteForm(forms.Form):
    """How hard to certify one version, and on which golden set; the service checks the rest."""

    level = forms.ChoiceField(
        choices=[(lv.value, lv.value) for lv in Level], initial=Level.BASIC, help_text=LEVEL_HELP
    )
    golden_dataset = forms.TypedChoiceField(
        coerce=int,
        empty_value=None,
        required=False,
        label="Golden dataset",
        help_text=(
            "Its rows are the golden inputs (and with a target, the expected outputs the "
            "scenario needs). None: seeded random inputs of the declared shapes."
        ),
    )
    test_cases = forms.TypedChoiceField(
        coerce=int,
        empty_value=None,
        required=False,
        label="Test cases",
        help_text="A test-case dataset the scenario level judges (every must case passes).",
    )
    # A fresh key per rendered form: a double click posts the same key, so nothing twice.
    idempotency_key = forms.CharField(max_length=100, required=False, widget=forms.HiddenInput)

    def __init__(self, *args, version: ModelVersion, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.version = version
        # The live profiles this version's format (and compile details) can run on.
        self.profiles = runnable_profiles(version)[0]
        datasets = Dataset.objects.filter(team_id=version.team_id).order_by("name", "-version")
        if is_text_format(version.format):  # a language model reads text datasets only
            self._text_choices(list(datasets))
        else:
            self.fields["golden_dataset"].choices = [("", "— none —")] + [
                (d.pk, dataset_label(d) + ("" if d.target else ", no target")) for d in datasets
            ]
            self.fields["test_cases"].choices = [("", "— none —")] + [
                (d.pk, dataset_label(d)) for d in datasets if (d.schema or {}).get("test_cases")
            ]
        if not self.is_bound:
            self.initial["idempotency_key"] = uuid.uuid4().hex

    def _text_choices(self, datasets: list[Dataset]) -> None:
        """A language model's: text golden sets (none: a built-in English sample) and text test
        cases."""
        golden = self.fields["golden_dataset"]
        golden.choices = [("", "— none (a built-in English sample) —")] + [
            (d.pk, dataset_label(d))
            for d in datasets
            if (d.schema or {}).get("text_kind") in TEXT_GOLDEN_KINDS
        ]
        golden.help_text = (
            "Text rows: perplexity (parity with the full-precision ancestor) and the golden "
            "prompts come from them."
        )
        self.fields["test_cases"].choices = [("", "— none —")] + [
            (d.pk, dataset_label(d))
            for d in datasets
            if (d.schema or {}).get("text_kind") == "test_cases"
        ]


class CertifyEverywhereForm(SuiteForm):
    """Certify on every live profile that runs the version (the profiles are not chosen)."""

    def __init__(self, *args, **kwargs) -> None:
        # Its own ids: it sits beside the Certify form, whose fields have the same names.
        kwargs.setdefault("auto_id", "everywhere_%s")
        super().__init__(*args, **kwargs)


class CertifyForm(SuiteForm):
    """Where and how hard to certify one version. The service does every deeper check."""

    field_order = [
        "profile",
        "level",
        "golden_dataset",
        "test_cases",
        "thresholds",
        "idempotency_key",
    ]
    profile = forms.ChoiceField(help_text="A live worker's hardware profile this format runs on.")
    thresholds = forms.CharField(
        required=False,
        label="Thresholds (JSON)",
        help_text='Over the defaults, e.g. {"p99_budget_ms": 50, "min_throughput": 200}.',
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "class": "mono"}),
    )

    def __init__(self, *args, version: ModelVersion, **kwargs) -> None:
        super().__init__(*args, version=version, **kwargs)
        self.fields["profile"].choices = [(p.key, p.label) for p in self.profiles]

    def clean_thresholds(self) -> dict | None:
        raw = (self.cleaned_data.get("thresholds") or "").strip()
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from None
        if not isinstance(value, dict):
            raise forms.ValidationError('thresholds must be a JSON object, like {"key": 1}')
        return value
