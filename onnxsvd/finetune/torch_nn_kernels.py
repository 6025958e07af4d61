"""Torch kernels for the ONNX ops of convolutional networks: convolutions, pooling, normalisation, padding.

Dimension letters: ``N`` batch, ``C`` channels, ``M`` output channels (filters), ``G`` groups, ``S`` a
spatial size, ``k`` a kernel size, ``s`` a stride, ``d`` a dilation, ``b``/``e`` the padding at the
beginning and the end of a spatial axis. ONNX writes ``pads`` as ``[b_1, …, b_n, e_1, …, e_n]``.

Pooling is one function for MaxPool, AveragePool and LpPool: the input is padded explicitly (asymmetric
pads, ``auto_pad``, the extra end of ``ceil_mode``), every window is unfolded (dilations included), and
the windows are reduced; AveragePool divides by the count of input (or, with ``count_include_pad``,
input and pad) positions in the window. The registry of ops is :data:`onnxsvd.finetune.torch_graph.OPS`.
"""

from __future__ import annotations

import math
from typing import Any

import onnx
import torch

from onnxsvd.finetune.torch_kernels import Builder, Kernel, Tensor, int_list, positive_axis, refuse

__all__ = [
    "conv",
    "conv_transpose",
    "batch_normalization",
    "instance_normalization",
    "group_normalization",
    "max_pool",
    "average_pool",
    "lp_pool",
    "global_pool",
    "pad",
]


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads, first axis first, as torch's F.pad list (last axis first)."""
    flat: list[int] = []
    for start, stop in zip(reversed(begin), reversed(end), strict=True):
        flat += [start, stop]
    return flat


