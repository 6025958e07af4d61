"""The rows of a Conv site's activation: im2col patches, in the order of the channel form's weight rows.

Legend: B batch, C input channels, S… the input's spatial shape, O… the output's, k… the kernel's,
K = C·∏k (one patch), T rows (patches kept).

A Conv ``Y = conv(X, weight)`` is ``Y[b, :, o…] = patch(b, o…) · W_kn`` with ``W_kn = reshape(weight,
[N, C·∏k])ᵀ`` and ``patch(b, o…)[(c, κ…)] = X_padded[b, c, o·s + κ·d]``: so ``XᵀX`` of the patches is the
Gram that makes ``‖patches · (W − W')‖`` the site's output error, as for a MatMul. A batch has ``B·∏O``
patches; past ``max_rows`` a seeded sample of positions is kept (the same positions for two activations
of one shape, so the sequential rewrite's ``X`` and ``X̃`` stay paired), and the statistics record how many
positions there were.
"""

from __future__ import annotations

import math

import numpy as np

from onnxsvd.graph.match import ConvGeometry

__all__ = ["DEFAULT_PATCH_ROWS", "explicit_pads", "patch_rows"]

#: Patches kept per batch and Conv input; more positions than this are sampled.
DEFAULT_PATCH_ROWS = 8192


def explicit_pads(geometry: ConvGeometry, spatial: tuple[int, ...]) -> list[int]:
    """The Conv's ``[begin…, end…]`` pads for an input of spatial shape ``spatial`` (``auto_pad`` resolved
    as ONNX defines it: ``SAME_*`` pads so the output is ``⌈S/s⌉``, the odd one at the end for UPPER)."""
    dims = len(geometry.kernel)
    if geometry.auto_pad in ("NOTSET", "VALID"):
        return list(geometry.pads) if geometry.auto_pad == "NOTSET" else [0] * (2 * dims)
    begin, end = [], []
    for size, k, s, d in zip(spatial, geometry.kernel, geometry.strides, geometry.dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        first = small if geometry.auto_pad == "SAME_UPPER" else total - small
        begin.append(first)
        end.append(total - first)
    return begin + end


def patch_rows(
    activation: np.ndarray, geometry: ConvGeometry, max_rows: int | None = DEFAULT_PATCH_ROWS, seed: int = 0
) -> tuple[np.ndarray, int]:
    """``(rows [T, C·∏k], positions B·∏O)``: the im2col patches of ``activation`` ``[B, C, S…]``.

    ``max_rows``: keep at most this many, sampled without replacement with ``seed`` (``None``: all).
    """
    x = np.asarray(activation)  # [B, C, S…]
    dims = len(geometry.kernel)
    pads = explicit_pads(geometry, tuple(int(d) for d in x.shape[2:]))
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[dims + i]) for i in range(dims)])  # [B, C, S…+pads]
    spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
    axes = tuple(range(2, 2 + dims))
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=axes)  # [B, C, P…, span…] (a view)
    windows = windows[(Ellipsis, *(slice(None, None, d) for d in geometry.dilations))]  # [B, C, P…, k…]
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in geometry.strides))]  # [B, C, O…, k…]
    view = np.moveaxis(windows, 1, 1 + dims)  # [B, O…, C, k…]
    leading = view.shape[: 1 + dims]  # (B, O…)
    positions = math.prod(leading)
    if max_rows is not None and positions > max_rows:
        picked = np.sort(np.random.default_rng(seed).choice(positions, size=max_rows, replace=False))  # [T]
        rows = view[np.unravel_index(picked, leading)]  # [T, C, k…]: only these patches are copied
        return rows.reshape(max_rows, -1), positions  # [T, K]
    return view.reshape(positions, -1), positions  # [B·∏O, K]
