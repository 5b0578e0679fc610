"""The finetune stage on the demo digits classifier: schedule, loop, precision, resume."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipelines.core import (
    Artifact,
    Cancelled,
    DatasetRef,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageStatus,
    TensorSpec,
)
from pipelines.datasets import load_split, split_indices
from pipelines.demo import DIGITS_INPUT, build_digits_classifier, write_digits_dataset
from pipelines.finetuning.checkpoints import CHECKPOINT_FILENAME, load_checkpoint, save_checkpoint
from pipelines.finetuning.precision import resolve_precision
from pipelines.finetuning.schedule import (
    make_scheduler,
    optimizer_steps_per_epoch,
    warmup_steps_for,
)
from pipelines.finetuning.settings import FinetuneSettings
from pipelines.onnx_io import cpu_session
from pipelines.pipeline import run_pipeline
from pipelines.stages import REGISTRY, default_pipeline, validate_pipeline
from pipelines.stages.finetune import Finetune

STAGE = "02-finetune"
DATASET = "7"
# Fast defaults: one epoch of plain fp32 (bf16 has its own test).
QUICK: dict[str, Any] = {"dataset_id": int(DATASET), "epochs": 1, "mixed_precision": "no"}


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo classifier trained for 3 epochs only, so fine-tuning has room to improve it."""
    path = tmp_path_factory.mktemp("finetune") / "digits.pt"
    build_digits_classifier(path, epochs=3, seed=0)
    return path


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DatasetRef]:
    """The digits as a CSV and as an npz dataset, 80/10/10 split."""
    root = tmp_path_factory.mktemp("digits-data")
    refs = {}
    for fmt in ("csv", "npz"):
        path = root / f"digits.{fmt}"
        write_digits_dataset(path, fmt)
        refs[fmt] = DatasetRef(id=DATASET, path=str(path), format=fmt, target="label")
    return refs


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained digits MLP with dropout: its training depends on torch's RNG."""
    torch.manual_seed(5)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 10)
    )
    path = tmp_path_factory.mktemp("finetune-dropout") / "dropout.pt"
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="session")
def noisy_train_data(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    """The digits with the train split's labels shifted by one: training on them hurts."""
    path = tmp_path_factory.mktemp("digits-noisy") / "digits.npz"
    write_digits_dataset(path, "npz")
    with np.load(path) as arrays:
        x, y = arrays["input"], arrays["label"].copy()
    ref = DatasetRef(id=DATASET, path=str(path), format="npz", target="label")
    train = split_indices(len(y), ref.splits, int(ref.splits["seed"]))["train"]
    y[train] = (y[train] + 1) % 10
    with path.open("wb") as f:
        np.savez(f, input=x, label=y)
    return ref


@pytest.fixture
def make_ctx(
    tmp_path: Path,
    digits_model: Path,
    dropout_model: Path,
    digits_data: dict[str, DatasetRef],
    noisy_train_data: DatasetRef,
) -> Callable[..., PipelineContext]:
    """A fresh context over the digits model, with the digits dataset as dataset 7."""
    counter = iter(range(1_000))

    def make(
        task: str = "classification", fmt: str = "npz", model: str = "digits"
    ) -> PipelineContext:
        workdir = tmp_path / f"work{next(counter)}"
        workdir.mkdir()
        ref = noisy_train_data if fmt == "noisy" else digits_data[fmt]
        source = Artifact(
            key="input",
            path=str(dropout_model if model == "dropout" else digits_model),
            format="torchscript",
            precision="fp32",
            inputs=list(DIGITS_INPUT),
            outputs=[],
        )
        return PipelineContext.start(workdir, source, task=task, datasets={DATASET: ref})

    return make


@pytest.fixture
def optimizer_steps() -> Iterator[list[float]]:
    """Every optimizer step taken while the test runs: the global L2 norm of its gradients."""
    norms: list[float] = []

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    yield norms
    handle.remove()


def accuracy_of_torchscript(path: str, x: np.ndarray, y: np.ndarray) -> float:
    model = torch.jit.load(path).eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


# -- the schedule ---------------------------------------------------------------------------------


def test_it_warms_up_linearly_then_decays_on_a_cosine_to_zero() -> None:
    total, base = 100, 0.5
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=base)
    scheduler = make_scheduler(optimizer, total, warmup_ratio=0.1)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = warmup_steps_for(total, 0.1)
    assert warmup == 10

    rise = np.diff(lrs[: warmup + 1])
    assert np.all(rise > 0) and np.allclose(rise, rise[0])  # linear warm-up
    assert lrs[0] > 0  # no step is wasted at LR 0
    assert lrs[warmup] == pytest.approx(base)  # the peak, where the cosine starts
    decay = np.array(lrs[warmup:])
    assert np.all(np.diff(decay) < 0)
    # Half-way through the decay the cosine is at half the peak, and it ends near 0.
    assert decay[len(decay) // 2] == pytest.approx(base / 2, rel=0.05)
    assert lrs[-1] < base * 0.005
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step


def test_it_counts_a_last_partial_accumulation_group_as_a_step() -> None:
    assert optimizer_steps_per_epoch(1438, 32, 1) == 45
    assert optimizer_steps_per_epoch(1438, 16, 2) == 45
    assert optimizer_steps_per_epoch(100, 10, 3) == 4  # 10 micro-batches: 3 + 3 + 3 + 1


# -- settings and refusals ------------------------------------------------------------------------


def test_it_is_registered_needs_a_dataset_and_is_not_in_default_pipelines() -> None:
    assert REGISTRY["finetune"] is Finetune
    with pytest.raises(StageConfigError, match="dataset_id"):
        validate_pipeline("torchscript", [{"name": "finetune"}])
    planned = validate_pipeline(
        "torchscript",
        [{"name": "finetune", "settings": {"dataset_id": 3}}, {"name": "quantize"}],
    )
    assert [p.name for p in planned] == ["finetune", "quantize"]  # it leaves an ONNX model
    with pytest.raises(StageConfigError, match="needs a torchscript model"):
        validate_pipeline("onnx", [{"name": "finetune", "settings": {"dataset_id": 3}}])
    for fmt in ("torchscript", "onnx"):
        assert "finetune" not in [s["name"] for s in default_pipeline(fmt)]
    with pytest.raises(StageConfigError, match="learning_rat"):
        validate_pipeline(
            "torchscript", [{"name": "finetune", "settings": {"dataset_id": 3, "learning_rat": 1}}]
        )


def test_it_refuses_fp16_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="fp16"):
        FinetuneSettings(dataset_id=1, device="cpu", mixed_precision="fp16")
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("auto", "cpu").mode == "bf16"
    assert resolve_precision("no", "cpu").autocast_dtype is None


