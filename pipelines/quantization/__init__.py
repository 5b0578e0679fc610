"""Quantization of ONNX models, the quantize stage's machinery, one concern a module.

* :mod:`.settings`: ``QuantizeSettings`` and the precision rule validate_pipeline follows;
* :mod:`.floats`: fp16 / bf16 conversion;
* :mod:`.int8`: dynamic and static (QDQ) int8, calibration;
* :mod:`.checks`: loading and running what a mode made, through ``pipelines.engines``;
* :mod:`.graph`: saving, node order, counting what changed;
* :mod:`.retention`: a model against its parent on the same rows (shared with evaluate).

Importing this package (or :mod:`.settings`) loads neither onnx nor onnxruntime.
"""
