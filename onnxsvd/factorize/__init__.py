"""Factorization maths: ndarrays in, ndarrays out. No onnx, no graphs."""

from __future__ import annotations

from onnxsvd.factorize.lowrank import (
    Decomposition,
    Factorization,
    FactorRounding,
    Metric,
    SvdOptions,
    decompose,
    diagonal_metric,
    factorize,
    identity_metric,
    randomized_svd,
    spectrum,
    split_rank,
    truncate,
    whitening_metric,
)
from onnxsvd.factorize.rounding import quantize_int8, round_int8

__all__ = [
    "Decomposition",
    "FactorRounding",
    "Factorization",
    "Metric",
    "SvdOptions",
    "decompose",
    "diagonal_metric",
    "factorize",
    "identity_metric",
    "quantize_int8",
    "randomized_svd",
    "round_int8",
    "spectrum",
    "split_rank",
    "truncate",
    "whitening_metric",
]
