"""Accuracy metrics between an original model's outputs ``a`` and a rewritten model's ``b``.

Legend: S samples (axis 0), F features of one sample (all other axes flattened), C classes.

Identities computed here, all accumulated in float64 batch by batch:

- max / mean absolute error: ``max|a − b|``, ``Σ|a − b| / (S·F)``.
- relative error: ``‖a − b‖ / ‖a‖`` (Frobenius over everything).
- SQNR: ``10·log10(Σa² / Σ(a − b)²)`` dB; ``+inf`` when ``b == a`` exactly.
- cosine: per sample ``⟨a_s, b_s⟩ / (‖a_s‖·‖b_s‖)``, averaged over samples (and its minimum); the global
  cosine takes all of ``a`` and ``b`` as one vector. Two zero vectors agree (1); one zero vector does not (0).
- class scores (a float output ``[S, C]`` with ``2 ≤ C ≤ 100000``): top-1 agreement ``P(argmax a =
  argmax b)``; top-5 agreement ``P(argmax a ∈ top5(b))`` (only when ``C > 5``); top-1 accuracy of both
  models against labels when given.

This module takes and returns ndarrays and numbers only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = [
    "MAX_CLASSES",
    "OutputMetrics",
    "MetricAccumulator",
    "compare_outputs",
    "looks_like_class_scores",
    "finite_or_text",
]

#: An output ``[S, C]`` with ``2 ≤ C ≤ MAX_CLASSES`` and a float dtype is treated as class scores.
MAX_CLASSES = 100_000
#: ``k`` of the top-k agreement.
TOP_K = 5


def looks_like_class_scores(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """True for a float output ``[S, C]`` with ``2 ≤ C ≤ MAX_CLASSES``."""
    return len(shape) == 2 and 2 <= shape[1] <= MAX_CLASSES and np.dtype(dtype).kind == "f"


def finite_or_text(value: float | None) -> float | str | None:
    """JSON has no inf/NaN: write them as ``"inf"``, ``"-inf"``, ``"nan"``."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


@dataclasses.dataclass(frozen=True)
class OutputMetrics:
    """How far one output of the rewritten model is from the original's.

    Attributes:
        name: output name.
        shape: shape of one batch's output with axis 0 as the number of samples.
        samples: samples compared.
        max_abs: ``max|a − b|``.
        mean_abs: ``mean|a − b|``.
        relative: ``‖a − b‖ / ‖a‖``.
        sqnr_db: ``10·log10(Σa² / Σ(a − b)²)``, ``inf`` when exact.
        cosine: mean over samples of the per-sample cosine.
        cosine_min: the worst sample's cosine.
        cosine_global: cosine of everything as one vector.
        classes: ``C`` when the output looks like class scores, else ``None`` (and the top-k fields too).
        top1_agreement: share of samples with the same argmax.
        top5_agreement: share of samples whose original argmax is in the rewritten top 5 (``C > 5``).
        accuracy_original: top-1 accuracy of the original against labels (``None`` without labels).
        accuracy_rewritten: same for the rewritten model.
        non_finite: NaN or Inf values in the rewritten model's output.
    """

    name: str
    shape: tuple[int, ...]
    samples: int
    max_abs: float
    mean_abs: float
    relative: float
    sqnr_db: float
    cosine: float
    cosine_min: float
    cosine_global: float
    classes: int | None = None
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    accuracy_original: float | None = None
    accuracy_rewritten: float | None = None
    non_finite: int = 0

    @property
    def top1_drop(self) -> float | None:
        """Accuracy lost against labels when there are labels, else ``1 − top-1 agreement``."""
        if self.accuracy_original is not None and self.accuracy_rewritten is not None:
            return self.accuracy_original - self.accuracy_rewritten
        if self.top1_agreement is not None:
            return 1.0 - self.top1_agreement
        return None

    def to_dict(self) -> dict[str, Any]:
        data = {key: finite_or_text(value) if isinstance(value, float) else value
                for key, value in dataclasses.asdict(self).items()}
        data["shape"] = list(self.shape)
        data["top1_drop"] = finite_or_text(self.top1_drop)
        return data


