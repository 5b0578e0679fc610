"""The launch form's settings as fields generated from each stage's schema, and dataset pickers
that offer only the datasets that fit the model (with the reason for the others)."""

from __future__ import annotations

import uuid

import pytest
from django.urls import reverse

from pipelines.stages import stage_schemas
from r1platform.jobs.launch_fields import read_value, setting_fields
from r1platform.jobs.models import Job
from tests.test_datasets_dashboard import make_dataset, make_version

pytestmark = pytest.mark.usefixtures("enqueued")


def schema(name: str) -> dict:
    return next(s for s in stage_schemas() if s["name"] == name)


def kinds(name: str) -> dict[str, str]:
    return {f.setting: f.kind for f in setting_fields(schema(name), {})}


def test_each_plain_setting_gets_a_field_of_its_kind():
    quantize = kinds("quantize")
    assert quantize["mode"] == "choice"
    assert quantize["per_channel"] == "boolean"  # nullable: blank is "unset"
    assert quantize["min_retention"] == "number" and quantize["calibration_samples"] == "integer"
    assert "calibration_dataset_id" not in quantize  # a picker of its own
    assert "op_types" not in quantize  # a list of strings: JSON only
    assert kinds("benchmark")["batch_sizes"] == "integers"
    certify = kinds("certify")
    assert certify["level"] == "choice"  # an enum behind a $ref
    assert "tolerances" not in certify  # an object: JSON only
    assert "dim_sizes" not in kinds("export_onnx")


def test_fields_carry_the_schema_bounds_defaults_and_help():
    fields = {f.setting: f for f in setting_fields(schema("quantize"), {"mode": "int8_static"})}
    retention = fields["min_retention"].field
    assert retention.max_value == 1.0 and retention.min_value == 0.0
    assert "default: 0.99" in retention.widget.attrs["placeholder"]
    assert "Least fraction" in retention.help_text
    mode = fields["mode"].field
    assert mode.initial == '"int8_static"'
    assert ("", 'default ("int8_dynamic")') in mode.choices
    assert read_value(fields["per_channel"], "false") == (True, False)
    assert read_value(fields["per_channel"], "") == (False, None)


def errors(response) -> list[str]:
    import re

    return re.findall(r'role="alert"[^>]*>(.*?)</', response.content.decode(), re.S)


def launch(client, version, data: dict):
    body = {"idempotency_key": uuid.uuid4().hex, **data}
    return client.post(f"{reverse('jobs:job_new')}?version={version.pk}", body)


def test_fields_fill_the_settings_and_the_json_box_wins(member_client, team):
    version = make_version(team)
    response = launch(
        member_client,
        version,
        {
            "include_quantize": "on",
            "set_quantize_mode": '"int8_dynamic"',
            "set_quantize_per_channel": "true",
            "set_quantize_reduce_range": "false",
            "set_quantize_calibration_samples": "",  # blank: the default, not sent
            "set_quantize_keep_io_types": "",
            "settings_quantize": '{"reduce_range": true}',
            "include_benchmark": "on",
            "set_benchmark_batch_sizes": "1, 8,32",
        },
    )
    assert response.status_code == 302, errors(response)
    quantize, benchmark = Job.objects.get().stages
    # The job keeps the whole validated settings: what was set, and the defaults for the rest.
    assert quantize["settings"]["mode"] == "int8_dynamic"
    assert quantize["settings"]["per_channel"] is True
    assert quantize["settings"]["reduce_range"] is True  # the JSON box won over the field
    assert quantize["settings"]["calibration_samples"] == 256  # blank: the default
    assert benchmark["settings"]["batch_sizes"] == [1, 8, 32]


def test_a_bad_field_value_is_shown_on_its_field(member_client, team):
    version = make_version(team)
    response = launch(
        member_client,
        version,
        {"include_benchmark": "on", "set_benchmark_batch_sizes": "1, eight"},
    )
    assert response.status_code == 400
    assert "whole numbers separated by commas" in response.content.decode()
    out_of_range = launch(
        member_client, version, {"include_quantize": "on", "set_quantize_min_retention": "1.5"}
    )
    assert out_of_range.status_code == 400
    assert "less than or equal to 1.0" in out_of_range.content.decode()
    assert not Job.objects.exists()


def test_only_datasets_that_fit_are_offered_and_the_others_say_why(member_client, team):
    inputs = [{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]
    version = make_version(team, format="torchscript", inputs=inputs)
    fits = make_dataset(team, "digits")
    narrow = make_dataset(
        team, "iris", schema={"columns": [{"name": f"f{i}", "dtype": "float64"} for i in range(4)]}
    )
    page = member_client.get(reverse("jobs:job_new"), {"version": version.pk}).content.decode()
    picker = page.split('name="dataset_finetune_dataset_id"', 1)[1].split("</select>", 1)[0]
    assert f'value="{fits.pk}"' in picker and f'value="{narrow.pk}"' not in picker
    unfit = page.split('data-testid="unfit-datasets"', 1)[1].split("</details>", 1)[0]
    assert "iris v1" in unfit and "64" in unfit  # the reason names the model's 64 features