def test_it_refuses_fp16_on_the_cpu_at_run_time_too(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    if torch.cuda.is_available():
        pytest.skip("device auto resolves to the GPU here")
    ctx = make_ctx()
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        Finetune().run(ctx, STAGE, {**QUICK, "mixed_precision": "fp16"}, noop)


def test_it_refuses_label_smoothing_for_regression(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    ctx = make_ctx(task="regression")
    with pytest.raises(PipelineError, match="label_smoothing applies to classification only"):
        Finetune().run(ctx, STAGE, {**QUICK, "label_smoothing": 0.1}, noop)
    assert not (ctx.workdir / STAGE / "model.pt").exists()


def test_it_refuses_a_model_without_a_task(make_ctx: Callable[..., PipelineContext]) -> None:
    ctx = make_ctx(task="other")
    with pytest.raises(PipelineError, match="fine-tuning needs a task"):
        Finetune().run(ctx, STAGE, QUICK, noop)


def test_it_names_a_dataset_the_job_was_not_given(make_ctx: Callable[..., PipelineContext]) -> None:
    ctx = make_ctx()
    with pytest.raises(PipelineError, match="dataset 99"):
        Finetune().run(ctx, STAGE, {**QUICK, "dataset_id": 99}, noop)


# -- training -------------------------------------------------------------------------------------


def test_it_improves_an_undertrained_digits_classifier_and_adds_both_artifacts(
    make_ctx: Callable[..., PipelineContext], digits_data: dict[str, DatasetRef]
) -> None:
    ctx = make_ctx(fmt="csv")
    messages: list[str] = []
    result = Finetune().run(
        ctx,
        STAGE,
        {"dataset_id": 7, "epochs": 4, "checkpoint_every_steps": 20},
        lambda fraction, message: messages.append(message),
    )

    assert result.status is StageStatus.SUCCEEDED
    assert result.outputs == [f"{STAGE}.torchscript", STAGE]
    torchscript, exported = (ctx.artifacts[key] for key in result.outputs)
    assert torchscript.format == "torchscript" and torchscript.parent == "input"
    assert exported.format == "onnx" and exported.parent == torchscript.key
    assert ctx.current == exported.key  # quantize / compile / benchmark follow the export
    assert torchscript.precision == exported.precision == "fp32"
    assert torchscript.produced_by == exported.produced_by == "finetune"
    assert exported.meta["settings"] == torchscript.meta["settings"]  # what a retry compares

    metrics = result.metrics
    assert metrics["best_val_accuracy"] > metrics["initial_val_accuracy"]
    assert metrics["epochs"] == 4 and metrics["stopped_early"] == 0
    assert metrics["steps"] == 4 * optimizer_steps_per_epoch(1438, 32, 1)

    # On the held-out test split, measured here on both files: better than the input model.
    test = load_split(digits_data["csv"], "test", DIGITS_INPUT)
    x, y = test.inputs["input"], np.asarray(test.targets)
    before = accuracy_of_torchscript(ctx.artifacts["input"].path, x, y)
    after = accuracy_of_torchscript(torchscript.path, x, y)
    logits = cpu_session(exported.path).run(None, {"input": x})[0]
    assert after > before
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(after, abs=1 / len(y))
    print(f"test accuracy before {before:.4f} after {after:.4f}")

    # One history entry per epoch with the validation metrics, plus checkpoint-interval losses.
    epochs = [h for h in result.history if "val_accuracy" in h["metrics"] and h["step"] > 0]
    assert len(epochs) == 4
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(epochs[-1]["metrics"])
    assert any(set(h["metrics"]) == {"train_loss", "lr"} for h in result.history)
    assert any(re.match(r"epoch 2/4 step \d+/180 loss [\d.]+ lr ", m) for m in messages)
    assert any(re.match(r"epoch 4/4 val_accuracy [\d.]+ \(best [\d.]+\)", m) for m in messages)
    # Finished: the checkpoint is gone, and the state says so.
    assert not (ctx.workdir / STAGE / CHECKPOINT_FILENAME).exists()
    assert ctx.state[STAGE]["completed"] is True


def test_it_takes_as_many_optimizer_steps_with_accumulation_2_of_16_as_with_batch_32(
    make_ctx: Callable[..., PipelineContext], optimizer_steps: list[float]
) -> None:
    Finetune().run(make_ctx(), STAGE, {**QUICK, "batch_size": 32}, noop)
    plain = len(optimizer_steps)
    optimizer_steps.clear()
    result = Finetune().run(
        make_ctx(), STAGE, {**QUICK, "batch_size": 16, "gradient_accumulation_steps": 2}, noop
    )
    assert plain == len(optimizer_steps) == 45
    assert result.metrics["steps"] == 45
    optimizer_steps.clear()
    Finetune().run(make_ctx(), STAGE, {**QUICK, "batch_size": 16}, noop)
    assert len(optimizer_steps) == 90  # without accumulation: one step per micro-batch


def test_it_clips_gradients_to_max_grad_norm(
    make_ctx: Callable[..., PipelineContext], optimizer_steps: list[float]
) -> None:
    limit = 0.05
    result = Finetune().run(make_ctx(), STAGE, {**QUICK, "max_grad_norm": limit}, noop)
    assert len(optimizer_steps) == 45
    assert max(optimizer_steps) <= limit * (1 + 1e-4)  # what the optimizer saw was clipped
    assert result.metrics["clipped_steps"] == 45

    optimizer_steps.clear()
    result = Finetune().run(make_ctx(), STAGE, {**QUICK, "max_grad_norm": 0}, noop)
    assert max(optimizer_steps) > limit  # the same run unclipped goes over it
    assert result.metrics["clipped_steps"] == 0


def test_it_trains_under_bf16_autocast_on_the_cpu(make_ctx: Callable[..., PipelineContext]) -> None:
    ctx = make_ctx()
    result = Finetune().run(ctx, STAGE, {**QUICK, "mixed_precision": "bf16", "device": "cpu"}, noop)
    torchscript = ctx.artifacts[f"{STAGE}.torchscript"]
    assert torchscript.meta["mixed_precision"] == "bf16"
    assert torchscript.meta["train_output_dtype"] == "bfloat16"  # the forward really ran in bf16
    assert result.metrics["best_val_accuracy"] >= result.metrics["initial_val_accuracy"]
    saved = torch.jit.load(torchscript.path)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}  # the model stays fp32

    plain = make_ctx()
    Finetune().run(plain, STAGE, QUICK, noop)
    assert plain.artifacts[f"{STAGE}.torchscript"].meta["train_output_dtype"] == "float32"


def test_it_stops_early_when_validation_cannot_improve(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    # LR 0: the weights never change, so the first epoch's accuracy is never beaten.
    result = Finetune().run(
        make_ctx(),
        STAGE,
        {**QUICK, "epochs": 6, "learning_rate": 0.0, "early_stopping_patience": 2},
        noop,
    )
    assert result.metrics["stopped_early"] == 1
    assert result.metrics["epochs"] == 3  # the best epoch, then two without improvement
    assert result.metrics["best_epoch"] == 1
    assert result.metrics["steps"] == 3 * 45
    assert result.metrics["best_val_accuracy"] == result.metrics["initial_val_accuracy"]
    assert "stopped early" in result.message


def test_it_saves_the_best_epochs_weights_not_the_last(
    make_ctx: Callable[..., PipelineContext], digits_data: dict[str, DatasetRef]
) -> None:
    # Wrong train labels: every epoch learns them better, so validation gets worse each epoch.
    ctx = make_ctx(fmt="noisy")
    result = Finetune().run(
        ctx, STAGE, {**QUICK, "epochs": 3, "learning_rate": 0.001, "warmup_ratio": 0.0}, noop
    )
    per_epoch = [
        h["metrics"]["val_accuracy"]
        for h in result.history
        if h["step"] > 0 and "val_accuracy" in h["metrics"]
    ]
    assert result.metrics["best_epoch"] == 1 and per_epoch[0] > per_epoch[-1]
    validation = load_split(digits_data["npz"], "validation", DIGITS_INPUT)
    saved = accuracy_of_torchscript(
        ctx.artifacts[f"{STAGE}.torchscript"].path,
        validation.inputs["input"],
        np.asarray(validation.targets),
    )
    assert saved == pytest.approx(result.metrics["best_val_accuracy"])
    assert saved == pytest.approx(per_epoch[0]) and saved != pytest.approx(per_epoch[-1])


@pytest.mark.parametrize("task", ["regression", "embedding"])
def test_it_fine_tunes_regression_and_embedding_models(tmp_path: Path, task: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 4))).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, target=y)
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(8, 4)).save(str(model))
    source = Artifact(
        key="input",
        path=str(model),
        format="torchscript",
        precision="fp32",
        inputs=[TensorSpec("x", ["batch", 8], "float32")],
        outputs=[],
    )
    ref = DatasetRef(id="1", path=str(data), format="npz", target="target")
    ctx = PipelineContext.start(tmp_path / "work", source, task=task, datasets={"1": ref})
    (tmp_path / "work").mkdir()
    result = Finetune().run(
        ctx,
        STAGE,
        {
            "dataset_id": 1,
            "epochs": 5,
            "batch_size": 16,
            "learning_rate": 0.05,
            "mixed_precision": "no",
        },
        noop,
    )
    metric = "val_mse" if task == "regression" else "val_cosine"
    best, initial = result.metrics[f"best_{metric}"], result.metrics[f"initial_{metric}"]
    if task == "regression":
        assert best < initial * 0.5
    else:
        assert best > max(initial, 0.0) + 0.2
    assert ctx.current_artifact.format == "onnx"


