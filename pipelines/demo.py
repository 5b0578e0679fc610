"""The demo model: a small digits classifier trained here, so nothing is downloaded.

scikit-learn ships the 8x8 handwritten digits data set (1,797 images); an MLP reaches about 95%
accuracy on it in a second or two of CPU time.

Tests train the small default (one hidden layer of 128). The demo that ``./r1 up`` seeds uses
``DEMO_HIDDEN`` (two hidden layers of 1024): at 128 wide a batch-32 call costs about 8 us, all of
it call overhead, and INT8 cannot be faster than FP32; at 1024 x 1024 the multiplies dominate and
static INT8 runs in about 0.4x FP32's time at batch 32 on a 2-core CPU (one intra-op thread), so
the demo's INT8 version is one a team would keep.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core import TensorSpec

DIGITS_INPUT = [TensorSpec(name="input", shape=["batch", 64], dtype="float32")]
DEMO_HIDDEN = (1024, 1024)


def build_digits_classifier(
    path: Path, epochs: int = 60, seed: int = 0, hidden: tuple[int, ...] = (128,)
) -> float:
    """Train an MLP on scikit-learn's digits and save it as TorchScript; returns test accuracy.

    It trains only on the rows the platform's default split (0.8/0.1/0.1, seed 0) puts in
    "train", so evaluating it on the digits dataset's validation or test split is held out.
    """
    import torch
    from sklearn.datasets import load_digits

    from pipelines.datasets import split_indices

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    splits = split_indices(len(y), {"train": 0.8, "validation": 0.1, "test": 0.1}, 0)
    train, test = torch.as_tensor(splits["train"]), torch.as_tensor(splits["test"])
    x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    layers: list[torch.nn.Module] = []
    width = 64
    for size in hidden:
        layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
        width = size
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(path))
    return accuracy


def write_digits_dataset(path: Path, fmt: str = "csv") -> int:
    """Write scikit-learn's digits as a dataset file for the demo classifier; returns the rows.

    Pixels are scaled to 0..1 (divided by 16, as the classifier was trained). ``fmt`` "csv" or
    "jsonl": 64 float columns ``p0``..``p63`` and an int ``label`` column; "npz": arrays
    ``input`` [N, 64] float32 and ``label`` [N] int64.
    """
    import json

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"p{i}" for i in range(x.shape[1])]
    if fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            f.write(",".join([*names, "label"]) + "\n")
            for row, label in zip(x, y, strict=True):
                f.write(",".join([*(repr(float(v)) for v in row), str(int(label))]) + "\n")
    elif fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row, label in zip(x, y, strict=True):
                record = {n: float(v) for n, v in zip(names, row, strict=True)}
                record["label"] = int(label)
                f.write(json.dumps(record) + "\n")
    elif fmt == "npz":
        with path.open("wb") as f:  # a file object: np.savez would append .npz to a str path
            np.savez(f, input=x, label=y)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; use csv, jsonl or npz")
    return len(y)


def write_digits_test_cases(path: Path, per_digit: int = 4) -> int:
    """Write the demo's industry test cases for the digits classifier; returns how many.

    The cases are held-out rows (the default split's "test" rows, which the demo classifier never
    trained on), ``per_digit`` of each digit, tagged ``imaging`` and ``digit-<n>``. The first of
    each digit is also tagged ``must`` and checked with ``top_k`` (k 3: the right digit among
    the three most likely, what a downstream reviewer would still catch); the others are
    checked with ``argmax``, so the overall pass rate is the classifier's accuracy on them.
    """
    import json

    import numpy as np
    from sklearn.datasets import load_digits

    from pipelines.datasets import split_indices

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    test = split_indices(len(y), {"train": 0.8, "validation": 0.1, "test": 0.1}, 0)["test"]
    seen: dict[int, int] = {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        for row in test:
            label = int(y[row])
            count = seen.get(label, 0)
            if count >= per_digit:
                continue
            seen[label] = count + 1
            first = count == 0
            case = {
                "name": f"digit-{label}-row-{int(row)}",
                "input": [round(float(v), 4) for v in x[row]],
                "expected": label,
                "check": "top_k" if first else "argmax",
                **({"k": 3} if first else {}),
                "tags": ["imaging", f"digit-{label}", *(["must"] if first else [])],
            }
            f.write(json.dumps(case) + "\n")
            written += 1
    return written