def _spatial_pads(
    node: onnx.NodeProto, attrs: dict[str, Any], sizes: list[int], kernel: list[int], strides: list[int],
    dilations: list[int],
) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from ``pads`` or ``auto_pad`` (SAME_UPPER puts the odd one last)."""
    rank = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * rank))]
        return pads[:rank], pads[rank:]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise refuse(node, f"auto_pad={auto_pad}")
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)  # ceil(S / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def _window(attrs: dict[str, Any], rank: int, kernel: list[int]) -> tuple[list[int], list[int]]:
    strides = [int(v) for v in attrs.get("strides", [1] * rank)]
    dilations = [int(v) for v in attrs.get("dilations", [1] * rank)]
    return strides, dilations


_CONVOLUTIONS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_TRANSPOSED = {
    1: torch.nn.functional.conv_transpose1d,
    2: torch.nn.functional.conv_transpose2d,
    3: torch.nn.functional.conv_transpose3d,
}


def conv(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    groups = int(attrs.get("group", 1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, weight = xs[0], xs[1]  # [N, C, S...], [M, C/G, k...]
        bias = xs[2] if len(xs) > 2 else None  # [M]
        rank = x.dim() - 2
        if rank not in _CONVOLUTIONS:
            raise refuse(node, f"{rank} spatial dimensions (1 to 3 are supported)")
        kernel = list(weight.shape[2:])
        strides, dilations = _window(attrs, rank, kernel)
        begin, end = _spatial_pads(node, attrs, list(x.shape[2:]), kernel, strides, dilations)
        if begin != end:  # torch pads symmetrically: pad the input first
            x = torch.nn.functional.pad(x, _torch_pads(begin, end))
            begin = [0] * rank
        return (_CONVOLUTIONS[rank](x, weight, bias, strides, begin, dilations, groups),)

    return run


def conv_transpose(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    groups = int(attrs.get("group", 1))
    output_shape = attrs.get("output_shape")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, weight = xs[0], xs[1]  # [N, C, S...], [C, M/G, k...]
        bias = xs[2] if len(xs) > 2 else None  # [M]
        rank = x.dim() - 2
        if rank not in _TRANSPOSED:
            raise refuse(node, f"{rank} spatial dimensions (1 to 3 are supported)")
        kernel = list(weight.shape[2:])
        strides, dilations = _window(attrs, rank, kernel)
        extra = [int(v) for v in attrs.get("output_padding", [0] * rank)]
        sizes = list(x.shape[2:])
        # The full transposed convolution has S_full = s (S - 1) + (k - 1) d + 1 positions per axis; the
        # output is S_full + output_padding - b - e of them.
        full = [s * (size - 1) + (k - 1) * d + 1 for size, s, k, d in zip(sizes, strides, kernel, dilations,
                                                                          strict=True)]
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            wanted = ([int(v) for v in output_shape][-rank:] if output_shape is not None
                      else [size * s for size, s in zip(sizes, strides, strict=True)])
            totals = [f + p - w for f, p, w in zip(full, extra, wanted, strict=True)]
            begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
            end = [t - b for t, b in zip(totals, begin, strict=True)]
        elif auto_pad in ("NOTSET", "", "VALID"):
            pads = [int(p) for p in attrs.get("pads", [0] * (2 * rank))] if auto_pad != "VALID" else [0] * (2 * rank)
            begin, end = pads[:rank], pads[rank:]
        else:
            raise refuse(node, f"auto_pad={auto_pad}")
        y = _TRANSPOSED[rank](x, weight, None, strides, 0, 0, groups, dilations)  # [N, M, S_full...]
        # Negative pads crop: remove b at the start, e - output_padding at the end (output_padding adds zeros).
        y = torch.nn.functional.pad(y, _torch_pads([-b for b in begin], [p - e for p, e in zip(extra, end,
                                                                                               strict=True)]))
        if bias is not None:
            y = y + bias.reshape(1, -1, *([1] * rank))
        return (y,)

    return run


def _per_channel(value: Tensor, rank: int) -> Tensor:
    """A ``[C]`` tensor shaped ``[1, C, 1, …]`` to broadcast over ``[N, C, S...]``."""
    return value.reshape(1, -1, *([1] * rank))


def batch_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    epsilon = float(attrs.get("epsilon", 1e-5))
    momentum = float(attrs.get("momentum", 0.9))
    training = bool(attrs.get("training_mode", 0)) and opset >= 14
    if opset < 9 and not int(attrs.get("spatial", 1)):
        raise refuse(node, "spatial=0 (statistics per position)")

    def run(xs: list[Any]) -> tuple[Tensor, ...]:
        x, scale, bias, mean, variance = xs[:5]  # [N, C, S...], [C] each
        rank = x.dim() - 2
        if not training:
            # y = (x - μ) / √(σ² + ε) · γ + β with the stored statistics
            inverse = torch.rsqrt(variance + epsilon)  # [C]
            y = (x - _per_channel(mean, rank)) * _per_channel(inverse * scale, rank) + _per_channel(bias, rank)
            return (y,)
        dims = [0, *range(2, x.dim())]
        batch_mean = x.mean(dim=dims)  # [C]
        batch_variance = x.var(dim=dims, unbiased=False)  # [C]
        inverse = torch.rsqrt(batch_variance + epsilon)
        y = (x - _per_channel(batch_mean, rank)) * _per_channel(inverse * scale, rank) + _per_channel(bias, rank)
        running_mean = mean * momentum + batch_mean * (1 - momentum)
        running_variance = variance * momentum + batch_variance * (1 - momentum)
        return (y, running_mean, running_variance)

    return run


def instance_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    epsilon = float(attrs.get("epsilon", 1e-5))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, scale, bias = xs[0], xs[1], xs[2]  # [N, C, S...], [C], [C]
        rank = x.dim() - 2
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)  # [N, C, 1...]
        variance = x.var(dim=dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(variance + epsilon)
        return (y * _per_channel(scale, rank) + _per_channel(bias, rank),)

    return run


def group_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    epsilon = float(attrs.get("epsilon", 1e-5))
    groups = int(attrs["num_groups"])
    # Opset 18 scales and shifts per group, opset 21 per channel; stash_type 1 computes in float32.
    per_group = opset < 21
    in_float32 = int(attrs.get("stash_type", 1)) == 1

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, scale, bias = xs[0], xs[1], xs[2]  # [N, C, S...], [G] or [C]
        rank, channels = x.dim() - 2, x.shape[1]
        grouped = x.reshape(x.shape[0], groups, -1)  # [N, G, C/G · S]
        if in_float32:
            grouped = grouped.float()
        mean = grouped.mean(dim=-1, keepdim=True)  # [N, G, 1]
        variance = grouped.var(dim=-1, unbiased=False, keepdim=True)
        y = ((grouped - mean) * torch.rsqrt(variance + epsilon)).to(x.dtype).reshape(x.shape)
        if per_group:
            scale = scale.repeat_interleave(channels // groups)  # [C]
            bias = bias.repeat_interleave(channels // groups)
        return (y * _per_channel(scale, rank) + _per_channel(bias, rank),)

    return run


def _pool(node: onnx.NodeProto, attrs: dict[str, Any], kind: str, opset: int) -> Kernel:
    kernel = [int(k) for k in attrs["kernel_shape"]]
    rank = len(kernel)
    strides, dilations = _window(attrs, rank, kernel)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    power = float(attrs.get("p", 2))
    column_major = bool(attrs.get("storage_order", 0))
    want_indices = len(node.output) > 1 and bool(node.output[1])
    if want_indices and column_major and rank != 2:
        raise refuse(node, f"storage_order=1 on {rank} spatial dimensions")

    def run(xs: list[Any]) -> tuple[Tensor, ...]:
        x = xs[0]  # [N, C, S...]
        dtype = x.dtype
        if not x.is_floating_point():  # integer max pooling, exact through float64
            x = x.to(torch.float64)
        sizes = list(x.shape[2:])
        begin, end = _spatial_pads(node, attrs, sizes, kernel, strides, dilations)
        spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]  # window extent per axis
        extra = []
        for size, b, e, span, s in zip(sizes, begin, end, spans, strides, strict=True):
            room = size + b + e - span
            out = (-(-room // s) if ceil_mode else room // s) + 1
            if ceil_mode and (out - 1) * s >= size + b:  # the last window must start inside the input or b
                out -= 1
            extra.append(max(0, (out - 1) * s + span - (size + b + e)))
        fill = -math.inf if kind == "max" else 0.0
        ends = [e + x_ for e, x_ in zip(end, extra, strict=True)]
        padded = torch.nn.functional.pad(x, _torch_pads(begin, ends), value=fill)
        windows = _unfold(padded, spans, strides, dilations)  # [N, C, out..., k...]
        axes = tuple(range(-rank, 0))
        if kind == "max":
            y = torch.amax(windows, dim=axes)
            if not want_indices:
                return (y.to(dtype),)
            return (y.to(dtype), _max_indices(x, windows, y, begin, ends, strides, dilations, column_major))
        if kind == "lp":
            return ((windows.abs() ** power).sum(dim=axes) ** (1.0 / power),)
        # The divisor counts input positions, and with count_include_pad the pads too, never the extra end.
        ones = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
        counted = torch.nn.functional.pad(ones, _torch_pads(begin, end), value=1.0 if include_pad else 0.0)
        counted = torch.nn.functional.pad(counted, _torch_pads([0] * rank, extra), value=0.0)
        counts = _unfold(counted, spans, strides, dilations).sum(dim=axes)  # [1, 1, out...]
        return ((windows.sum(dim=axes) / counts).to(dtype),)

    return run


def _unfold(x: Tensor, spans: list[int], strides: list[int], dilations: list[int]) -> Tensor:
    """``[N, C, P...]`` → ``[N, C, out..., k...]``: every window of every spatial axis, dilated."""
    for axis, (span, s, d) in enumerate(zip(spans, strides, dilations, strict=True)):
        x = x.unfold(2 + axis, span, s)  # appends the window axis
        if d > 1:
            x = x[..., ::d]
    return x


def _max_indices(
    x: Tensor, windows: Tensor, y: Tensor, begin: list[int], ends: list[int], strides: list[int],
    dilations: list[int], column_major: bool,
) -> Tensor:
    """MaxPool's Indices: the flat position in ``[N, C, S...]`` (row-major, or column-major over the two
    spatial axes with ``storage_order=1``) of each window's first maximum."""
    rank = len(strides)
    spans = list(windows.shape[-rank:])
    spans = [(k - 1) * d + 1 for k, d in zip(spans, dilations, strict=True)]
    positions = torch.arange(x.numel(), dtype=torch.float64, device=x.device).reshape(x.shape)
    padded = torch.nn.functional.pad(positions, _torch_pads(begin, ends), value=-1.0)
    candidates = _unfold(padded, spans, strides, dilations).flatten(-rank)  # [N, C, out..., K]
    first = torch.argmax((windows.flatten(-rank) == y.unsqueeze(-1)).to(torch.int8), dim=-1, keepdim=True)
    index = torch.gather(candidates, -1, first).squeeze(-1).to(torch.int64)  # [N, C, out...]
    if column_major:  # p = (nc · H + h) · W + w  →  nc · H · W + w · H + h
        height, width = x.shape[2], x.shape[3]
        plane, within = index // (height * width), index % (height * width)
        index = plane * height * width + (within % width) * height + within // width
    return index


