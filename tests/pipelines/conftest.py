"""Real, small model files for the pipeline tests, built once per session.

Nothing here needs Django: the pipeline library runs without a server. Models are made under
pytest's temporary directory; tests copy nothing, they only read them (stage outputs go to each
test's own workdir).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.certification import serving_probe
from pipelines.core import Artifact, PipelineContext, TensorSpec
from pipelines.onnx_io import read_tensor_specs


@pytest.fixture(autouse=True)
def no_serving_runtime():
    """pipelines on its own, as ``python -m pipelines`` runs it: no serving runtime registered
    (importing the platform's worker runner registers one for the whole process)."""
    before = serving_probe.registered(), serving_probe.registered_server()
    serving_probe.register(None)
    serving_probe.register_server(None)
    yield
    serving_probe.register(before[0])
    serving_probe.register_server(before[1])


HIDDEN = 256  # big enough that int8 weights dominate the file size, small enough to be instant


class TwoInputs(nn.Module):
    """y = W1 a + W2 b: a model with two named inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(16, 8)
        self.right = nn.Linear(16, 8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.left(a) + self.right(b)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)).eval()


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).eval()


def export_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    dynamic: bool,
) -> Path:
    """Export an eager module with the legacy exporter (what an uploader's script would do)."""
    axes = {name: {0: "batch"} for name in [*input_names, "output"]} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


@dataclass
class ModelFile:
    """A model on disk, the eager module it came from, and its upload artifact."""

    path: Path
    module: nn.Module
    artifact: Artifact

    def fresh_artifact(self) -> Artifact:
        """A copy, so a test can change it (PipelineContext.start rekeys it)."""
        return Artifact.from_dict(
            {
                **self.artifact.__dict__,
                "inputs": [s.__dict__ for s in self.artifact.inputs],
                "outputs": [s.__dict__ for s in self.artifact.outputs],
            }
        )


def _torchscript(module: nn.Module, path: Path, inputs: list[TensorSpec]) -> ModelFile:
    torch.jit.script(module).save(str(path))
    artifact = Artifact(
        key="input",
        path=str(path),
        format="torchscript",
        precision="fp32",
        inputs=inputs,
        outputs=[],
    )
    return ModelFile(path, module, artifact)


def _onnx(module: nn.Module, path: Path) -> ModelFile:
    inputs, outputs = read_tensor_specs(path)
    artifact = Artifact(
        key="input", path=str(path), format="onnx", precision="fp32", inputs=inputs, outputs=outputs
    )
    return ModelFile(path, module, artifact)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def ts_mlp(models_dir: Path) -> ModelFile:
    """TorchScript MLP, input [batch, 64] float32 -> [batch, 10]."""
    torch.manual_seed(0)
    return _torchscript(
        make_mlp(), models_dir / "mlp.pt", [TensorSpec("x", ["batch", 64], "float32")]
    )


@pytest.fixture(scope="session")
def ts_cnn(models_dir: Path) -> ModelFile:
    """TorchScript CNN, input [batch, 1, 8, 8] float32 -> [batch, 10]."""
    torch.manual_seed(1)
    return _torchscript(
        make_cnn(), models_dir / "cnn.pt", [TensorSpec("image", ["batch", 1, 8, 8], "float32")]
    )


@pytest.fixture(scope="session")
def onnx_mlp(models_dir: Path) -> ModelFile:
    """ONNX MLP exported from an eager module, dynamic batch."""
    torch.manual_seed(2)
    module = make_mlp()
    path = export_onnx(module, (torch.randn(2, 64),), models_dir / "mlp.onnx", ["x"], True)
    return _onnx(module, path)


@pytest.fixture(scope="session")
def onnx_fixed_batch(models_dir: Path) -> ModelFile:
    """ONNX MLP whose batch dim is fixed at 1."""
    torch.manual_seed(3)
    module = make_mlp()
    path = export_onnx(module, (torch.randn(1, 64),), models_dir / "fixed.onnx", ["x"], False)
    return _onnx(module, path)


@pytest.fixture(scope="session")
def onnx_two_inputs(models_dir: Path) -> ModelFile:
    """ONNX model with inputs a and b, both [batch, 16]."""
    torch.manual_seed(4)
    module = TwoInputs().eval()
    args = (torch.randn(2, 16), torch.randn(2, 16))
    path = export_onnx(module, args, models_dir / "two.onnx", ["a", "b"], True)
    return _onnx(module, path)


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[[ModelFile], PipelineContext]:
    """A new context in a fresh workdir whose input is the given model."""
    counter = iter(range(1_000))

    def make(model: ModelFile) -> PipelineContext:
        workdir = tmp_path / f"work{next(counter)}"
        workdir.mkdir()
        return PipelineContext.start(workdir, model.fresh_artifact())

    return make


@pytest.fixture(scope="session")
def trained_digits(models_dir: Path) -> ModelFile:
    """The demo digits classifier (trained, ~95% accuracy), TorchScript, input "input" [batch, 64].

    One thread trains a model this small faster than several competing with other processes.
    """
    from pipelines.demo import DIGITS_INPUT, build_digits_classifier

    path = models_dir / "digits.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = build_digits_classifier(path)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.9
    artifact = Artifact(
        key="input",
        path=str(path),
        format="torchscript",
        precision="fp32",
        inputs=list(DIGITS_INPUT),
        outputs=[],
    )
    return ModelFile(path, torch.jit.load(str(path)), artifact)


@pytest.fixture(scope="session")
def digits_labelled_csv(models_dir: Path) -> Path:
    """scikit-learn's digits as a CSV dataset: p0..p63 in 0..1 and an int "label" column."""
    from pipelines.demo import write_digits_dataset

    path = models_dir / "digits.csv"
    write_digits_dataset(path, "csv")
    return path
