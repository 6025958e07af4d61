"""The validation report (data first, JSON second) and the accuracy gate; :class:`ValidateConfig` is
defined in :mod:`onnxsvd.config` (the CLI reads its defaults without loading the validation code)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxsvd import io
from onnxsvd.config import ValidateConfig
from onnxsvd.errors import OutputError, UsageError, ValidationGateError
from onnxsvd.validate.latency import ProviderTiming
from onnxsvd.validate.metrics import OutputMetrics, finite_or_text
from onnxsvd.validate.profile import SiteFlops, SizeSummary, TimeShare

__all__ = [
    "ValidateConfig",
    "ProviderSpeed",
    "GateResult",
    "ValidationReport",
    "check_gate",
]

@dataclasses.dataclass(frozen=True)
class ProviderSpeed:
    """Latency of both models on one provider, with the speedup bound from the original's profile.

    Attributes:
        timing: the alternating measurement.
        time_share: the rewritten sites' share of the original's node time (``None`` without profiling).
        bound: ``1 / ((1 − s) + s·ρ)`` (``None`` without profiling).
    """

    timing: ProviderTiming
    time_share: TimeShare | None = None
    bound: float | None = None

    @property
    def provider(self) -> str:
        return self.timing.provider

    @property
    def exceeds_bound(self) -> bool:
        """The measured speedup is above the bound: the profile or the timing is off, and a note says so."""
        return self.bound is not None and self.timing.speedup > self.bound

    def bound_note(self) -> str | None:
        """Why a measurement can beat its bound, with the spreads that say which; ``None`` when it does not."""
        if not self.exceeds_bound:
            return None
        timing = self.timing
        text = f"{self.provider}: measured {timing.speedup:.2f}× exceeds the profile bound {self.bound:.2f}×: "
        if self.time_share is not None:
            low, high = self.time_share.share_range
            text += (
                f"the share s = {self.time_share.share:.2f} of the sites was underestimated "
                f"(s {low:.2f}–{high:.2f} over {self.time_share.runs} profiled runs) or "
            )
        return text + (
            f"timing noise (paired speedups p10–p90 {timing.speedup_p10:.2f}–{timing.speedup_p90:.2f}× over "
            f"{timing.iters} runs); more --iters narrow it"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            **self.timing.to_dict(),
            "time_share": self.time_share.to_dict() if self.time_share is not None else None,
            "bound": self.bound,
            "exceeds_bound": self.exceeds_bound,
        }


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The gate's verdict: ``checked`` when a threshold was given; ``failures`` name the worst output."""

    checked: bool = False
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "passed": self.passed, "failures": list(self.failures)}


def check_gate(outputs: Sequence[OutputMetrics], config: ValidateConfig) -> GateResult:
    """Compare the worst output with ``min_cosine`` and ``max_top1_drop``. NaN always fails.

    Raises:
        UsageError: ``max_top1_drop`` is set but no output looks like class scores ``[batch, C]``.
    """
    failures: list[str] = []
    checked = config.min_cosine is not None or config.max_top1_drop is not None
    if config.min_cosine is not None and outputs:
        # NaN sorts first: a NaN output is the worst.
        worst = min(outputs, key=lambda out: -math.inf if math.isnan(out.cosine) else out.cosine)
        if not worst.cosine >= config.min_cosine:
            failures.append(f"output {worst.name!r} cosine {worst.cosine:.4f} < --min-cosine {config.min_cosine:g}")
    if config.max_top1_drop is not None:
        scored = [out for out in outputs if out.top1_drop is not None]
        if not scored:
            names = [out.name for out in outputs]
            raise UsageError(
                f"--max-top1-drop needs an output of class scores [batch, C]; none of {names} is one "
                "(use --min-cosine instead)"
            )
        worst = max(scored, key=lambda out: out.top1_drop or 0.0)
        drop = worst.top1_drop or 0.0
        if drop > config.max_top1_drop:
            if worst.accuracy_original is not None and worst.accuracy_rewritten is not None:
                how = f"accuracy {worst.accuracy_original:.4f} → {worst.accuracy_rewritten:.4f} against labels"
            else:
                how = f"top-1 agreement {worst.top1_agreement:.4f}"
            failures.append(
                f"output {worst.name!r} top-1 drop {drop:.4f} > --max-top1-drop {config.max_top1_drop:g} ({how})"
            )
    return GateResult(checked=checked, failures=tuple(failures))


def _jsonable(value: Any) -> Any:
    """Replace inf/NaN (not JSON) by strings, recursively."""
    if isinstance(value, float):
        return finite_or_text(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


@dataclasses.dataclass
class ValidationReport:
    """Everything ``validate`` measured: accuracy per output, speed per provider, size, FLOPs, the gate.

    Attributes:
        original: path of the original model.
        rewritten: path of the rewritten model.
        data: path of the data.
        samples: samples compared for accuracy.
        batch_size: samples per batch of the accuracy pass (``None``: one batch per file).
        has_labels: the data has ``labels`` and top-1 accuracy was computed.
        accuracy_provider: the provider the accuracy pass ran on.
        outputs: metrics per output, in the model's output order.
        speed: latency and bound per provider.
        flops: FLOPs of the rewritten sites before and after.
        size: parameters and bytes of both models.
        config: the configuration used.
        gate: the gate's verdict.
        notes: anything a reader should know about these numbers.
        seconds: wall time of the whole validation.
        adapter: the ONNX Runtime adapter active on every run of the rewritten model, or ``None``.
    """

    original: str
    rewritten: str
    data: str
    samples: int
    batch_size: int | None
    has_labels: bool
    accuracy_provider: str
    outputs: list[OutputMetrics]
    speed: list[ProviderSpeed]
    flops: SiteFlops
    size: SizeSummary
    config: ValidateConfig
    gate: GateResult = dataclasses.field(default_factory=GateResult)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (inf and NaN written as strings)."""
        return _jsonable(
            {
                "original": self.original,
                "rewritten": self.rewritten,
                "adapter": self.adapter,
                "data": self.data,
                "samples": self.samples,
                "batch_size": self.batch_size,
                "has_labels": self.has_labels,
                "accuracy_provider": self.accuracy_provider,
                "outputs": [output.to_dict() for output in self.outputs],
                "speed": [speed.to_dict() for speed in self.speed],
                "flops": self.flops.to_dict(),
                "size": self.size.to_dict(),
                "config": self.config.to_dict(),
                "gate": self.gate.to_dict(),
                "notes": list(self.notes),
                "seconds": self.seconds,
            }
        )

    def raise_for_gate(self) -> None:
        """Raise :class:`ValidationGateError` (exit code 3) naming the worst output if the gate failed."""
        if not self.gate.passed:
            raise ValidationGateError("validation gate failed: " + "; ".join(self.gate.failures))

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` atomically to ``path``.

        Raises:
            OutputError: the file cannot be written.
        """
        path = Path(path)
        try:
            with io.atomic_path(path, suffix=".json") as temporary:
                temporary.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror or error}; check the path") from error
        return path
