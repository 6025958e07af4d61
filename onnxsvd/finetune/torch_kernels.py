"""Torch kernels for ONNX ops: the element-wise, reduction, shape and indexing ops of exported models.

A builder takes ``(node, attributes, opset of the default domain)``, parses the attributes once and returns
a kernel: a closure from the node's input tensors (``None`` for an omitted optional input) to its output
tensors. Semantics follow the ONNX specification, opset-dependent forms included; an attribute value or
variant a kernel cannot honour raises :class:`onnxsvd.errors.UnsupportedOpError` naming the op, the node
and the variant (never a different result). The registry of ops is
:data:`onnxsvd.finetune.torch_graph.OPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxsvd.errors import UnsupportedOpError

__all__ = [
    "TORCH_DTYPES",
    "Builder",
    "Kernel",
    "Tensor",
    "torch_dtype",
    "supported_dtypes",
    "refuse",
    "to_tensor",
    "int_list",
    "positive_axis",
]

Tensor = torch.Tensor
#: A compiled node: input tensors (``None`` for an omitted optional input) → output tensors.
Kernel = Callable[[list[Any]], Sequence[Any]]
#: A builder: (node, attributes, opset of the default domain) → kernel.
Builder = Callable[[onnx.NodeProto, dict[str, Any], int], Kernel]

TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_dtype: int) -> torch.dtype:
    """The torch dtype of an ONNX tensor type.

    Raises:
        UnsupportedOpError: a type torch cannot hold here (strings, unsigned wider than 8 bits, float8…).
    """
    if onnx_dtype not in TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_dtype)
        raise UnsupportedOpError(f"tensor type {name} is not supported by the torch evaluator")
    return TORCH_DTYPES[onnx_dtype]


def supported_dtypes() -> list[str]:
    """The ONNX tensor types the evaluator holds, by name."""
    return [onnx.TensorProto.DataType.Name(code) for code in TORCH_DTYPES]


def to_tensor(proto: onnx.TensorProto) -> Tensor:
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        array = np.array(numpy_helper.to_array(proto), dtype=np.float32)  # a copy; 0-d stays 0-d
        return torch.from_numpy(array).to(torch.bfloat16)
    dtype = torch_dtype(proto.data_type)
    array = np.array(numpy_helper.to_array(proto))  # a contiguous, writable copy; 0-d stays 0-d
    return torch.from_numpy(array).to(dtype)


def int_list(value: Tensor | None) -> list[int]:
    """A 0-d or 1-d integer tensor (shapes, axes, indices of Slice) as Python ints."""
    if value is None:
        return []
    return [int(v) for v in value.reshape(-1).tolist()]


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def refuse(node: onnx.NodeProto, variant: str) -> UnsupportedOpError:
    """The one-line error for a variant of a supported op (an attribute value, a mode) that no kernel runs."""
    label = node.name or f"{node.op_type} -> {node.output[0] if node.output else ''}"
    return UnsupportedOpError(
        f"op '{node.op_type}' (node '{label}') with {variant} is not supported by the torch evaluator"
    )


# ---------------------------------------------------------------------------------------------------------
# Kernels. Each builder parses the node's attributes once and returns a closure over them.


def unary(function: Callable[[Tensor], Tensor]) -> Builder:
    return lambda node, attrs, opset: lambda xs: (function(xs[0]),)


def binary(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    return lambda node, attrs, opset: lambda xs: (function(xs[0], xs[1]),)


def variadic(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        def run(xs: list[Any]) -> tuple[Tensor]:
            present = [x for x in xs if x is not None]
            result = present[0]
            for other in present[1:]:
                result = function(result, other)
            return (result,)

        return run

    return build


def divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates toward zero


def power(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)  # ONNX Pow's output has the base's type


def matmul(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (torch.matmul(xs[0], xs[1]),)


def gemm(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        a = xs[0].transpose(0, 1) if trans_a else xs[0]  # [M, K]
        b = xs[1].transpose(0, 1) if trans_b else xs[1]  # [K, N]
        y = torch.matmul(a, b)  # [M, N]
        if alpha != 1.0:
            y = y * alpha
        c = xs[2] if len(xs) > 2 else None
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)  # C broadcasts to [M, N]
        return (y,)

    return run


def dequantize_linear(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    """``y = (x − zero_point) · scale``, per tensor, per ``axis`` (1-D scale) or per block of ``block_size``
    along ``axis`` (opset 21); ``y`` in the scale's dtype, computed in float32 as ONNX Runtime does."""
    axis = int(attrs.get("axis", 1))
    block = int(attrs.get("block_size", 0))
    if int(attrs.get("output_dtype", 0)):
        raise refuse(node, "output_dtype")

    def broadcast(value: Tensor, x: Tensor) -> Tensor:
        """``value`` (scale or zero point) expanded to ``x``'s shape."""
        if value.dim() == 0 or x.dim() == 0:
            return value
        where = positive_axis(axis, x.dim())
        if block > 0:  # [.., ceil(D/b), ..] → repeat each entry b times along the axis, cut to D
            return value.repeat_interleave(block, dim=where).narrow(where, 0, x.shape[where])
        shape = [1] * x.dim()
        shape[where] = value.numel()
        return value.reshape(shape)

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, scale = xs[0], xs[1]
        zero = xs[2] if len(xs) > 2 else None
        values = x.to(torch.float32)
        if zero is not None:
            values = values - broadcast(zero, x).to(torch.float32)
        y = values * broadcast(scale, x).to(torch.float32)
        return (y.to(scale.dtype),)

    return run


