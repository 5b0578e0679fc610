from __future__ import annotations

from django import forms

from r1platform.accounts.forms import TeamUploadForm
from r1platform.datasets.services import SPLIT_KEYS, DatasetRefused, parse_splits

TARGET_HELP = (
    "The column (CSV, JSON Lines) or array (npz) holding the labels. Blank: the first of "
    "label, target, y the file has, else none (unlabelled data, e.g. for calibration). "
    "Always blank for a text dataset."
)
SEED_HELP = "Rows are shuffled with the seed, then cut: the same seed always gives the same cut."
FILE_HELP = (
    "CSV with a header row (numbers only), JSON Lines (one object per line) or an .npz written "
    "by numpy.savez. Pickles and object arrays are refused. For language models, JSON Lines of "
    'text, one kind a file: {"text": ...}, {"prompt": ..., "completion": ...}, {"messages": '
    '[{"role": ..., "content": ...}]} or test cases {"prompt": ..., "expected": ..., "check": '
    '"exact"|"contains"|"regex"|"json"}.'
)


class DatasetUploadForm(TeamUploadForm):
    """A dataset file and how jobs cut it. The file comes last, so every other field is already
    parsed when the streaming upload handler stops reading an oversized body at the file."""

    missing_file_message = "Choose a dataset file to upload."
    name = forms.CharField(
        max_length=100, help_text="Uploading a name the team already has makes its next version."
    )
    target = forms.CharField(max_length=100, required=False, help_text=TARGET_HELP)
    train = forms.FloatField(min_value=0, max_value=1, initial=0.8)
    validation = forms.FloatField(min_value=0, max_value=1, initial=0.1)
    test = forms.FloatField(min_value=0, max_value=1, initial=0.1)
    # Its help sits under the split fields (see SEED_HELP), not squeezed into a grid cell.
    seed = forms.IntegerField(min_value=0, initial=0)
    file = forms.FileField(required=False, help_text=FILE_HELP)

    def __init__(self, user, *args, **kwargs) -> None:
        super().__init__(user, *args, **kwargs)
        self.fields["target"].widget.attrs.update(autocomplete="off", placeholder="label")
        for key in SPLIT_KEYS:
            self.fields[key].widget.attrs.update(step="0.01")
        self.fields["file"].widget.attrs.update(accept=".csv,.jsonl,.ndjson,.npz", required=True)

    seed_help = SEED_HELP

    @property
    def split_fields(self) -> list[forms.BoundField]:
        return [self[key] for key in (*SPLIT_KEYS, "seed")]

    def clean_name(self) -> str:
        return self.cleaned_data["name"].strip()

    def clean_target(self) -> str:
        return self.cleaned_data.get("target", "").strip()

    def clean(self) -> dict:
        cleaned = super().clean()
        raw = {key: cleaned[key] for key in (*SPLIT_KEYS, "seed") if cleaned.get(key) is not None}
        if len(raw) == len(SPLIT_KEYS) + 1:
            try:
                cleaned["splits"] = parse_splits(raw)
            except DatasetRefused as exc:
                self.add_error(None, f"Splits: {exc}.")
        return cleaned
