from __future__ import annotations

import json
import uuid

from django import forms

from r1platform.jobs.launch_fields import SettingField, read_value, setting_fields


def _settings_summary(schema: dict) -> list[dict]:
    """The settings a stage takes, from its JSON schema: name, type, default, description."""
    settings_schema = schema.get("settings") or {}
    rows = []
    for name, prop in (settings_schema.get("properties") or {}).items():
        kind = prop.get("type")
        if kind is None and "anyOf" in prop:
            options = [
                p.get("type") or p.get("$ref", "?").rsplit("/", 1)[-1] for p in prop["anyOf"]
            ]
            kind = " | ".join(str(o) for o in options)
        if kind is None and "enum" in prop:
            kind = " | ".join(str(e) for e in prop["enum"])
        rows.append(
            {
                "name": name,
                "type": kind or "",
                "default": json.dumps(prop["default"]) if "default" in prop else "",
                "description": prop.get("description", ""),
            }
        )
    return rows


# The order stages run in when several are checked; a stage not listed runs after these, in the
# order stage_schemas() gives. finetune works on TorchScript and hands on ONNX, so it comes first.
# from_gguf turns a GGUF upload into a checkpoint, so it comes before everything.
PIPELINE_ORDER = (
    "from_gguf",
    "finetune",
    "export_onnx",
    "quantize",
    "compile",
    "evaluate",
    "benchmark",
)


def pipeline_order(schemas: list[dict]) -> list[dict]:
    """``schemas`` sorted into the order their stages run in (see PIPELINE_ORDER)."""
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    return sorted(schemas, key=lambda s: rank.get(s["name"], len(rank)))


def dataset_settings(schema: dict) -> list[dict]:
    """The settings of a stage that name a dataset (their names end in ``dataset_id``)."""
    settings_schema = schema.get("settings") or {}
    required = set(settings_schema.get("required") or [])
    return [
        {"name": name, "required": name in required, "description": prop.get("description", "")}
        for name, prop in (settings_schema.get("properties") or {}).items()
        if name.endswith("dataset_id")
    ]


def dataset_label(dataset) -> str:
    """How a dataset reads in a picker: ``digits v2 (1,797 rows, csv)``."""
    kind = (dataset.schema or {}).get("text_kind")
    fmt = f"{dataset.format} {kind}" if kind else dataset.format
    return f"{dataset.name} v{dataset.version} ({dataset.rows:,} rows, {fmt})"