def matmul_nbits(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    """com.microsoft ``MatMulNBits`` as ``X · Ŵ (+ bias)``: the evaluator hands it ``Ŵ`` ``[K, N]``, read
    back from ONNX Runtime's kernel when the graph is built, in place of the packed weight (inputs: ``X``,
    ``Ŵ``, then the node's bias, its input 5, or ``None``)."""

    def run(xs: list[Any]) -> tuple[Tensor]:
        y = torch.matmul(xs[0], xs[1])  # [..., N]
        bias = xs[2] if len(xs) > 2 else None
        return (y + bias if bias is not None else y,)

    return run


def softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax; in a half type step by step (max, exp, sum, divide each rounded), as the spec computes it."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return torch.softmax(x, dim=dim)
    shifted = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return shifted / shifted.sum(dim=dim, keepdim=True)


def softmax_like(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        if opset >= 13:
            axis = int(attrs.get("axis", -1))
            return lambda xs: (function(xs[0], dim=axis),)
        axis = int(attrs.get("axis", 1))

        def run(xs: list[Any]) -> tuple[Tensor]:
            # Before opset 13 the input is coerced to 2-D at ``axis`` and normalised over the second part.
            x = xs[0]
            cut = positive_axis(axis, x.dim())
            flat = x.reshape(math.prod(x.shape[:cut]), -1)
            return (function(flat, dim=1).reshape(x.shape),)

        return run

    return build


def layer_norm(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis, epsilon = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    want_stats = len(node.output) > 1 and any(node.output[1:])

    def run(xs: list[Any]) -> tuple[Any, ...]:
        x, scale = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        cut = positive_axis(axis, x.dim())
        shape = tuple(x.shape[cut:])
        weight = scale.expand(shape) if tuple(scale.shape) != shape else scale
        offset = None if bias is None else (bias.expand(shape) if tuple(bias.shape) != shape else bias)
        y = torch.nn.functional.layer_norm(x, shape, weight, offset, epsilon)
        if not want_stats:
            return (y,)
        dims = tuple(range(cut, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        inverse_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + epsilon)
        return (y, mean, inverse_std)

    return run


def gelu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    approximate = attrs.get("approximate", "none")
    return lambda xs: (torch.nn.functional.gelu(xs[0], approximate=approximate),)


_REDUCE_AXES_AS_INPUT = {"ReduceSum": 13}  # the others take ``axes`` as an input from opset 18


def reduce_op(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        keepdims = bool(attrs.get("keepdims", 1))
        noop_when_empty = bool(attrs.get("noop_with_empty_axes", 0))
        from_input = opset >= _REDUCE_AXES_AS_INPUT.get(node.op_type, 18)
        attribute_axes = [int(a) for a in attrs.get("axes", [])]

        def run(xs: list[Any]) -> tuple[Tensor]:
            x = xs[0]
            axes = int_list(xs[1] if len(xs) > 1 else None) if from_input else attribute_axes
            if not axes:
                if noop_when_empty:
                    return (x,)
                axes = list(range(x.dim()))
            dims = sorted(positive_axis(a, x.dim()) for a in axes)
            return (function(x, dims, keepdims),)

        return run

    return build


def _reduce_extreme(x: Tensor, dims: list[int], keepdims: bool, largest: bool) -> Tensor:
    if all(x.shape[d] > 0 for d in dims):
        function = torch.amax if largest else torch.amin
        return function(x, dim=dims, keepdim=keepdims)
    # The extreme of an empty set is the identity of max (-inf, the lowest integer, False) or of min.
    shape = torch.sum(x.to(torch.float32), dim=dims, keepdim=keepdims).shape
    if x.dtype == torch.bool:
        fill: float | int | bool = not largest
    elif x.is_floating_point():
        fill = -math.inf if largest else math.inf
    else:
        fill = torch.iinfo(x.dtype).min if largest else torch.iinfo(x.dtype).max
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


def reduce_max(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return _reduce_extreme(x, dims, keepdims, largest=True)


def reduce_min(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return _reduce_extreme(x, dims, keepdims, largest=False)


def reduce_prod(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdims)
    return x


def reduce_l2(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keepdims))


def transpose(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    perm = attrs.get("perm")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        order = [int(p) for p in perm] if perm is not None else list(reversed(range(x.dim())))
        return (x.permute(order),)

    return run


def reshape(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    allow_zero = bool(attrs.get("allowzero", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, shape = xs[0], int_list(xs[1])
        if not allow_zero:
            shape = [x.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]  # 0 copies the input's dim
        return (x.reshape(shape),)

    return run


def shape_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    start, end = attrs.get("start"), attrs.get("end")

    def run(xs: list[Any]) -> tuple[Tensor]:
        dims = list(xs[0].shape)
        begin = 0 if start is None else int(start)
        stop = len(dims) if end is None else int(end)
        return (torch.tensor(dims[slice(begin, stop)], dtype=torch.int64),)

    return run


def size_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (torch.tensor(xs[0].numel(), dtype=torch.int64),)


def gather(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        data, indices = xs[0], xs[1].to(torch.int64)
        cut = positive_axis(axis, data.dim())
        size = data.shape[cut]
        flat = torch.where(indices < 0, indices + size, indices).reshape(-1)  # negative indices count from the end
        picked = torch.index_select(data, cut, flat.to(data.device))
        shape = list(data.shape[:cut]) + list(indices.shape) + list(data.shape[cut + 1 :])
        return (picked.reshape(shape),)

    return run


def gather_elements(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        data, indices = xs[0], xs[1].to(torch.int64)
        cut = positive_axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[cut], indices)
        return (torch.gather(data, cut, indices),)

    return run


def unsqueeze(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    attribute_axes = [int(a) for a in attrs.get("axes", [])]

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        axes = int_list(xs[1]) if opset >= 13 else attribute_axes
        rank = x.dim() + len(axes)
        for axis in sorted(positive_axis(a, rank) for a in axes):
            x = x.unsqueeze(axis)
        return (x,)

    return run


def squeeze(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    attribute_axes = attrs.get("axes")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if opset >= 13:
            axes = int_list(xs[1]) if len(xs) > 1 and xs[1] is not None else None
        else:
            axes = [int(a) for a in attribute_axes] if attribute_axes is not None else None
        if axes is None:
            return (x.squeeze(),) if x.dim() else (x,)
        kept = [size for i, size in enumerate(x.shape) if i not in {positive_axis(a, x.dim()) for a in axes}]
        return (x.reshape(kept),)

    return run


def concat_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs["axis"])

    def run(xs: list[Any]) -> tuple[Tensor]:
        parts = [x for x in xs if x is not None]
        dtype = parts[0].dtype
        return (torch.cat([p.to(dtype) for p in parts], dim=axis),)

    return run


def _slice_one(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    size = x.shape[axis]
    begin, stop, stride = slice(start, end, step).indices(size)  # Python's clamping is ONNX's
    if stride > 0:
        index = [slice(None)] * x.dim()
        index[axis] = slice(begin, stop, stride)
        return x[tuple(index)]
    picks = torch.arange(begin, stop, stride, device=x.device)
    return torch.index_select(x, axis, picks)


def slice_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if opset >= 10:
            starts, ends = int_list(xs[1]), int_list(xs[2])
            axes = int_list(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
            steps = int_list(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
        else:
            starts, ends = [int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]]
            axes = [int(v) for v in attrs.get("axes", range(len(starts)))]
            steps = [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            x = _slice_one(x, positive_axis(axis, x.dim()), start, end, step)
        return (x,)

    return run


def split_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))
    attribute_split = attrs.get("split")
    outputs = len(node.output)
    num_outputs = attrs.get("num_outputs")

    def run(xs: list[Any]) -> Sequence[Tensor]:
        x = xs[0]
        cut = positive_axis(axis, x.dim())
        if opset >= 13:
            sizes = int_list(xs[1]) if len(xs) > 1 and xs[1] is not None else None
        else:
            sizes = [int(s) for s in attribute_split] if attribute_split is not None else None
        if sizes is None:
            count = int(num_outputs) if num_outputs is not None else outputs
            chunk = -(-x.shape[cut] // count)  # the last chunk may be smaller (opset 18)
            sizes = [min(chunk, x.shape[cut] - i * chunk) for i in range(count)]
        return tuple(torch.split(x, sizes, dim=cut))

    return run


def cast_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    dtype = torch_dtype(int(attrs["to"]))
    return lambda xs: (xs[0].to(dtype),)


def cast_like(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0].to(xs[1].dtype),)


def where_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x, y = xs[1], xs[2]
        return (torch.where(xs[0].to(torch.bool), x, y.to(x.dtype)),)

    return run


def compare_op(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    return binary(function)


def expand_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x, shape = xs[0], int_list(xs[1])
        target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))  # Expand broadcasts both ways
        return (x.expand(target),)

    return run


def tile_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0].repeat(int_list(xs[1])),)


def constant_of_shape(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    value = attrs.get("value")
    fill = to_tensor(value).reshape(-1) if value is not None else torch.zeros(1, dtype=torch.float32)

    def run(xs: list[Any]) -> tuple[Tensor]:
        return (torch.full(int_list(xs[0]), fill.item(), dtype=fill.dtype),)

    return run


def identity_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0],)


def dropout(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    # Inference semantics: the input unchanged, and an all-true mask when one is asked for. Training mode
    # (an input from opset 12) draws random masks, which cannot match any reference: refused unless ratio 0.
    def run(xs: list[Any]) -> tuple[Tensor, Tensor]:
        training = opset >= 12 and len(xs) > 2 and xs[2] is not None and bool(xs[2])
        if training:
            ratio = float(xs[1]) if len(xs) > 1 and xs[1] is not None else 0.5
            if ratio != 0.0:
                raise refuse(node, f"training_mode=true and ratio {ratio:g} (a random mask)")
        return (xs[0], torch.ones_like(xs[0], dtype=torch.bool))

    return run


def range_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        start, limit, delta = xs
        dtype = start.dtype
        return (torch.arange(start.item(), limit.item(), delta.item(), dtype=dtype, device=start.device),)

    return run


def flatten(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        cut = positive_axis(axis, x.dim())
        return (x.reshape(math.prod(x.shape[:cut]), math.prod(x.shape[cut:])),)

    return run


def clip(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if opset >= 11:
            low = xs[1] if len(xs) > 1 else None
            high = xs[2] if len(xs) > 2 else None
        else:
            low = torch.tensor(float(attrs.get("min", -math.inf)), dtype=x.dtype)
            high = torch.tensor(float(attrs.get("max", math.inf)), dtype=x.dtype)
        if low is not None:
            x = torch.maximum(x, low.to(x.dtype))
        if high is not None:
            x = torch.minimum(x, high.to(x.dtype))
        return (x,)

    return run


def leaky_relu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    slope = float(attrs.get("alpha", 0.01))
    return lambda xs: (torch.nn.functional.leaky_relu(xs[0], slope),)


def hard_sigmoid(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return lambda xs: (torch.clamp(xs[0] * alpha + beta, 0.0, 1.0),)


def elu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.0))
    return lambda xs: (torch.nn.functional.elu(xs[0], alpha),)


def mean_op(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        present = [x for x in xs if x is not None]
        total = present[0]
        for other in present[1:]:
            total = total + other
        return (total / len(present),)

    return run


def arg_reduce(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        axis, keepdims = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1))
        last = bool(attrs.get("select_last_index", 0))

        def run(xs: list[Any]) -> tuple[Tensor]:
            x = xs[0]
            if not last:
                return (function(x, dim=axis, keepdim=keepdims),)
            # The last of equal extremes is the first one in the reversed axis: index = n - 1 - index'.
            cut = positive_axis(axis, x.dim())
            reversed_index = function(torch.flip(x, dims=(cut,)), dim=cut, keepdim=keepdims)
            return (x.shape[cut] - 1 - reversed_index,)

        return run

    return build


def is_inf(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    negative, positive = bool(attrs.get("detect_negative", 1)), bool(attrs.get("detect_positive", 1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        found = torch.zeros_like(x, dtype=torch.bool)
        if positive:
            found = found | torch.isposinf(x)
        if negative:
            found = found | torch.isneginf(x)
        return (found,)

    return run


def gather_nd(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    batch_dims = int(attrs.get("batch_dims", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        # data [b..., d..., rest...], indices [b..., m..., k]: each index row picks data[b, i_1..i_k].
        data, indices = xs[0], xs[1].to(torch.int64)
        depth = indices.shape[-1]
        batch = math.prod(data.shape[:batch_dims])
        picked_dims = data.shape[batch_dims : batch_dims + depth]
        flat_data = data.reshape(batch, *data.shape[batch_dims:])  # [B, d..., rest...]
        rows = indices.reshape(batch, -1, depth)  # [B, M, k]
        sizes = torch.tensor(picked_dims, dtype=torch.int64, device=rows.device)
        rows = torch.where(rows < 0, rows + sizes, rows)  # negative indices count from the end
        batch_index = torch.arange(batch, device=rows.device)[:, None].expand(batch, rows.shape[1])  # [B, M]
        coordinates = tuple(c.to(data.device) for c in (batch_index, *rows.unbind(-1)))
        picked = flat_data[coordinates]  # [B, M, rest...]
        shape = tuple(indices.shape[:-1]) + tuple(data.shape[batch_dims + depth :])
        return (picked.reshape(shape),)

    return run


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def softsign(x: Tensor) -> Tensor:
    return x / (1 + x.abs())


def mish(x: Tensor) -> Tensor:
    return x * torch.tanh(torch.nn.functional.softplus(x))


def selu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875))
    return lambda xs: (gamma * torch.where(xs[0] > 0, xs[0], alpha * torch.expm1(xs[0])),)


def celu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.0))
    return lambda xs: (torch.nn.functional.celu(xs[0], alpha),)


def thresholded_relu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.0))
    return lambda xs: (torch.where(xs[0] > alpha, xs[0], torch.zeros_like(xs[0])),)


def hard_swish(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    # y = x · max(0, min(1, x / 6 + 1/2))
    return lambda xs: (xs[0] * torch.clamp(xs[0] / 6 + 0.5, 0.0, 1.0),)


def swish(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.0))
    return lambda xs: (xs[0] * torch.sigmoid(alpha * xs[0]),)


def shrink(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    bias, lambd = float(attrs.get("bias", 0.0)), float(attrs.get("lambd", 0.5))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        y = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
        return (y.to(x.dtype),)

    return run


def prelu(a: Tensor, slope: Tensor) -> Tensor:
    return torch.where(a < 0, a * slope, a)


def mod(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    # fmod=1: the sign of the dividend (C's fmod); fmod=0: the sign of the divisor (Python's %).
    function = torch.fmod if int(attrs.get("fmod", 0)) else torch.remainder
    return lambda xs: (function(xs[0], xs[1]),)


def bit_shift(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    left = _text(attrs["direction"]) == "LEFT"
    function = torch.bitwise_left_shift if left else torch.bitwise_right_shift
    return lambda xs: (function(xs[0], xs[1]),)


def trilu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    upper = bool(attrs.get("upper", 1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        k = int(xs[1]) if len(xs) > 1 and xs[1] is not None else 0
        return ((torch.triu if upper else torch.tril)(xs[0], diagonal=k),)

    return run


def cumulative_sum(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    exclusive, reverse = bool(attrs.get("exclusive", 0)), bool(attrs.get("reverse", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        axis = positive_axis(int(xs[1]), x.dim())
        if reverse:
            x = torch.flip(x, dims=(axis,))
        y = torch.cumsum(x, dim=axis).to(x.dtype)
        if exclusive:  # shift by one: y_i = Σ_{j<i} x_j
            y = y - x
        if reverse:
            y = torch.flip(y, dims=(axis,))
        return (y,)

    return run


def top_k(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis, largest = int(attrs.get("axis", -1)), bool(attrs.get("largest", 1))

    def run(xs: list[Any]) -> tuple[Tensor, Tensor]:
        x = xs[0]
        k = int(xs[1].reshape(-1)[0]) if opset >= 10 else int(attrs["k"])
        # A stable sort keeps equal values in index order: the spec wants the lower index first.
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        return (values.narrow(axis, 0, k), indices.narrow(axis, 0, k))

    return run


def one_hot(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", -1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        indices, depth, values = xs[0], int(xs[1].reshape(-1)[0]), xs[2]  # values: [off, on]
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + depth, index)  # negative indices count from the end
        hot = index.unsqueeze(-1) == torch.arange(depth, device=index.device)  # [..., depth]; out of range: none
        y = torch.where(hot, values[1], values[0])
        cut = positive_axis(axis, indices.dim() + 1)
        return (torch.movedim(y, -1, cut),)

    return run


def non_zero(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if x.dim() == 0:
            return (torch.zeros((0, int(bool(x))), dtype=torch.int64),)
        return (torch.nonzero(x).transpose(0, 1).contiguous(),)  # [rank, count]

    return run


_SCATTER_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def scatter_nd(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    reduction = _text(attrs.get("reduction", "none"))
    if reduction != "none" and reduction not in _SCATTER_REDUCTIONS:
        raise refuse(node, f"reduction={reduction}")

    def run(xs: list[Any]) -> tuple[Tensor]:
        # data [d_1..d_k, rest...], indices [m..., k], updates [m..., rest...]
        data, indices, updates = xs[0], xs[1].to(torch.int64), xs[2]
        depth = indices.shape[-1]
        rows = indices.reshape(-1, depth)  # [M, k]
        sizes = torch.tensor(data.shape[:depth], dtype=torch.int64, device=rows.device)
        rows = torch.where(rows < 0, rows + sizes, rows)
        strides = torch.tensor([math.prod(data.shape[i + 1 : depth]) for i in range(depth)], dtype=torch.int64,
                               device=rows.device)
        flat_index = (rows * strides).sum(dim=1).to(data.device)  # [M] positions in the first k axes
        flat = data.reshape(math.prod(data.shape[:depth]), *data.shape[depth:]).clone()
        source = updates.reshape(rows.shape[0], *data.shape[depth:]).to(data.dtype)
        if reduction == "none":
            flat[flat_index] = source
        elif reduction == "add":
            flat.index_add_(0, flat_index, source)
        else:
            spread = flat_index.reshape(-1, *([1] * (source.dim() - 1))).expand_as(source)  # [M, rest...]
            flat = torch.scatter_reduce(flat, 0, spread, source, _SCATTER_REDUCTIONS[reduction])
        return (flat.reshape(data.shape),)

    return run


def scatter_elements(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))
    reduction = _text(attrs.get("reduction", "none"))
    if reduction != "none" and reduction not in _SCATTER_REDUCTIONS:
        raise refuse(node, f"reduction={reduction}")

    def run(xs: list[Any]) -> tuple[Tensor]:
        data, indices, updates = xs[0], xs[1].to(torch.int64), xs[2].to(xs[0].dtype)
        cut = positive_axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[cut], indices).to(data.device)
        if reduction == "none":
            return (torch.scatter(data, cut, indices, updates),)
        return (torch.scatter_reduce(data, cut, indices, updates, _SCATTER_REDUCTIONS[reduction]),)

    return run


def einsum(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    equation = _text(attrs["equation"]).replace(" ", "")
    return lambda xs: (torch.einsum(equation, *xs),)


def eye_like(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    dtype = torch_dtype(int(attrs["dtype"])) if "dtype" in attrs else None
    k = int(attrs.get("k", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        rows, columns = x.shape
        diagonal = torch.arange(columns)[None, :] - torch.arange(rows)[:, None] == k  # [rows, columns]
        return (diagonal.to(dtype or x.dtype),)

    return run


def depth_to_space(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    block = int(attrs["blocksize"])
    column_first = _text(attrs.get("mode", "DCR")) == "CRD"

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]  # [N, C, H, W] → [N, C / b², H b, W b]
        n, c, h, w = x.shape
        if column_first:
            y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
        return (y.reshape(n, c // block**2, h * block, w * block),)

    return run


def space_to_depth(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    block = int(attrs["blocksize"])
    column_first = _text(attrs.get("mode", "DCR")) == "CRD"

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]  # [N, C, H, W] → [N, C b², H / b, W / b]
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // block, block, w // block, block)
        y = y.permute(0, 1, 3, 5, 2, 4) if column_first else y.permute(0, 3, 5, 1, 2, 4)
        return (y.reshape(n, c * block**2, h // block, w // block),)

    return run


def lp_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis, power = int(attrs.get("axis", -1)), int(attrs.get("p", 2))
    if power not in (1, 2):
        raise refuse(node, f"p={power} (1 or 2)")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        norm = torch.linalg.vector_norm(x, ord=power, dim=axis, keepdim=True)
        return (torch.where(norm == 0, torch.zeros_like(x), x / norm),)

    return run


def mean_variance_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axes = [int(a) for a in attrs.get("axes", [0, 2, 3])]

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        dims = tuple(positive_axis(a, x.dim()) for a in axes)
        mean = x.mean(dim=dims, keepdim=True)
        deviation = torch.sqrt((x * x).mean(dim=dims, keepdim=True) - mean * mean)
        return ((x - mean) / (deviation + 1e-9),)  # the function body's ε

    return run


def rms_normalization(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis, epsilon = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    in_float32 = int(attrs.get("stash_type", 1)) == 1

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, scale = xs[0], xs[1]
        # y = x / √(mean(x²) + ε) · scale, the mean over the axes from ``axis`` on
        dims = tuple(range(positive_axis(axis, x.dim()), x.dim()))
        wide = x.float() if in_float32 else x
        normalized = wide * torch.rsqrt((wide * wide).mean(dim=dims, keepdim=True) + epsilon)
        return (normalized.to(x.dtype) * scale,)

    return run


def compress(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = attrs.get("axis")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, condition = xs[0], xs[1].to(torch.bool)
        if axis is None:
            x = x.reshape(-1)
            cut = 0
        else:
            cut = positive_axis(int(axis), x.dim())
        kept = torch.nonzero(condition[: x.shape[cut]]).reshape(-1).to(x.device)
        return (torch.index_select(x, cut, kept),)

    return run


def reduce_log_sum_exp(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.logsumexp(x, dim=dims, keepdim=keepdims).to(x.dtype)


def reduce_log_sum(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.log(torch.sum(x, dim=dims, keepdim=keepdims))


def reduce_l1(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.sum(x.abs(), dim=dims, keepdim=keepdims).to(x.dtype)


def reduce_sum_square(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.sum(x * x, dim=dims, keepdim=keepdims).to(x.dtype)


def attention(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    """ONNX Attention (opset 23+): scaled dot-product attention with masks, caches, GQA and softcap.

    Letters: ``B`` batch, ``Hq``/``Hkv`` query and key-value heads, ``S``/``L`` query and key sequence
    lengths, ``E``/``Ev`` head sizes. 3-D inputs ``[B, S, Hq·E]`` are split into heads first.
    """
    scale_attribute = attrs.get("scale")
    causal = bool(attrs.get("is_causal", 0))
    q_heads, kv_heads = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    softcap = float(attrs.get("softcap", 0.0))
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    precision = attrs.get("softmax_precision")
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))

    def heads(x: Tensor, count: int) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], count, -1).transpose(1, 2)  # [B, S, H·E] → [B, H, S, E]

    def run(xs: list[Any]) -> tuple[Tensor, ...]:
        xs = list(xs) + [None] * (7 - len(xs))
        q, k, v, mask, past_key, past_value, nonpad = xs[:7]
        three_d = q.dim() == 3
        if three_d:
            q, k, v = heads(q, int(q_heads)), heads(k, int(kv_heads)), heads(v, int(kv_heads))
        scale = float(scale_attribute) if scale_attribute is not None else 1 / math.sqrt(q.shape[-1])
        root = torch.tensor(math.sqrt(scale), dtype=q.dtype, device=q.device)  # on Q and on K, as the function body
        present_key = k if past_key is None else torch.cat([past_key, k], dim=2)  # [B, Hkv, L, E]
        present_value = v if past_value is None else torch.cat([past_value, v], dim=2)
        length_q, length_kv = q.shape[2], present_key.shape[2]
        # The additive bias [.., S, L]: 0 where a query may attend a key, -inf where not.
        device = q.device
        zero = torch.tensor(0.0, dtype=q.dtype, device=device)
        negative = torch.tensor(-math.inf, dtype=q.dtype, device=device)
        bias = torch.zeros((length_q, length_kv), dtype=q.dtype, device=device)
        if mask is not None:
            if mask.shape[-1] < length_kv:  # a short mask is padded with "masked"
                pad_value = False if mask.dtype == torch.bool else -math.inf
                mask = torch.nn.functional.pad(mask, (0, length_kv - mask.shape[-1]), value=pad_value)
            if mask.dtype == torch.bool:
                mask = torch.where(mask.to(device), zero, negative)
            bias = bias + mask.to(device)
        past = past_key.shape[2] if past_key is not None else 0
        offset: Tensor | int = past
        if past_key is None and nonpad is not None:
            offset = (nonpad.reshape(-1, 1, 1, 1) - length_q).to(torch.int64).to(device)  # [B, 1, 1, 1]
        query = torch.arange(length_q, device=device).reshape(-1, 1)  # [S, 1]
        key = torch.arange(length_kv, device=device).reshape(1, -1)  # [1, L]
        if causal:  # bottom-right aligned: query i attends key j ≤ i + offset
            bias = bias + torch.where(key <= query + offset, zero, negative)
        if left >= 0 or right >= 0:
            difference = query + offset - key
            allowed = torch.ones_like(difference, dtype=torch.bool)
            if left >= 0:
                allowed = allowed & (difference <= left)
            if right >= 0:
                allowed = allowed & (-difference <= right)
            bias = bias + torch.where(allowed, zero, negative)
        if nonpad is not None:
            padding = torch.arange(length_kv, device=device)[None, :] < nonpad.to(device).reshape(-1, 1)  # [B, L]
            bias = bias + torch.where(padding, zero, negative).reshape(-1, 1, 1, length_kv)
        k_all, v_all = present_key, present_value
        if q.shape[1] != k_all.shape[1]:  # grouped-query attention: each KV head serves Hq / Hkv query heads
            repeats = q.shape[1] // k_all.shape[1]
            k_all, v_all = k_all.repeat_interleave(repeats, dim=1), v_all.repeat_interleave(repeats, dim=1)
        scores = (q * root) @ (k_all * root).transpose(-1, -2)  # [B, Hq, S, L]
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        with_bias = scores + bias
        exposed = with_bias if mode == 2 else scores
        logits = with_bias.to(torch_dtype(int(precision))) if precision is not None else with_bias
        # A row with no key to attend (all -inf) gives zero probabilities, not NaN.
        blocked = torch.isneginf(torch.amax(bias, dim=-1, keepdim=True))
        safe = torch.where(torch.isneginf(logits.amax(dim=-1, keepdim=True)), torch.zeros_like(logits), logits)
        probabilities = softmax(safe, dim=-1)
        probabilities = torch.where(blocked, torch.zeros_like(probabilities), probabilities).to(q.dtype)
        if mode == 3:
            exposed = probabilities
        y = probabilities @ v_all  # [B, Hq, S, Ev]
        if three_d:
            y = y.transpose(1, 2).reshape(y.shape[0], length_q, -1)  # [B, S, Hq·Ev]
        return (y, present_key, present_value, exposed.to(q.dtype))

    return run
