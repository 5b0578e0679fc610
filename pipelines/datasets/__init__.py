"""Datasets: inspecting an upload without executing it, and feeding its rows to a model.

One concern a module: :mod:`.inspection` (an upload), :mod:`.text` and :mod:`.npz` (reading each
format, checked), :mod:`.splits` (the seeded cut), :mod:`.mapping` (columns onto model inputs),
:mod:`.loading` (a split's rows in a worker); :mod:`.columns` holds what they share. Text datasets
for language models (JSON Lines of strings) are :mod:`.text_rows` (their rules, one parser) and
:mod:`.text_corpus` (loading a split's texts, pairs, chats or test cases; checking an output;
which datasets fit which models). This module only names the public API; the modules import one
another, never this one.

Three formats are accepted (JSON Lines of numbers or of text), decided by the file's content
(the name only words refusals):

* **CSV** (``.csv``): a header row naming the columns, then rows of numbers separated by commas,
  every row with as many cells as the header. Only numbers: class labels must be integers.
* **JSON Lines** (``.jsonl``): one JSON object per line, the same keys on every line; each value
  is a number or a nested list of numbers (the same shape on every line).
* **Text JSON Lines** (``.jsonl``), for language models: rows ``{"text"}``,
  ``{"prompt", "completion"}``, ``{"messages"}`` or test cases ``{"prompt", "expected", "check"}``,
  one kind a file, recognised by the first row's keys; stored as format ``jsonl`` with
  ``schema["text_kind"]`` (see :mod:`.text_corpus`). They fit language models only, and tensor
  datasets fit tensor models only (:func:`check_fits`).
* **Test-case JSON Lines** (``.jsonl``), for tensor models: one case a line,
  ``{"name", "input" | "inputs", "expected", "check", ...}`` (no ``prompt``), stored as format
  ``jsonl`` with ``schema["test_cases"]`` (see :mod:`.tensor_cases`). They are one suite for the
  certification's scenario level (:mod:`pipelines.certification.test_cases`): no stage reads
  their rows.
* **npz** (``.npz``, what ``numpy.savez`` writes): a zip of ``.npy`` arrays that share their first
  dim (the rows). Only numeric and boolean arrays: object arrays need pickle, which runs code, so
  they are refused (read with ``allow_pickle=False`` only, their headers checked first).

:func:`inspect_dataset` runs in the web process on an upload and raises
:class:`~pipelines.formats.RejectedUpload` on anything it cannot read. :func:`load_split` runs in a
worker: it cuts the rows into train/validation/test with the dataset's seed and maps columns (or
arrays) onto the model's inputs; :func:`check_compatible` applies the same mapping rules to the
stored schema alone, so a job that could never run is refused before it is queued.

Mapping rules (one place, :func:`.mapping.plan_inputs`, used by both):

1. The target is ``ref.target``, else the first of ``label``, ``target``, ``y`` present, else none.
2. A model with several inputs reads one column/array per input, named after the input.
3. A one-input model reads, in this order of preference: an npz array or JSON Lines list key
   named after the input, or named ``features``; the single non-target npz array; for CSV and
   JSON Lines, all non-target columns in file order (list values flattened), concatenated.
4. The values of a row are reshaped to the input's non-batch dims (their product must match; one
   named dim is inferred) and cast to the input's dtype.
"""

from __future__ import annotations

from pipelines.datasets.columns import (
    DATASET_FORMATS,
    MAX_DATASET_BYTES,
    SPLITS,
    TARGET_NAMES,
    DatasetInfo,
    SplitData,
    default_target,
)
from pipelines.datasets.inspection import inspect_dataset
from pipelines.datasets.loading import iter_batches, load_split
from pipelines.datasets.mapping import check_compatible
from pipelines.datasets.splits import split_indices
from pipelines.datasets.text_corpus import (
    TEXT_KINDS,
    TestCase,
    check_case,
    check_fits,
    load_cases,
    load_chats,
    load_pairs,
    load_texts,
    text_kind,
)

__all__ = [
    "DATASET_FORMATS",
    "MAX_DATASET_BYTES",
    "SPLITS",
    "TARGET_NAMES",
    "TEXT_KINDS",
    "DatasetInfo",
    "SplitData",
    "TestCase",
    "check_case",
    "check_compatible",
    "check_fits",
    "default_target",
    "inspect_dataset",
    "iter_batches",
    "load_cases",
    "load_chats",
    "load_pairs",
    "load_split",
    "load_texts",
    "split_indices",
    "text_kind",
]