# -- checkpoints and resuming ---------------------------------------------------------------------


def test_it_resumes_from_its_checkpoint_after_a_cancel(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    settings = {**QUICK, "epochs": 2, "checkpoint_every_steps": 10}
    # Dropout: an exact match with an uninterrupted run needs the RNG state restored too.
    ctx = make_ctx(model="dropout")

    def cancel_after_step_30(fraction: float, message: str) -> None:
        if ctx.state.get(STAGE, {}).get("step", 0) >= 30:
            raise Cancelled()

    with pytest.raises(Cancelled):
        Finetune().run(ctx, STAGE, settings, cancel_after_step_30)

    # The checkpoint of step 30 (mid-epoch 1 of 45 steps) is on disk and recorded in the state.
    assert ctx.state[STAGE]["step"] == 30 and ctx.state[STAGE]["batch_in_epoch"] == 30
    checkpoint = Path(ctx.state[STAGE]["checkpoint"])
    assert checkpoint == ctx.workdir / STAGE / CHECKPOINT_FILENAME and checkpoint.is_file()
    payload = torch.load(checkpoint, weights_only=True)  # plain data, no pickled objects
    assert payload["state"]["global_step"] == 30
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "rng", "best_state"}
    assert payload["scheduler"]["last_epoch"] == 30
    assert payload["rng"]["cpu"].dtype == torch.uint8
    assert f"{STAGE}.torchscript" not in ctx.artifacts

    # A new worker: the context as saved on disk, and the stage run again.
    again = PipelineContext.load(ctx.workdir)
    assert again is not None and again.state[STAGE]["step"] == 30
    messages: list[str] = []
    result = Finetune().run(again, STAGE, settings, lambda f, m: messages.append(m))

    assert any(m.startswith("resuming from step 30") for m in messages)
    steps = [int(s) for m in messages for s in re.findall(r"^epoch \d/2 step (\d+)/", m)]
    assert steps[0] == 31 and steps[-1] == 90  # it went on from step 31, not from step 1
    assert result.metrics["resumed_from_step"] == 30 and result.metrics["steps"] == 90
    assert again.state[STAGE]["resumed_from_step"] == 30
    assert result.outputs == [f"{STAGE}.torchscript", STAGE] and again.current == STAGE
    assert [h["step"] for h in result.history] == [0, 10, 20, 30, 40, 45, 50, 60, 70, 80, 90]

    # The same data order and RNG: the resumed model is the one an uninterrupted run makes.
    straight = make_ctx(model="dropout")
    Finetune().run(straight, STAGE, settings, noop)
    resumed = torch.jit.load(again.artifacts[f"{STAGE}.torchscript"].path).state_dict()
    uninterrupted = torch.jit.load(straight.artifacts[f"{STAGE}.torchscript"].path).state_dict()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value)


