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
    "resize",
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


def _nearest_weights(ratio: float, rounding: str) -> list[float]:
    """Weights of the two neighbours ``(base, base + 1)`` of a position ``base + ratio``, ratio in (0, 1]."""
    if ratio == 1.0:
        return [0.0, 1.0]
    chosen = {
        "round_prefer_floor": ratio > 0.5,
        "round_prefer_ceil": ratio >= 0.5,
        "floor": False,
        "ceil": True,
    }[rounding]
    return [0.0, 1.0] if chosen else [1.0, 0.0]


def _cubic_weights(ratio: float, a: float, scale: float, antialias: bool) -> list[float]:
    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    if not antialias:
        return [kernel(ratio + 1), kernel(ratio), kernel(1 - ratio), kernel(2 - ratio)]
    scale = min(scale, 1.0)  # a wider kernel when downsampling
    start = math.floor(-2 / scale) + 1
    weights = [kernel(scale * (i - ratio)) for i in range(start, 2 - start)]
    total = sum(weights)
    return [w / total for w in weights]


def _linear_weights(ratio: float, scale: float, antialias: bool) -> list[float]:
    if not antialias:
        return [1 - ratio, ratio]
    scale = min(scale, 1.0)
    start = math.floor(-1 / scale) + 1
    weights = [min(max(1 - abs((i - ratio) * scale), 0.0), 1.0) for i in range(start, 2 - start)]
    total = sum(weights)
    return [w / total for w in weights]


