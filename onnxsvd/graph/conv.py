"""Conv sites as chains of two Convs: the factor matrices as Conv weights, and the nodes that read them.

Legend: N output channels, C input channels, k… the kernel's spatial shape (``k_h``, ``k_w`` in 2-D),
r the rank.

For a Conv site the factors ``A`` ``[K, r]``, ``B`` ``[r, N']`` are those of its matrix
(:func:`onnxsvd.graph.match.conv_matrix`); the chain computes the same product as ``Y = X · A · B`` on
im2col patches:

- channel (``K = C·∏k``, ``N' = N``): a k… Conv C → r with the site's strides, padding and dilations and no
  bias, weight ``Aᵀ`` as ``[r, C, k…]``; then a 1×…×1 Conv r → N, weight ``Bᵀ`` as ``[N, r, 1…]``, carrying
  the bias. ``Σ_r B[r, n] Σ_{c,κ} A[(c, κ), r] x[c, p+κ] = Σ_{c,κ} W[(c, κ), n] x[c, p+κ]``.
- spatial (2-D, ``K = C·k_h``, ``N' = k_w·N``): a ``k_h×1`` Conv C → r (stride, padding and dilation of the
  height axis), weight ``[r, C, k_h, 1]`` with ``w₁[r, c, i, 0] = A[(c, i), r]``; then a ``1×k_w`` Conv r → N
  (those of the width axis, and the bias), ``w₂[n, r, 0, j] = B[r, (j, n)]``. Composed, the kernel is
  ``Σ_r w₂[n, r, 0, j]·w₁[r, c, i, 0] = (A·B)[(c, i), (j, n)] = weight[n, c, i, j]``. The first Conv runs at
  the output's height and the input's (padded) width.

Under an ``auto_pad`` of ``SAME_*`` each Conv keeps it: along an axis where its kernel is 1 and its stride
1 it pads nothing, along the other it pads as the site did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxsvd.graph.match import ConvGeometry

__all__ = ["conv_first_weight", "conv_second_weight", "conv_factors_from_weights", "conv_pair", "conv_flops"]


def conv_first_weight(a: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The first Conv's weight from ``A`` ``[K, r]``: ``[r, C, k…]`` (channel) or ``[r, C, k_h, 1]``."""
    rank = a.shape[1]
    if geometry.form == "spatial":
        return np.ascontiguousarray(a.T.reshape(rank, geometry.in_channels, geometry.kernel[0], 1))
    return np.ascontiguousarray(a.T.reshape(rank, geometry.in_channels, *geometry.kernel))


def conv_second_weight(b: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The second Conv's weight from ``B`` ``[r, N']``: ``[N, r, 1…]`` (channel) or ``[N, r, 1, k_w]``."""
    rank, n = b.shape[0], geometry.out_channels
    if geometry.form == "spatial":
        k_w = geometry.kernel[1]
        return np.ascontiguousarray(b.reshape(rank, k_w, n).transpose(2, 0, 1).reshape(n, rank, 1, k_w))
    return np.ascontiguousarray(b.T.reshape(n, rank, *([1] * len(geometry.kernel))))


def conv_factors_from_weights(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """``(A [K, r], B [r, N'], form)`` back from the two Conv weights (the inverse of the two above).

    The form is read from the second weight: a ``1×k_w`` kernel with ``k_w > 1`` is the spatial form's.
    """
    rank = first.shape[0]
    a = first.reshape(rank, -1).T  # [K, r]
    n = second.shape[0]
    if second.ndim == 4 and second.shape[3] > 1:
        k_w = second.shape[3]
        b = second.reshape(n, rank, k_w).transpose(1, 2, 0).reshape(rank, k_w * n)  # [r, k_w·N]
        return a, b, "spatial"
    return a, second.reshape(n, rank).T, "channel"  # [r, N]


def _padding(geometry: ConvGeometry, axes: tuple[int, ...] | None) -> dict[str, object]:
    """``auto_pad`` or ``pads`` for a Conv that keeps the site's padding along ``axes`` (all when None)."""
    if geometry.auto_pad != "NOTSET":
        return {"auto_pad": geometry.auto_pad}
    dims = len(geometry.kernel)
    keep = range(dims) if axes is None else axes
    pads = [geometry.pads[i] if i in keep else 0 for i in range(dims)]
    pads += [geometry.pads[dims + i] if i in keep else 0 for i in range(dims)]
    return {"pads": pads} if any(pads) else {}


def conv_pair(
    geometry: ConvGeometry,
    activation: str,
    first_weight: str,
    second_weight: str,
    hidden: str,
    output: str,
    bias: str | None,
    first_name: str,
    second_name: str,
) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The two Conv nodes of one chain (see the module's docstring)."""
    dims = len(geometry.kernel)
    if geometry.form == "spatial":
        (k_h, k_w), (s_h, s_w), (d_h, d_w) = geometry.kernel, geometry.strides, geometry.dilations
        first_attrs = {"kernel_shape": [k_h, 1], "strides": [s_h, 1], "dilations": [d_h, 1], **_padding(geometry, (0,))}
        second_attrs = {"kernel_shape": [1, k_w], "strides": [1, s_w], "dilations": [1, d_w],
                        **_padding(geometry, (1,))}
    else:
        first_attrs = {"kernel_shape": list(geometry.kernel), "strides": list(geometry.strides),
                       "dilations": list(geometry.dilations), **_padding(geometry, None)}
        second_attrs = {"kernel_shape": [1] * dims}
    first = helper.make_node("Conv", [activation, first_weight], [hidden], name=first_name, **first_attrs)
    second_inputs = [hidden, second_weight] + ([bias] if bias is not None else [])
    second = helper.make_node("Conv", second_inputs, [output], name=second_name, **second_attrs)
    return first, second


def conv_flops(geometry: ConvGeometry, rank: int | None) -> float:
    """Multiply-adds per output position of the site: dense ``N·C·∏k``, or of its chain at ``rank``.

    channel: ``r·C·∏k + r·N``. spatial: the first Conv runs at the output's height and the input's width
    (``s_w`` times the output's positions when the width stride is ``s_w``), ``r·C·k_h·s_w + r·k_w·N``.
    """
    dense = float(geometry.out_channels * geometry.patch_size)
    if rank is None:
        return dense
    if geometry.form == "spatial":
        k_h, k_w = geometry.kernel
        return float(rank * geometry.in_channels * k_h * geometry.strides[1] + rank * k_w * geometry.out_channels)
    return float(rank * geometry.patch_size + rank * geometry.out_channels)
