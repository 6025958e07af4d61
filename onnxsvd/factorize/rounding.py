"""Factors stored in int8: symmetric per-component quantization, and the rounding a later stage fits around.

Legend: K input channels, N output channels, r rank.

A factor pair ``A`` ``[K, r]``, ``B`` ``[r, N]`` is stored as int8 with one scale per rank component (a
column of ``A``, a row of ``B``): ``s_j = max_i |a_ij| / 127``, ``q_ij = round(a_ij / s_j)`` in
``[-127, 127]``, and the graph computes ``q·s`` (``DequantizeLinear``). Σ is split across both factors, so a
component's scale is the same order in ``A`` and ``B``. :func:`round_int8` gives the float values the
graph will compute, which is what a later residual stage is fitted around; :func:`quantize_int8` turns
those values back into the int8 payload and scales (the same values to fp32 rounding).
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT8_LIMIT", "quantize_int8", "round_int8"]

#: Symmetric int8 range: ±127 (−128 left out, so the range is symmetric around the zero point 0).
INT8_LIMIT = 127


def quantize_int8(matrix: np.ndarray, axis: int, dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, s)`` with ``matrix ≈ q·s``, one scale per index along ``axis`` (the rank components).

    Args:
        matrix: ``[K, r]`` (``axis=1``) or ``[r, N]`` (``axis=0``).
        axis: the axis whose every index gets its own scale.
        dtype: the scales' dtype (the dtype the graph computes in).

    Returns:
        ``q`` with the shape of ``matrix``, and ``s`` ``[matrix.shape[axis]]`` (an all-zero component gets
        scale 1, so nothing divides by zero).
    """
    values = np.asarray(matrix, dtype=np.float64)
    reduce = 1 - axis  # 2-D: the other axis
    peak = np.max(np.abs(values), axis=reduce)  # [r]
    scale = np.where(peak > 0, peak / INT8_LIMIT, 1.0).astype(dtype)  # [r], in the compute dtype
    shape = [1, 1]
    shape[axis] = -1
    quantized = np.clip(np.rint(values / scale.astype(np.float64).reshape(shape)), -INT8_LIMIT, INT8_LIMIT)
    return quantized.astype(np.int8), scale


def round_int8(matrix: np.ndarray, axis: int, dtype: np.dtype = np.float32) -> np.ndarray:
    """``q·s`` in ``dtype``: the values a factor stored as int8 along ``axis`` takes in the graph."""
    quantized, scale = quantize_int8(matrix, axis, dtype)
    shape = [1, 1]
    shape[axis] = -1
    return (quantized.astype(dtype) * scale.reshape(shape)).astype(dtype)