class LaunchForm(forms.Form):
    """One row per known stage: an include box and its settings as JSON, in pipeline order.

    ``schemas`` is ``pipelines.stages.stage_schemas()``; ``defaults`` is the default pipeline of
    the version's format, which decides the pre-checked rows and their prefilled settings.
    ``datasets`` are the team's datasets: every setting whose name ends in ``dataset_id`` gets a
    picker of them, and the chosen id is written into that stage's settings.
    """

    # Blank is allowed: launch_job then makes a key of its own.
    idempotency_key = forms.CharField(max_length=100, required=False, widget=forms.HiddenInput)

    def __init__(
        self,
        *args,
        schemas: list[dict],
        defaults: list[dict],
        datasets=(),
        unfit_datasets=(),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.schemas = pipeline_order(schemas)
        self.datasets = list(datasets)
        # The team's datasets that cannot feed this model, with the reason: shown, not offered.
        self.unfit_datasets = [(dataset_label(d), reason) for d, reason in unfit_datasets]
        self.setting_fields: dict[str, list[SettingField]] = {}
        if not self.is_bound:
            # A fresh key per rendered form: a double click posts the same key, so one job.
            self.initial["idempotency_key"] = uuid.uuid4().hex
        default_settings: dict[str, dict] = {}
        for stage in defaults:
            default_settings.setdefault(stage["name"], stage.get("settings") or {})
        for schema in self.schemas:
            name = schema["name"]
            pickers = {d["name"] for d in dataset_settings(schema)}
            # The pickers show the dataset settings; the JSON holds the others.
            prefilled = {
                k: v for k, v in default_settings.get(name, {}).items() if k not in pickers
            }
            self.fields[f"include_{name}"] = forms.BooleanField(
                required=False, initial=name in default_settings, label=name
            )
            # A field per plain setting; the JSON box holds what has no field (objects).
            generated = setting_fields(schema, prefilled)
            self.setting_fields[name] = generated
            for item in generated:
                self.fields[self._setting(name, item.setting)] = item.field
            covered = {item.setting for item in generated}
            self.fields[f"settings_{name}"] = forms.CharField(
                required=False,
                label=f"{name} settings",
                initial=json.dumps(
                    {k: v for k, v in prefilled.items() if k not in covered}, indent=2
                ),
                widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "class": "mono"}),
            )
            for setting in dataset_settings(schema):
                self.fields[self._picker(name, setting["name"])] = self._dataset_field(
                    setting, default_settings.get(name, {}).get(setting["name"])
                )

    @staticmethod
    def _picker(stage: str, setting: str) -> str:
        return f"dataset_{stage}_{setting}"

    @staticmethod
    def _setting(stage: str, setting: str) -> str:
        return f"set_{stage}_{setting}"

    def _dataset_field(self, setting: dict, initial) -> forms.Field:
        choices = [(d.pk, dataset_label(d)) for d in self.datasets]
        if not setting["required"]:
            choices.insert(0, ("", "— none —"))
        # Never required as a field: it only counts when its stage is included (see clean).
        return forms.TypedChoiceField(
            choices=choices,
            coerce=int,
            empty_value=None,
            required=False,
            initial=initial,
            label=setting["name"],
            help_text=setting["description"],
        )

    @property
    def stage_rows(self) -> list[dict]:
        return [
            {
                "schema": schema,
                "include": self[f"include_{schema['name']}"],
                "settings": self[f"settings_{schema['name']}"],
                "settings_help": _settings_summary(schema),
                # Open when it holds something or has an error: never hide what will be sent.
                "advanced_open": self._advanced_open(schema["name"]),
                "fields": [
                    {
                        "setting": item.setting,
                        "field": self[self._setting(schema["name"], item.setting)],
                    }
                    for item in self.setting_fields[schema["name"]]
                ],
                "datasets": [
                    {**setting, "field": self[self._picker(schema["name"], setting["name"])]}
                    for setting in dataset_settings(schema)
                ],
            }
            for schema in self.schemas
        ]

    def _merge_datasets(self, schema: dict, settings: dict, cleaned: dict) -> bool:
        """Write the picked datasets into ``settings``; False (with an error) if one is missing."""
        name = schema["name"]
        ok = True
        for setting in dataset_settings(schema):
            field = self._picker(name, setting["name"])
            if field in self.errors:
                ok = False
                continue
            chosen = cleaned.get(field)
            if chosen is not None:
                settings[setting["name"]] = chosen
            elif setting["required"] and settings.get(setting["name"]) is None:
                self.add_error(
                    field,
                    f"{name}: choose a dataset for {setting['name']}"
                    + ("" if self.datasets else " (this team has none yet: upload one first)"),
                )
                ok = False
        return ok

    def _advanced_open(self, stage: str) -> bool:
        bound = self[f"settings_{stage}"]
        text = "".join(str(bound.value() or "").split())
        return bool(bound.errors) or text not in ("", "{}")

    def _field_settings(self, stage: str, cleaned: dict) -> dict | None:
        """The settings the stage's fields set (blank ones keep the default); None on an error."""
        out: dict = {}
        for item in self.setting_fields[stage]:
            key = self._setting(stage, item.setting)
            if key in self.errors:
                return None
            try:
                given, value = read_value(item, cleaned.get(key))
            except forms.ValidationError as exc:
                self.add_error(key, exc)
                return None
            if given:
                out[item.setting] = value
        return out

    def clean(self) -> dict:
        cleaned = super().clean()
        stages: list[dict] = []
        for schema in self.schemas:
            name = schema["name"]
            if not cleaned.get(f"include_{name}"):
                # A stale pick on a stage that does not run is no reason to refuse the launch.
                for setting in dataset_settings(schema):
                    self._errors.pop(self._picker(name, setting["name"]), None)
                for item in self.setting_fields[name]:
                    self._errors.pop(self._setting(name, item.setting), None)
                continue
            field = f"settings_{name}"
            raw = (cleaned.get(field) or "").strip() or "{}"
            try:
                settings = json.loads(raw)
            except json.JSONDecodeError as exc:
                self.add_error(
                    field,
                    f"{name}: the settings are not valid JSON "
                    f"({exc.msg} at line {exc.lineno}, column {exc.colno})",
                )
                continue
            if not isinstance(settings, dict):
                self.add_error(
                    field, f'{name}: the settings must be a JSON object, like {{"key": 1}}'
                )
                continue
            from_fields = self._field_settings(name, cleaned)
            if from_fields is None or not self._merge_datasets(schema, settings, cleaned):
                continue
            # The JSON box is for advanced use: what it names wins over the fields.
            stages.append({"name": name, "settings": {**from_fields, **settings}})
        if not self.errors and not stages:
            raise forms.ValidationError("Include at least one stage.")
        cleaned["stages"] = stages
        return cleaned
