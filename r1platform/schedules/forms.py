"""The schedule and template forms. They check only what a form can (types, the user's teams);
everything else (the cron expression, the stages, the dataset, the split) is the service's to
refuse, and its message is shown in the form."""

from __future__ import annotations

import json

from django import forms

from r1platform.accounts.scoping import scoped, teams_for
from r1platform.datasets.models import Dataset
from r1platform.deployments.forms import PoolChoiceField
from r1platform.deployments.models import ServingPool
from r1platform.registry.models import RegisteredModel
from r1platform.schedules.models import PipelineTemplate, Schedule

CRON_HELP = "Five fields, in UTC: minute hour day month weekday. 0 3 * * 1 is Mondays at 03:00."
INTERVAL_HELP = "Or run every this many seconds (leave the cron expression blank)."
MARGIN_HELP = (
    "How much the challenger must beat the champion by, in the task metric's units "
    "(0.01 is one accuracy point)."
)
STAGES_HELP = (
    'A JSON list of stages as in a job: [{"name": "finetune", "settings": {...}}, ...]. Settings '
    "ending in dataset_id may be left out: each run fills them with the schedule's dataset."
)
EXAMPLE_STAGES = [
    {"name": "finetune", "settings": {"epochs": 3}},
    {"name": "quantize", "settings": {"mode": "int8_static"}},
    {"name": "compile", "settings": {"backend": "onnxruntime"}},
    {"name": "evaluate", "settings": {}},
]
SPLITS = [("test", "test"), ("validation", "validation"), ("train", "train")]


class TemplateChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: PipelineTemplate) -> str:
        return f"{obj.name}: {' → '.join(obj.stage_names)}"


class ScheduleForm(forms.Form):
    """A schedule's settings; the model decides the team, and the template must be that team's."""

    name = forms.CharField(max_length=100, required=False, help_text="Blank: “<model> retraining”.")
    model = forms.ModelChoiceField(queryset=RegisteredModel.objects.none())
    template = TemplateChoiceField(queryset=PipelineTemplate.objects.none())
    dataset_name = forms.ChoiceField(
        label="Training dataset", help_text="Each run takes this dataset's newest version."
    )
    eval_split = forms.ChoiceField(
        label="Evaluation split",
        choices=SPLITS,
        initial="test",
        help_text="Champion and challenger are both scored on this split.",
    )
    pool = PoolChoiceField(queryset=ServingPool.objects.select_related("profile"))
    cron = forms.CharField(
        label="Cron expression", max_length=100, required=False, help_text=CRON_HELP
    )
    interval_seconds = forms.IntegerField(
        label="Interval (seconds)", min_value=1, required=False, help_text=INTERVAL_HELP
    )
    margin = forms.FloatField(initial=0.0, help_text=MARGIN_HELP)
    enabled = forms.BooleanField(
        required=False, initial=True, help_text="Unchecked: paused, beat does not run it."
    )

    def __init__(self, *args, user, schedule: Schedule | None = None, **kwargs) -> None:
        if schedule is not None and "initial" not in kwargs:
            kwargs["initial"] = initial_for(schedule)
        super().__init__(*args, **kwargs)
        teams = teams_for(user)
        self.fields["model"].queryset = scoped(RegisteredModel.objects.all(), teams).order_by(
            "name"
        )
        self.fields["template"].queryset = scoped(PipelineTemplate.objects.all(), teams)
        names = scoped(Dataset.objects.all(), teams).values_list("name", flat=True)
        choices = sorted(set(names) | ({schedule.dataset_name} if schedule else set()))
        self.fields["dataset_name"].choices = [(n, n) for n in choices]
        self.fields["cron"].widget.attrs.update(placeholder="0 3 * * *", autocomplete="off")

    def clean(self) -> dict:
        data = super().clean()
        model, template = data.get("model"), data.get("template")
        if model is not None and template is not None and model.team_id != template.team_id:
            self.add_error("template", "This template belongs to another team than the model.")
        return data

    def schedule_fields(self) -> dict:
        """The cleaned data as create_schedule / update_schedule keywords (name left out)."""
        data = self.cleaned_data
        return {
            "model": data["model"],
            "template": data["template"],
            "dataset_name": data["dataset_name"],
            "eval_split": data["eval_split"],
            "pool": data["pool"],
            "cron": data["cron"].strip(),
            "interval_seconds": data["interval_seconds"],
            "margin": data["margin"],
            "enabled": data["enabled"],
        }


def initial_for(schedule: Schedule) -> dict:
    return {
        "name": schedule.name,
        "model": schedule.model_id,
        "template": schedule.template_id,
        "dataset_name": schedule.dataset_name,
        "eval_split": schedule.eval_split,
        "pool": schedule.pool_id,
        "cron": schedule.cron,
        "interval_seconds": schedule.interval_seconds,
        "margin": schedule.margin,
        "enabled": schedule.enabled,
    }


class TemplateForm(forms.Form):
    """A template's name and its stages as JSON; the service checks the stages themselves.

    A new template asks for its team only when the user is in several.
    """

    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(max_length=100)
    description = forms.CharField(max_length=300, required=False)
    stages = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 14, "spellcheck": "false"}), help_text=STAGES_HELP
    )

    def __init__(self, *args, user, template: PipelineTemplate | None = None, **kwargs) -> None:
        if "initial" not in kwargs:
            stages = template.stages if template is not None else EXAMPLE_STAGES
            kwargs["initial"] = {"stages": json.dumps(stages, indent=2)}
            if template is not None:
                kwargs["initial"].update(name=template.name, description=template.description)
        super().__init__(*args, **kwargs)
        teams = list(teams_for(user).order_by("name"))
        self.fields["team"].queryset = teams_for(user).order_by("name")
        # An edit keeps its team, and a member of one team never picks it.
        if template is not None or len(teams) == 1:
            del self.fields["team"]
            self.team = template.team if template is not None else teams[0]
        else:
            self.team = None

    def clean_stages(self) -> list[dict]:
        try:
            stages = json.loads(self.cleaned_data["stages"])
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}.") from None
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise forms.ValidationError('Give a JSON list of objects: [{"name": ...}, ...].')
        return stages

    def chosen_team(self):
        return self.team or self.cleaned_data["team"]
