"""The launch form's settings fields, generated from each stage's JSON schema, and which of a
team's datasets fit the model.

A setting of a plain type gets a field: a boolean, an integer, a number, a string or one of an
enum, each possibly nullable, and a list of integers (typed as ``1, 8, 32``). Object settings
(``tolerances``, ``dim_sizes``) stay in the JSON box, which is kept for advanced use. A blank field
means the stage's default; a field's value goes into the settings only when it is set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django import forms

from pipelines.core import PipelineError
from pipelines.datasets import check_fits

BLANK = ""


@dataclass(frozen=True)
class SettingField:
    """One generated field: the setting it fills and how to read its cleaned value."""

    setting: str
    field: forms.Field
    kind: str  # boolean | integer | number | string | choice | integers


def _resolve(prop: dict, defs: dict) -> dict:
    ref = prop.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        return {
            **defs.get(ref.rsplit("/", 1)[-1], {}),
            **{k: v for k, v in prop.items() if k != "$ref"},
        }
    return prop


def _kind(prop: dict, defs: dict) -> tuple[str | None, dict]:
    """(kind, the non-null schema) of a property; kind None: JSON only. A nullable setting's
    blank field is its null default, like any other blank field."""
    prop = _resolve(prop, defs)
    options = [_resolve(p, defs) for p in prop.get("anyOf", [])]
    solid = [p for p in options if p.get("type") != "null"]
    core = {**prop, **solid[0]} if len(solid) == 1 else prop
    if options and len(solid) != 1:
        return None, core
    kind = core.get("type")
    if "enum" in core:
        return "choice", core
    if kind in ("boolean", "integer", "number", "string"):
        return kind, core
    if kind == "array" and (core.get("items") or {}).get("type") == "integer":
        return "integers", core
    return None, core


def _default_text(prop: dict) -> str:
    if "default" not in prop or prop["default"] is None:
        return "unset"
    return json.dumps(prop["default"])


def _field(kind: str, core: dict, prop: dict, initial: Any) -> forms.Field:
    help_text = prop.get("description", "")
    default = _default_text(prop)
    common = {"required": False, "help_text": help_text, "label": prop.get("title")}
    if kind == "boolean" or kind == "choice":
        values = [True, False] if kind == "boolean" else list(core["enum"])
        choices = [(BLANK, f"default ({default})")] + [(json.dumps(v), str(v)) for v in values]
        text = json.dumps(initial) if initial is not None else BLANK
        return forms.ChoiceField(choices=choices, initial=text, **common)
    attrs = {"placeholder": f"default: {default}"}
    if kind == "integers":
        text = ", ".join(str(v) for v in initial) if isinstance(initial, list) else BLANK
        attrs["placeholder"] = "e.g. 1, 8, 32" if default == "unset" else attrs["placeholder"]
        return forms.CharField(initial=text, widget=forms.TextInput(attrs=attrs), **common)
    bounds = {}
    for key, arg in (("minimum", "min_value"), ("maximum", "max_value")):
        if key in core:
            bounds[arg] = core[key]
    if kind == "integer":
        return forms.IntegerField(
            initial=initial, widget=forms.NumberInput(attrs=attrs), **bounds, **common
        )
    if kind == "number":
        attrs["step"] = "any"
        return forms.FloatField(
            initial=initial, widget=forms.NumberInput(attrs=attrs), **bounds, **common
        )
    return forms.CharField(initial=initial, widget=forms.TextInput(attrs=attrs), **common)


def setting_fields(schema: dict, prefilled: dict[str, Any]) -> list[SettingField]:
    """A field per plain setting of the stage (dataset ids have their pickers instead)."""
    settings_schema = schema.get("settings") or {}
    defs = settings_schema.get("$defs") or {}
    fields = []
    for name, prop in (settings_schema.get("properties") or {}).items():
        if name.endswith("dataset_id"):
            continue
        kind, core = _kind(prop, defs)
        if kind is None:
            continue
        fields.append(
            SettingField(name, _field(kind, core, _resolve(prop, defs), prefilled.get(name)), kind)
        )
    return fields


def read_value(field: SettingField, value: Any) -> tuple[bool, Any]:
    """(set?, the setting's value) from the field's cleaned value; blank is not set."""
    if value is None or value == BLANK:
        return False, None
    if field.kind in ("boolean", "choice"):
        return True, json.loads(value)
    if field.kind == "integers":
        parts = [p for p in str(value).replace(";", ",").split(",") if p.strip()]
        try:
            return True, [int(p) for p in parts]
        except ValueError:
            raise forms.ValidationError(
                f"{field.setting}: whole numbers separated by commas, like 1, 8, 32"
            ) from None
    return True, value


def split_datasets(datasets, specs, model_format: str) -> tuple[list, list[tuple[Any, str]]]:
    """The datasets that fit a model of ``model_format`` with input ``specs`` (a language model
    reads text datasets only), and the others with the reason."""
    from r1platform.datasets.services import dataset_ref

    fit, unfit = [], []
    for dataset in datasets:
        try:
            check_fits(dataset_ref(dataset), model_format, specs)
        except PipelineError as exc:
            unfit.append((dataset, str(exc)))
        else:
            fit.append(dataset)
    return fit, unfit
