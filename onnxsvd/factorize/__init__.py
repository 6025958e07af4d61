"""Factorization maths: ndarrays in, ndarrays out. No onnx, no graphs."""

from __future__ import annotations

from onnxsvd.factorize.lowrank import (
    Decomposition,
    Factorization,
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

__all__ = [
    "Decomposition",
    "Factorization",
    "Metric",
    "SvdOptions",
    "decompose",
    "diagonal_metric",
    "factorize",
    "identity_metric",
    "randomized_svd",
    "spectrum",
    "split_rank",
    "truncate",
    "whitening_metric",
]
