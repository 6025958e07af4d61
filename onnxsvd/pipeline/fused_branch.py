"""The fused correction branch (``--branch fused``): ``A`` quantized as extra output columns of the base.

Legend: K input channels, N output channels, r the correction's rank, ``Ŵ`` the dequantized base,
``E = W − Ŵ`` (or the sequential rewrite's target) what the correction fits, ``Lᵀ`` the data metric.

The unfused branch ``MatMulNBits(X) + (X·A)·B`` runs three kernels for the correction; the fused one
quantizes ``[W | A]`` ``[K, N + r]`` in one call of ONNX Runtime's quantizer, so one ``MatMulNBits``
computes ``[X·Ŵ | X·Â]`` and a ``Split`` hands ``X·Â`` to the one ``MatMul`` by ``B``. MatMulNBits
quantizes each output column on its own (blocks along K, a scale per block and column), so the first N
columns are exactly the base ``Ŵ`` (checked, not assumed); the last r are ``Â``, ``A`` rounded to the
base's bits. ``B`` is then refitted to ``Â`` exactly as ONNX Runtime dequantizes it, in the metric of
the fit:

    B = argmin_B ‖Lᵀ (E − Â B)‖_F = lstsq(Lᵀ Â, Lᵀ E)        # [r, N]

so the correction accounts for how ``A`` is stored. At full rank with ``r = K ≤ N``, ``Â`` is square
and (generically) invertible, and the site is exact again; with ``K > N`` the rounding of ``A`` leaves
what ``Â``'s columns cannot reach.
"""

from __future__ import annotations

import numpy as np

from onnxsvd.config import QuantizeConfig
from onnxsvd.errors import FactorizationError
from onnxsvd.factorize import Factorization, Metric
from onnxsvd.quantize import QuantizedWeight, quantize_weight

__all__ = ["fuse_branch"]


def fuse_branch(
    weight: np.ndarray,
    base: QuantizedWeight,
    factorization: Factorization,
    goal: np.ndarray,
    metric: Metric,
    dtype: np.dtype,
    factor_dtype: np.dtype,
    config: QuantizeConfig,
) -> tuple[QuantizedWeight, Factorization]:
    """Quantize ``[W | A]`` with ONNX Runtime and refit ``B`` to the dequantized ``Â``.

    Args:
        weight: ``W`` ``[K, N]``.
        base: ``W``'s own quantization (its ``Ŵ`` must be what the fused weight's first N columns give).
        factorization: the correction ``A [K, r] · B [r, N]`` (stages concatenated).
        goal: what ``Â·B`` fits, ``[K, N]`` (``E = W − Ŵ``).
        metric: ``Lᵀ`` of the fit.
        dtype: the site's compute dtype (MatMulNBits' ``T1``).
        factor_dtype: the dtype ``B`` is stored in.
        config: the quantization of the base (bits, block, symmetry, algorithm).

    Returns:
        The fused quantized weight ``[K, N + r]`` (``Ŵ`` and ``Â``) and the factorization ``(Â, B)`` with
        ``B`` refitted and rounded to ``factor_dtype``.

    Raises:
        FactorizationError: the quantizer failed on ``[W | A]``, the fused weight's first N columns are not
            the base, or the refit is not finite.
    """
    a, _ = factorization.fused()  # [K, r], [r, N]
    k, n = weight.shape
    fused = quantize_weight(np.concatenate([weight, a.astype(np.float64)], axis=1), dtype, config)  # [K, N + r]
    w_hat, a_hat = fused.dequantized[:, :n], fused.dequantized[:, n:]  # [K, N], [K, r]
    if not np.array_equal(w_hat, base.dequantized):
        raise FactorizationError(
            "the fused weight's first N columns do not dequantize to the base (the quantizer does not treat "
            "columns independently here); use --branch unfused"
        )
    b, *_ = np.linalg.lstsq(metric.apply(a_hat), metric.apply(goal), rcond=None)  # [r, N]
    b = b.astype(factor_dtype)
    if not np.all(np.isfinite(b)):
        raise FactorizationError("the fused branch's refitted B overflows its dtype (NaN/Inf)")
    return fused, Factorization(stages=((a_hat, b),), kept_energy=factorization.kept_energy, notes=factorization.notes)
