"""``FinetuneReport``: what a fine-tune did, as data (JSON) first."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from onnxsvd.io import atomic_path

__all__ = ["EvaluationPoint", "FinetuneReport"]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@dataclasses.dataclass
class EvaluationPoint:
    """One held-out evaluation.

    Attributes:
        step: optimisation steps taken before it (0 = the rewritten model as given).
        train_loss: mean training loss over the steps since the previous evaluation (``None`` at step 0).
        heldout_loss: the distillation loss of the model's outputs on the held-out split.
        seconds: wall time since training started.
    """

    step: int
    train_loss: float | None
    heldout_loss: float
    seconds: float


@dataclasses.dataclass
class FinetuneReport:
    """The whole fine-tune.

    Attributes:
        train: ``"core"`` or ``"factors"``.
        config: the configuration, as a dict.
        pairs: factor pairs trained (sites sharing factors count once).
        sites: names of the sites trained.
        skipped: ``{site: reason}`` for factor chains left as they are.
        trainable_parameters: parameters the optimiser updated.
        train_samples: samples used for the steps.
        heldout_samples: samples held out.
        outputs: the model outputs distilled.
        matched_activations: intermediate tensors distilled too (``--match-activations``).
        heldout_before: held-out loss of the rewritten model as given.
        heldout_after: held-out loss of the returned model (never above ``heldout_before``).
        best_step: the step of the checkpoint returned (0: nothing beat the rewritten model, which is
            returned unchanged).
        steps_run: steps taken.
        stopped_early: the held-out loss stopped improving for ``patience`` evaluations.
        history: every held-out evaluation.
        teacher_seconds: time to compute the teacher's outputs.
        train_seconds: time of the training loop, evaluations included.
        device: where it trained.
        notes: anything a reader should know.
    """

    train: str
    config: dict[str, Any]
    pairs: int
    sites: list[str]
    skipped: dict[str, str]
    trainable_parameters: int
    train_samples: int
    heldout_samples: int
    outputs: list[str]
    matched_activations: list[str]
    heldout_before: float
    heldout_after: float
    best_step: int
    steps_run: int
    stopped_early: bool
    history: list[EvaluationPoint]
    teacher_seconds: float
    train_seconds: float
    device: str
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def improvement(self) -> float:
        """Relative reduction of the held-out loss (0 when nothing improved)."""
        if self.heldout_before <= 0.0 or not math.isfinite(self.heldout_before):
            return 0.0
        return 1.0 - self.heldout_after / self.heldout_before

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (a loss that is not finite becomes its text, ``"nan"`` or ``"inf"``)."""
        data = dataclasses.asdict(self)
        data["improvement"] = self.improvement
        return _finite(data)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically as JSON."""
        path = Path(path)
        with atomic_path(path, suffix=".json") as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path
