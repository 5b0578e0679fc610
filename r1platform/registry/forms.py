from __future__ import annotations

from django import forms

from r1platform.accounts.forms import TeamUploadForm
from r1platform.registry.models import Task

SHAPE_HELP = "TorchScript only: e.g. batch,64 or ids:batch,128:int64;mask:batch,128:int64"


class UploadForm(TeamUploadForm):
    """A new model from one file. The file comes last, so every other field is already parsed
    when the streaming upload handler stops reading an oversized body at the file."""

    missing_file_message = "Choose a model file to upload."
    name = forms.CharField(max_length=100)
    task = forms.ChoiceField(
        choices=Task.choices,
        initial=Task.OTHER,
        help_text="A language model's is text-generation (set so when left at Other).",
    )
    input_shape = forms.CharField(max_length=500, required=False, help_text=SHAPE_HELP)
    input_dtype = forms.CharField(
        max_length=20,
        required=False,
        initial="float32",
        help_text="Of the declared inputs (TorchScript); ONNX files declare their own.",
    )
    file = forms.FileField(
        required=False,
        help_text=(
            "An .onnx file; an ONNX model with external data as a .zip, .tar or .tar.gz of the "
            ".onnx file and its data files; a TorchScript .pt saved with torch.jit.save; a "
            "language model as a .zip or .tar of its Hugging Face checkpoint folder "
            "(config.json, tokenizer, *.safetensors), or a .gguf file."
        ),
    )

    def __init__(self, user, *args, **kwargs) -> None:
        super().__init__(user, *args, **kwargs)
        self.fields["file"].widget.attrs.update(
            accept=".onnx,.zip,.tar,.gz,.tgz,.pt,.pth,.ts,.gguf", required=True
        )

    def clean_input_dtype(self) -> str:
        return self.cleaned_data.get("input_dtype", "").strip() or "float32"
