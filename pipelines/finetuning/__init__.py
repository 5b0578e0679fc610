"""Fine-tuning a TorchScript model, the finetune stage's machinery, one concern a module.

* :mod:`.settings`: ``FinetuneSettings`` and the tasks fine-tuning knows;
* :mod:`.data`: the train / validation splits, their targets checked and shaped for the task's
  loss, the loss itself;
* :mod:`.model`: the TorchScript model loaded with its trainable fp32 weights, fed and probed;
* :mod:`.schedule`: warm-up then cosine learning rate, optimizer steps per epoch;
* :mod:`.precision`: the device and the mixed-precision plan;
* :mod:`.checkpoints`: the run's position (``TrainState``), atomic checkpoint files read back
  with ``weights_only=True``, RNG state, and the fingerprint a checkpoint must match to resume;
* :mod:`.trainer`: the run itself: setup, the loop, validation, checkpoint and resume.

The stage (``pipelines.stages.finetune``) sits above this package and adds the saved model and
its ONNX export. Nothing here imports torch at module level, so ``import pipelines.stages`` stays
light enough for the web process.
"""