def _cosines(dot: np.ndarray, square_a: np.ndarray, square_b: np.ndarray) -> np.ndarray:
    """Per-sample cosine ``[S]`` from ``⟨a, b⟩``, ``‖a‖²``, ``‖b‖²``; both zero → 1, one zero → 0.

    ``⟨a, b⟩ / sqrt(‖a‖²·‖b‖²)`` rather than ``/ (‖a‖·‖b‖)``: for ``b == a`` it is exactly 1.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        denominator = np.sqrt(square_a * square_b)  # [S]
        cosine = dot / denominator  # [S]; NaN/Inf inputs stay NaN
    cosine = np.where(denominator == 0, 0.0, cosine)
    cosine = np.where((square_a == 0) & (square_b == 0), 1.0, cosine)
    # Rounding can leave |cos| a hair above 1 (NaN stays NaN).
    return np.clip(cosine, -1.0, 1.0)


class MetricAccumulator:
    """Accumulates the metrics of one output over batches; :meth:`result` gives :class:`OutputMetrics`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.samples = 0
        self.elements = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_sq_reference = 0.0  # Σa²
        self.sum_sq_difference = 0.0  # Σ(a − b)²
        self.sum_sq_candidate = 0.0  # Σb²
        self.sum_dot = 0.0  # Σ a·b
        self.sum_cosine = 0.0
        self.min_cosine = math.inf
        self.top1_same = 0
        self.top5_hit = 0
        self.correct_reference = 0
        self.correct_candidate = 0
        self.labelled = 0
        self.non_finite = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add one batch: ``reference`` and ``candidate`` ``[S, ...]`` of the same shape; ``labels`` ``[S]``.

        Raises:
            ValueError: the two shapes differ, or the batch's trailing shape differs from earlier batches.
        """
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(
                f"output {self.name!r} has shape {list(reference.shape)} in the original and "
                f"{list(candidate.shape)} in the rewritten model"
            )
        if self.shape is not None and reference.shape[1:] != self.shape[1:]:
            raise ValueError(f"output {self.name!r} changes shape between batches: {self.shape} → {reference.shape}")
        if self.shape is None:
            self.dtype = reference.dtype
        samples = reference.shape[0] if reference.ndim else 1
        self.shape = (self.samples + samples, *reference.shape[1:])
        a = reference.astype(np.float64).reshape(samples, -1)  # [S, F]
        b = candidate.astype(np.float64).reshape(samples, -1)  # [S, F]
        difference = a - b  # [S, F]
        magnitude = np.abs(difference)  # [S, F]
        self.non_finite += int(np.count_nonzero(~np.isfinite(b)))
        if magnitude.size:
            self.max_abs = float(np.max([self.max_abs, magnitude.max()]))  # NaN propagates
        self.sum_abs += float(magnitude.sum())
        self.elements += magnitude.size
        square_a = np.einsum("sf,sf->s", a, a)  # [S] ‖a_s‖²
        square_b = np.einsum("sf,sf->s", b, b)  # [S] ‖b_s‖²
        dot = np.einsum("sf,sf->s", a, b)  # [S] ⟨a_s, b_s⟩
        self.sum_sq_reference += float(square_a.sum())
        self.sum_sq_candidate += float(square_b.sum())
        self.sum_sq_difference += float(np.einsum("sf,sf->", difference, difference))
        self.sum_dot += float(dot.sum())
        cosine = _cosines(dot, square_a, square_b)  # [S]
        self.sum_cosine += float(cosine.sum())
        if cosine.size:
            self.min_cosine = float(np.min([self.min_cosine, cosine.min()]))  # NaN propagates
        if looks_like_class_scores(reference.shape, reference.dtype):
            self._update_classes(a, b, labels)
        self.samples += samples

    def _update_classes(self, a: np.ndarray, b: np.ndarray, labels: np.ndarray | None) -> None:
        classes = a.shape[1]
        top1_a = np.argmax(a, axis=1)  # [S]
        top1_b = np.argmax(b, axis=1)  # [S]
        self.top1_same += int(np.count_nonzero(top1_a == top1_b))
        if classes > TOP_K:
            top5_b = np.argpartition(-b, TOP_K - 1, axis=1)[:, :TOP_K]  # [S, 5]
            self.top5_hit += int(np.count_nonzero((top5_b == top1_a[:, None]).any(axis=1)))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)  # [S]
            self.correct_reference += int(np.count_nonzero(top1_a == labels))
            self.correct_candidate += int(np.count_nonzero(top1_b == labels))
            self.labelled += labels.shape[0]

    def result(self) -> OutputMetrics:
        """The metrics over every batch added so far."""
        if self.shape is None or self.samples == 0:
            raise ValueError(f"no samples were compared for output {self.name!r}")
        if self.sum_sq_difference == 0.0:
            relative, sqnr = 0.0, math.inf
        elif self.sum_sq_reference == 0.0:
            relative, sqnr = math.inf, -math.inf
        else:
            relative = math.sqrt(self.sum_sq_difference / self.sum_sq_reference)
            sqnr = 10.0 * math.log10(self.sum_sq_reference / self.sum_sq_difference)
        norm_product = math.sqrt(self.sum_sq_reference * self.sum_sq_candidate)
        if self.sum_sq_reference == 0.0 and self.sum_sq_candidate == 0.0:
            cosine_global = 1.0
        elif norm_product == 0.0:
            cosine_global = 0.0
        else:
            cosine_global = float(np.clip(self.sum_dot / norm_product, -1.0, 1.0))  # NaN stays NaN
        classes = None
        top1 = top5 = accuracy_a = accuracy_b = None
        if self.dtype is not None and looks_like_class_scores(self.shape, self.dtype):
            classes = self.shape[1]
            top1 = self.top1_same / self.samples
            top5 = self.top5_hit / self.samples if classes > TOP_K else None
            if self.labelled:
                accuracy_a = self.correct_reference / self.labelled
                accuracy_b = self.correct_candidate / self.labelled
        return OutputMetrics(
            name=self.name,
            shape=self.shape,
            samples=self.samples,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.elements if self.elements else 0.0,
            relative=relative,
            sqnr_db=sqnr,
            cosine=self.sum_cosine / self.samples,
            cosine_min=self.min_cosine,
            cosine_global=cosine_global,
            classes=classes,
            top1_agreement=top1,
            top5_agreement=top5,
            accuracy_original=accuracy_a,
            accuracy_rewritten=accuracy_b,
            non_finite=self.non_finite,
        )


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None, name: str = "output"
) -> OutputMetrics:
    """Metrics of ``candidate`` against ``reference`` (both ``[S, ...]``) in one call."""
    accumulator = MetricAccumulator(name)
    accumulator.update(reference, candidate, labels)
    return accumulator.result()
