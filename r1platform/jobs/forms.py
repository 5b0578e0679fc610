from __future__ import annotations

import json
import uuid

from django import forms


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


class LaunchForm(forms.Form):
    """One row per known stage: an include box and its settings as JSON, in pipeline order.

    ``schemas`` is ``pipelines.stages.stage_schemas()``; ``defaults`` is the default pipeline of
    the version's format, which decides the pre-checked rows and their prefilled settings.
    """

    # Blank is allowed: launch_job then makes a key of its own.
    idempotency_key = forms.CharField(max_length=100, required=False, widget=forms.HiddenInput)

    def __init__(self, *args, schemas: list[dict], defaults: list[dict], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.schemas = schemas
        if not self.is_bound:
            # A fresh key per rendered form: a double click posts the same key, so one job.
            self.initial["idempotency_key"] = uuid.uuid4().hex
        default_settings: dict[str, dict] = {}
        for stage in defaults:
            default_settings.setdefault(stage["name"], stage.get("settings") or {})
        for schema in schemas:
            name = schema["name"]
            self.fields[f"include_{name}"] = forms.BooleanField(
                required=False, initial=name in default_settings, label=name
            )
            self.fields[f"settings_{name}"] = forms.CharField(
                required=False,
                label=f"{name} settings",
                initial=json.dumps(default_settings.get(name, {}), indent=2),
                widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "class": "mono"}),
            )

    @property
    def stage_rows(self) -> list[dict]:
        return [
            {
                "schema": schema,
                "include": self[f"include_{schema['name']}"],
                "settings": self[f"settings_{schema['name']}"],
                "settings_help": _settings_summary(schema),
            }
            for schema in self.schemas
        ]

    def clean(self) -> dict:
        cleaned = super().clean()
        stages: list[dict] = []
        for schema in self.schemas:
            name = schema["name"]
            if not cleaned.get(f"include_{name}"):
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
            stages.append({"name": name, "settings": settings})
        if not self.errors and not stages:
            raise forms.ValidationError("Include at least one stage.")
        cleaned["stages"] = stages
        return cleaned