def pad(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise refuse(node, f"mode={mode}")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        rank = x.dim()
        if opset >= 11:
            pads = int_list(xs[1])
            value = xs[2] if len(xs) > 2 and xs[2] is not None else None
            axes = int_list(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(rank))
        else:
            pads = [int(p) for p in attrs["pads"]]
            value = torch.tensor(float(attrs.get("value", 0.0)))
            axes = list(range(rank))
        axes = [positive_axis(a, rank) for a in axes]
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = pads[i], pads[len(axes) + i]
        if mode == "constant":
            fill = value.item() if value is not None and value.numel() else 0
            return (torch.nn.functional.pad(x, _torch_pads(begin, end), value=fill),)
        # Edge, reflect and wrap: each output position reads one input position per axis.
        for axis in range(rank):
            if begin[axis] == 0 and end[axis] == 0:
                continue
            size = x.shape[axis]
            where = torch.arange(-begin[axis], size + end[axis], device=x.device)
            if mode == "edge":
                where = where.clamp(0, size - 1)
            elif mode == "wrap":
                where = where % size
            else:  # reflect about the first and last positions: period 2 (S - 1)
                period = max(2 * (size - 1), 1)
                where = where % period
                where = torch.where(where >= size, period - where, where)
            x = torch.index_select(x, axis, where)
        return (x,)

    return run


def max_pool(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return _pool(node, attrs, "max", opset)


def average_pool(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return _pool(node, attrs, "average", opset)


def lp_pool(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return _pool(node, attrs, "lp", opset)


def global_pool(kind: str) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        def run(xs: list[Any]) -> tuple[Tensor]:
            x = xs[0]  # [N, C, S...] → [N, C, 1...]
            dims = tuple(range(2, x.dim()))
            if kind == "max":
                return (torch.amax(x, dim=dims, keepdim=True),)
            return (torch.mean(x, dim=dims, keepdim=True),)

        return run

    return build