def test_it_starts_over_when_the_checkpoint_was_made_with_other_settings(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    ctx = make_ctx()
    settings = {**QUICK, "checkpoint_every_steps": 10}

    def cancel_at_step_20(fraction: float, message: str) -> None:
        if ctx.state.get(STAGE, {}).get("step", 0) >= 20:
            raise Cancelled()

    with pytest.raises(Cancelled):
        Finetune().run(ctx, STAGE, settings, cancel_at_step_20)
    messages: list[str] = []
    result = Finetune().run(
        ctx, STAGE, {**settings, "learning_rate": 5e-4}, lambda f, m: messages.append(m)
    )
    assert result.metrics["resumed_from_step"] == 0 and result.metrics["steps"] == 45
    assert any("ignoring a checkpoint" in m for m in messages)
    assert not any(m.startswith("resuming") for m in messages)


def test_it_writes_checkpoints_atomically_and_loads_only_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "stage" / CHECKPOINT_FILENAME
    save_checkpoint(path, {"weights": torch.ones(3), "step": 7, "best": None, "h": [{"a": 1.0}]})
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_FILENAME]  # no .tmp left

    # A file holding an arbitrary object (what a tampered checkpoint would be) is refused.
    torch.save({"evil": math.gcd}, path)
    with pytest.raises(PipelineError, match="cannot be read"):
        load_checkpoint(path)


def test_it_is_skipped_by_a_retried_job_once_it_finished(
    make_ctx: Callable[..., PipelineContext],
) -> None:
    ctx = make_ctx()
    planned = validate_pipeline("torchscript", [{"name": "finetune", "settings": QUICK}])
    first = run_pipeline(ctx, planned)
    assert first[0].status is StageStatus.SUCCEEDED
    again = PipelineContext.load(ctx.workdir)
    assert again is not None
    second = run_pipeline(again, planned)
    assert second[0].status is StageStatus.SKIPPED
    assert second[0].outputs == first[0].outputs and again.current == first[0].outputs[-1]