class _ResizeAxis:
    """The interpolation of one axis as a matrix: ``y = W · x`` with ``W`` ``[O, I]``, plus the output
    positions that fall outside the crop (``tf_crop_and_resize`` gives them ``extrapolation_value``)."""

    def __init__(self, options: dict[str, Any], size: int, out: int, scale: float, roi: tuple[float, float]):
        import numpy as np

        mode, transform = options["mode"], options["coordinate_transformation_mode"]
        weights = np.zeros((out, size))  # [O, I]
        outside = np.zeros(out, dtype=bool)  # [O]
        exact_out = scale * size
        for position in range(out):
            if transform == "align_corners":
                original = 0.0 if exact_out == 1 else position * (size - 1) / (exact_out - 1)
            elif transform == "asymmetric":
                original = position / scale
            elif transform == "tf_crop_and_resize":
                start, stop = roi
                if exact_out == 1:
                    original = (stop - start) * (size - 1) / 2 + start * (size - 1)
                else:
                    original = position * (stop - start) * (size - 1) / (exact_out - 1) + start * (size - 1)
                if original < 0 or original > size - 1:
                    outside[position] = True
                    continue
            elif transform == "pytorch_half_pixel":
                original = -0.5 if exact_out == 1 else (position + 0.5) / scale - 0.5
            elif transform == "half_pixel":
                original = (position + 0.5) / scale - 0.5
            else:  # half_pixel_symmetric: the centre of the input maps to the centre of the output
                offset = size / 2 * (1 - out / exact_out)
                original = offset + (position + 0.5) / scale - 0.5
            base = math.ceil(original) - 1  # the neighbour on the left; ratio in (0, 1]
            ratio = original - base
            if mode == "nearest":
                taps = _nearest_weights(ratio, options["nearest_mode"])
            elif mode == "linear":
                taps = _linear_weights(ratio, scale, options["antialias"])
            else:
                taps = _cubic_weights(ratio, options["cubic_coeff_a"], scale, options["antialias"])
            first = base - (len(taps) // 2 - 1)
            indices = [first + i for i in range(len(taps))]
            if options["exclude_outside"]:
                taps = [t if 0 <= i < size else 0.0 for t, i in zip(taps, indices, strict=True)]
                total = sum(taps)
                taps = [t / total for t in taps] if total else taps
            for tap, index in zip(taps, indices, strict=True):
                weights[position, min(max(index, 0), size - 1)] += tap  # beyond the edges: the edge value
        self.weights, self.outside = weights, outside


def _resize_options(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> dict[str, Any]:
    def text(name: str, default: str) -> str:
        value = attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    legacy = opset < 11 or node.op_type == "Upsample"  # Upsample and Resize-10: asymmetric, floor
    options = {
        "mode": text("mode", "nearest"),
        "coordinate_transformation_mode": "asymmetric" if legacy else text("coordinate_transformation_mode",
                                                                             "half_pixel"),
        "nearest_mode": "floor" if legacy else text("nearest_mode", "round_prefer_floor"),
        "cubic_coeff_a": float(attrs.get("cubic_coeff_a", -0.75)),
        "exclude_outside": bool(attrs.get("exclude_outside", 0)),
        "extrapolation_value": float(attrs.get("extrapolation_value", 0.0)),
        "antialias": bool(attrs.get("antialias", 0)),
        "keep_aspect_ratio_policy": text("keep_aspect_ratio_policy", "stretch"),
    }
    choices = {
        "mode": ("nearest", "linear", "cubic"),
        "coordinate_transformation_mode": ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                                           "align_corners", "asymmetric", "tf_crop_and_resize"),
        "nearest_mode": ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"),
        "keep_aspect_ratio_policy": ("stretch", "not_larger", "not_smaller"),
    }
    for name, allowed in choices.items():
        if options[name] not in allowed:
            raise refuse(node, f"{name}={options[name]}")
    if options["antialias"] and options["mode"] == "nearest":
        raise refuse(node, "antialias=1 in nearest mode")
    return options


def resize(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    options = _resize_options(node, attrs, opset)
    attribute_axes = attrs.get("axes")
    attribute_scales = attrs.get("scales")  # Upsample-7

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        rank = x.dim()
        roi_values: list[float] = []
        if node.op_type == "Upsample":
            scales = [float(s) for s in (attribute_scales if opset < 9 else xs[1].reshape(-1).tolist())]
            sizes = None
        elif opset < 11:
            scales, sizes = [float(s) for s in xs[1].reshape(-1).tolist()], None
        else:
            roi_values = _floats(xs[1] if len(xs) > 1 else None)
            scales = _floats(xs[2] if len(xs) > 2 else None) or None
            sizes = int_list(xs[3] if len(xs) > 3 else None) or None
        axes = [positive_axis(int(a), rank) for a in attribute_axes] if attribute_axes is not None else None
        axes = axes or list(range(rank))
        shape = list(x.shape)
        if sizes is not None:
            factors = [out / shape[axis] for out, axis in zip(sizes, axes, strict=True)]
            policy = options["keep_aspect_ratio_policy"]
            if policy != "stretch":
                one = min(factors) if policy == "not_larger" else max(factors)
                factors = [one] * len(axes)
                sizes = [int(one * shape[axis] + 0.5) for axis in axes]
            outs = list(sizes)
        elif scales is not None:
            factors = list(scales)
            outs = [int(math.floor(f * shape[axis])) for f, axis in zip(factors, axes, strict=True)]
        else:
            raise refuse(node, "neither scales nor sizes")
        count = len(axes)
        rois = [(roi_values[i], roi_values[count + i]) if roi_values else (0.0, 1.0) for i in range(count)]
        compute = x if x.is_floating_point() else x.to(torch.float64)
        outside = None
        for axis, out, factor, roi in zip(axes, outs, factors, rois, strict=True):
            if math.isclose(factor, 1.0) and out == shape[axis] and roi == (0.0, 1.0):
                continue  # identity along this axis
            plan = _ResizeAxis(options, shape[axis], out, factor, roi)
            weights = torch.from_numpy(plan.weights).to(compute.dtype).to(compute.device)  # [O, I]
            compute = torch.movedim(torch.movedim(compute, axis, -1) @ weights.T, -1, axis)
            if plan.outside.any():
                mask_shape = [1] * rank
                mask_shape[axis] = out
                mask = torch.from_numpy(plan.outside).reshape(mask_shape).to(compute.device)
                outside = mask if outside is None else outside | mask
        if outside is not None:
            compute = torch.where(outside, torch.tensor(options["extrapolation_value"], dtype=compute.dtype), compute)
        if not x.is_floating_point():  # saturating, rounded cast back to the integer type
            info = torch.iinfo(x.dtype)
            compute = torch.round(compute).clamp(info.min, info.max)
        return (compute.to(x.dtype),)

    return run


def _floats(value: Tensor | None) -> list[float]:
    if value is None:
        return []
    return [float(v) for v in value.reshape(-1).tolist()]
