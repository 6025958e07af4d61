"""Fine-tuning a rewritten model's low-rank factors by distilling the original model (``onnxsvd finetune``).

- :mod:`~onnxsvd.finetune.torch_graph`: the ONNX graph as a torch module (the project's own evaluator).
- :mod:`~onnxsvd.finetune.sites`: the factor pairs of a rewritten model, read from the chain records ``rewrite``
  wrote on its nodes (:mod:`onnxsvd.graph.records`).
- :mod:`~onnxsvd.finetune.forms`: their trainable forms (``core``, ``factors``) and the fold back.
- :mod:`~onnxsvd.finetune.train`: the distillation loop, early stopping and the best checkpoint.
- the ``onnxsvd finetune`` click command lives in :mod:`onnxsvd.cli.finetune`.

torch is imported by the modules that run it, not here, so importing this package needs no torch; each
name below is imported from its module on first use, so the CLI reads :mod:`~onnxsvd.finetune.config`
without loading the training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxsvd.exports import lazy_exports

#: Public name → the module that defines it (imported on first access).
_EXPORTS = {
    "FinetuneConfig": "onnxsvd.finetune.config",
    "EvaluationPoint": "onnxsvd.finetune.report",
    "FinetuneReport": "onnxsvd.finetune.report",
    "FinetuneResult": "onnxsvd.finetune.train",
    "finetune": "onnxsvd.finetune.train",
    "finetune_file": "onnxsvd.finetune.train",
}

__all__ = ["EvaluationPoint", "FinetuneConfig", "FinetuneReport", "FinetuneResult", "finetune", "finetune_file"]

if TYPE_CHECKING:
    from onnxsvd.finetune.config import FinetuneConfig
    from onnxsvd.finetune.report import EvaluationPoint, FinetuneReport
    from onnxsvd.finetune.train import FinetuneResult, finetune, finetune_file


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
