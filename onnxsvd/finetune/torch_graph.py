"""Running an ONNX graph in torch: an evaluator of the project's own, for the ops exported models use.

:class:`TorchGraph` is a ``torch.nn.Module`` built from an ``onnx.ModelProto``. It executes the nodes in
topological order with torch ops, so gradients flow through the whole graph to any initializer whose
value the caller provides at run time (``provided`` names, fed through ``overrides``); every other
initializer and every ``Constant`` node is a buffer (float) or a CPU tensor (integers, booleans: shape
arithmetic stays on the host, and an operand is moved to the accelerator only where it meets one).

The registry :data:`OPS` (op type → builder) is the one list of supported ops; a model with any other op,
a non-default domain, or a subgraph (If, Loop, Scan) is refused up front with
:class:`onnxsvd.errors.UnsupportedOpError` naming the op and the node. Semantics follow the ONNX
specification, including the opset-dependent forms (attribute or input ``axes`` for Unsqueeze, Squeeze
and the reductions; Slice, Clip and Softmax before and after their opset changes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxsvd.errors import ModelError, UnsupportedOpError

__all__ = ["OPS", "TorchGraph", "supported_ops", "check_supported", "torch_dtype"]

Tensor = torch.Tensor
#: A compiled node: input tensors (``None`` for an omitted optional input) → output tensors.
Kernel = Callable[[list[Any]], Sequence[Any]]
#: A builder: (node, attributes, opset of the default domain) → kernel.
Builder = Callable[[onnx.NodeProto, dict[str, Any], int], Kernel]

_TORCH_DTYPES: dict[int, torch.dtype] = {
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
    if onnx_dtype not in _TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_dtype)
        raise UnsupportedOpError(f"tensor type {name} is not supported by the torch evaluator")
    return _TORCH_DTYPES[onnx_dtype]


def _to_tensor(proto: onnx.TensorProto) -> Tensor:
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        array = np.array(numpy_helper.to_array(proto), dtype=np.float32)  # a copy; 0-d stays 0-d
        return torch.from_numpy(array).to(torch.bfloat16)
    dtype = torch_dtype(proto.data_type)
    array = np.array(numpy_helper.to_array(proto))  # a contiguous, writable copy; 0-d stays 0-d
    return torch.from_numpy(array).to(dtype)


def _ints(value: Tensor | None) -> list[int]:
    """A 0-d or 1-d integer tensor (shapes, axes, indices of Slice) as Python ints."""
    if value is None:
        return []
    return [int(v) for v in value.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------------------------------------
# Kernels. Each builder parses the node's attributes once and returns a closure over them.


def _unary(function: Callable[[Tensor], Tensor]) -> Builder:
    return lambda node, attrs, opset: lambda xs: (function(xs[0]),)


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    return lambda node, attrs, opset: lambda xs: (function(xs[0], xs[1]),)


def _variadic(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        def run(xs: list[Any]) -> tuple[Tensor]:
            present = [x for x in xs if x is not None]
            result = present[0]
            for other in present[1:]:
                result = function(result, other)
            return (result,)

        return run

    return build


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates toward zero


def _power(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)  # ONNX Pow's output has the base's type


def _matmul(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (torch.matmul(xs[0], xs[1]),)


def _gemm(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
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


def _softmax_like(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        if opset >= 13:
            axis = int(attrs.get("axis", -1))
            return lambda xs: (function(xs[0], dim=axis),)
        axis = int(attrs.get("axis", 1))

        def run(xs: list[Any]) -> tuple[Tensor]:
            # Before opset 13 the input is coerced to 2-D at ``axis`` and normalised over the second part.
            x = xs[0]
            cut = _axis(axis, x.dim())
            flat = x.reshape(math.prod(x.shape[:cut]), -1)
            return (function(flat, dim=1).reshape(x.shape),)

        return run

    return build


def _layer_norm(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis, epsilon = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    want_stats = len(node.output) > 1 and any(node.output[1:])

    def run(xs: list[Any]) -> tuple[Any, ...]:
        x, scale = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        cut = _axis(axis, x.dim())
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


def _gelu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    approximate = attrs.get("approximate", "none")
    return lambda xs: (torch.nn.functional.gelu(xs[0], approximate=approximate),)


_REDUCE_AXES_AS_INPUT = {"ReduceSum": 13}  # the others take ``axes`` as an input from opset 18


def _reduce(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        keepdims = bool(attrs.get("keepdims", 1))
        noop_when_empty = bool(attrs.get("noop_with_empty_axes", 0))
        from_input = opset >= _REDUCE_AXES_AS_INPUT.get(node.op_type, 18)
        attribute_axes = [int(a) for a in attrs.get("axes", [])]

        def run(xs: list[Any]) -> tuple[Tensor]:
            x = xs[0]
            axes = _ints(xs[1] if len(xs) > 1 else None) if from_input else attribute_axes
            if not axes:
                if noop_when_empty:
                    return (x,)
                axes = list(range(x.dim()))
            dims = sorted(_axis(a, x.dim()) for a in axes)
            return (function(x, dims, keepdims),)

        return run

    return build


def _reduce_max(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.amax(x, dim=dims, keepdim=keepdims)


def _reduce_min(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.amin(x, dim=dims, keepdim=keepdims)


def _reduce_prod(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdims)
    return x


def _reduce_l2(x: Tensor, dims: list[int], keepdims: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keepdims))


def _transpose(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    perm = attrs.get("perm")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        order = [int(p) for p in perm] if perm is not None else list(reversed(range(x.dim())))
        return (x.permute(order),)

    return run


def _reshape(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    allow_zero = bool(attrs.get("allowzero", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x, shape = xs[0], _ints(xs[1])
        if not allow_zero:
            shape = [x.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]  # 0 copies the input's dim
        return (x.reshape(shape),)

    return run


def _shape(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    start, end = attrs.get("start"), attrs.get("end")

    def run(xs: list[Any]) -> tuple[Tensor]:
        dims = list(xs[0].shape)
        begin = 0 if start is None else int(start)
        stop = len(dims) if end is None else int(end)
        return (torch.tensor(dims[slice(begin, stop)], dtype=torch.int64),)

    return run


def _size(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (torch.tensor(xs[0].numel(), dtype=torch.int64),)


def _gather(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        data, indices = xs[0], xs[1].to(torch.int64)
        cut = _axis(axis, data.dim())
        size = data.shape[cut]
        flat = torch.where(indices < 0, indices + size, indices).reshape(-1)  # negative indices count from the end
        picked = torch.index_select(data, cut, flat.to(data.device))
        shape = list(data.shape[:cut]) + list(indices.shape) + list(data.shape[cut + 1 :])
        return (picked.reshape(shape),)

    return run


def _gather_elements(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))

    def run(xs: list[Any]) -> tuple[Tensor]:
        data, indices = xs[0], xs[1].to(torch.int64)
        cut = _axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[cut], indices)
        return (torch.gather(data, cut, indices),)

    return run


def _unsqueeze(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    attribute_axes = [int(a) for a in attrs.get("axes", [])]

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        axes = _ints(xs[1]) if opset >= 13 else attribute_axes
        rank = x.dim() + len(axes)
        for axis in sorted(_axis(a, rank) for a in axes):
            x = x.unsqueeze(axis)
        return (x,)

    return run


def _squeeze(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    attribute_axes = attrs.get("axes")

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if opset >= 13:
            axes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None
        else:
            axes = [int(a) for a in attribute_axes] if attribute_axes is not None else None
        if axes is None:
            return (x.squeeze(),) if x.dim() else (x,)
        kept = [size for i, size in enumerate(x.shape) if i not in {_axis(a, x.dim()) for a in axes}]
        return (x.reshape(kept),)

    return run


def _concat(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
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


def _slice(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        if opset >= 10:
            starts, ends = _ints(xs[1]), _ints(xs[2])
            axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
            steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
        else:
            starts, ends = [int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]]
            axes = [int(v) for v in attrs.get("axes", range(len(starts)))]
            steps = [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            x = _slice_one(x, _axis(axis, x.dim()), start, end, step)
        return (x,)

    return run


def _split(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 0))
    attribute_split = attrs.get("split")
    outputs = len(node.output)
    num_outputs = attrs.get("num_outputs")

    def run(xs: list[Any]) -> Sequence[Tensor]:
        x = xs[0]
        cut = _axis(axis, x.dim())
        if opset >= 13:
            sizes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else None
        else:
            sizes = [int(s) for s in attribute_split] if attribute_split is not None else None
        if sizes is None:
            count = int(num_outputs) if num_outputs is not None else outputs
            chunk = -(-x.shape[cut] // count)  # the last chunk may be smaller (opset 18)
            sizes = [min(chunk, x.shape[cut] - i * chunk) for i in range(count)]
        return tuple(torch.split(x, sizes, dim=cut))

    return run


def _cast(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    dtype = torch_dtype(int(attrs["to"]))
    return lambda xs: (xs[0].to(dtype),)


def _cast_like(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0].to(xs[1].dtype),)


def _where(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x, y = xs[1], xs[2]
        return (torch.where(xs[0].to(torch.bool), x, y.to(x.dtype)),)

    return run


def _compare(function: Callable[[Tensor, Tensor], Tensor]) -> Builder:
    return _binary(function)


def _expand(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        x, shape = xs[0], _ints(xs[1])
        target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))  # Expand broadcasts both ways
        return (x.expand(target),)

    return run


def _tile(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0].repeat(_ints(xs[1])),)


def _constant_of_shape(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    value = attrs.get("value")
    fill = _to_tensor(value).reshape(-1) if value is not None else torch.zeros(1, dtype=torch.float32)

    def run(xs: list[Any]) -> tuple[Tensor]:
        return (torch.full(_ints(xs[0]), fill.item(), dtype=fill.dtype),)

    return run


def _identity(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    return lambda xs: (xs[0],)


def _dropout(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    # Inference semantics: the input unchanged, and an all-true mask when one is asked for.
    return lambda xs: (xs[0], torch.ones_like(xs[0], dtype=torch.bool))


def _range(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        start, limit, delta = xs
        dtype = start.dtype
        return (torch.arange(start.item(), limit.item(), delta.item(), dtype=dtype, device=start.device),)

    return run


def _flatten(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    axis = int(attrs.get("axis", 1))

    def run(xs: list[Any]) -> tuple[Tensor]:
        x = xs[0]
        cut = _axis(axis, x.dim())
        return (x.reshape(math.prod(x.shape[:cut]), math.prod(x.shape[cut:])),)

    return run


def _clip(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
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


def _leaky_relu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    slope = float(attrs.get("alpha", 0.01))
    return lambda xs: (torch.nn.functional.leaky_relu(xs[0], slope),)


def _hard_sigmoid(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return lambda xs: (torch.clamp(xs[0] * alpha + beta, 0.0, 1.0),)


def _elu(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    alpha = float(attrs.get("alpha", 1.0))
    return lambda xs: (torch.nn.functional.elu(xs[0], alpha),)


def _mean(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    def run(xs: list[Any]) -> tuple[Tensor]:
        present = [x for x in xs if x is not None]
        total = present[0]
        for other in present[1:]:
            total = total + other
        return (total / len(present),)

    return run


def _arg(function: Callable[..., Tensor]) -> Builder:
    def build(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
        axis, keepdims = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1))
        if int(attrs.get("select_last_index", 0)):
            raise UnsupportedOpError(
                f"op '{node.op_type}' with select_last_index=1 (node '{node.name}') is not supported by the "
                "torch evaluator"
            )
        return lambda xs: (function(xs[0], dim=axis, keepdim=keepdims),)

    return build


#: The supported ops: op type → builder. One registry, read by :func:`supported_ops` and the error message.
OPS: dict[str, Builder] = {
    # linear algebra
    "MatMul": _matmul,
    "Gemm": _gemm,
    # element-wise arithmetic (numpy broadcasting, as ONNX's multidirectional broadcasting)
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_divide),
    "Pow": _binary(_power),
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Clip": _clip,
    # activations
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "HardSigmoid": _hard_sigmoid,
    "Softplus": _unary(torch.nn.functional.softplus),
    "Gelu": _gelu,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "LayerNormalization": _layer_norm,
    # reductions
    "ReduceMean": _reduce(lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep)),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(_reduce_min),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceL2": _reduce(_reduce_l2),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    # shapes and indexing
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Shape": _shape,
    "Size": _size,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Expand": _expand,
    "Tile": _tile,
    "Flatten": _flatten,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Identity": _identity,
    "Dropout": _dropout,
    # types and logic
    "Cast": _cast,
    "CastLike": _cast_like,
    "Where": _where,
    "Equal": _compare(torch.eq),
    "Greater": _compare(torch.gt),
    "GreaterOrEqual": _compare(torch.ge),
    "Less": _compare(torch.lt),
    "LessOrEqual": _compare(torch.le),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    # Constant is evaluated once when the module is built (see TorchGraph).
    "Constant": _identity,
}


def supported_ops() -> list[str]:
    """The op types the evaluator runs, sorted."""
    return sorted(OPS)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _unsupported(node: onnx.NodeProto, position: int, what: str | None = None) -> UnsupportedOpError:
    op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    name = node.name or f"{node.op_type}_{position}"
    return UnsupportedOpError(
        f"op '{op}' (node '{name}'){what or ''} is not supported by the torch evaluator; "
        f"finetune supports: {', '.join(supported_ops())}"
    )


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse, before any work, a model the evaluator cannot run.

    Raises:
        UnsupportedOpError: one line naming the first unsupported op and its node.
    """
    for position, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            raise _unsupported(node, position)
        subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        if any(attribute.type in subgraphs for attribute in node.attribute):
            raise _unsupported(node, position, " with a subgraph")


def _constant_value(node: onnx.NodeProto, position: int) -> Tensor:
    """The value of a ``Constant`` node."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return _to_tensor(attribute.t)
        if attribute.name == "value_float":
            return torch.tensor(attribute.f, dtype=torch.float32)
        if attribute.name == "value_floats":
            return torch.tensor(list(attribute.floats), dtype=torch.float32)
        if attribute.name == "value_int":
            return torch.tensor(attribute.i, dtype=torch.int64)
        if attribute.name == "value_ints":
            return torch.tensor(list(attribute.ints), dtype=torch.int64)
    raise _unsupported(node, position, " holding a string or sparse value")


def _toposort(graph: onnx.GraphProto) -> list[tuple[int, onnx.NodeProto]]:
    """Nodes in an order where each runs after the producers of its inputs (graph order when it is one)."""
    available = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}
    pending = list(enumerate(graph.node))
    ordered: list[tuple[int, onnx.NodeProto]] = []
    while pending:
        waiting = []
        for position, node in pending:
            if all(name in available for name in node.input):
                ordered.append((position, node))
                available.update(node.output)
            else:
                waiting.append((position, node))
        if len(waiting) == len(pending):
            missing = sorted({n for _, node in waiting for n in node.input if n not in available})
            raise ModelError(f"the graph has a cycle or reads undefined tensors ({', '.join(missing[:3])})")
        pending = waiting
    return ordered


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a torch module.

    Args:
        model: the model (its main graph is compiled once; the proto is not kept).
        provided: initializer names whose values the caller passes to :meth:`forward` in ``overrides``
            (the trainable factors); they are not stored here.

    Raises:
        UnsupportedOpError: an op, domain or subgraph the evaluator cannot run.
    """

    def __init__(self, model: onnx.ModelProto, provided: Collection[str] = ()) -> None:
        super().__init__()
        check_supported(model)
        graph = model.graph
        opset = _opset(model)
        self.provided = frozenset(provided)
        initializer_names = {t.name for t in graph.initializer}
        missing = sorted(self.provided - initializer_names)
        if missing:
            raise ModelError(f"provided tensors {missing[:3]} are not initializers of the model")
        self.input_names = [v.name for v in graph.input if v.name not in initializer_names]
        self.output_names = [v.name for v in graph.output]
        # Constants: floats are buffers (they follow .to(device)); integers and booleans stay on the CPU.
        self._buffer_of: dict[str, str] = {}
        self._host: dict[str, Tensor] = {}
        for tensor in graph.initializer:
            if tensor.name not in self.provided:
                self._store(tensor.name, _to_tensor(tensor))
        self._steps: list[tuple[Kernel, list[str], list[str]]] = []
        for position, node in _toposort(graph):
            if node.op_type == "Constant":
                self._store(node.output[0], _constant_value(node, position))
                continue
            attrs = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
            kernel = OPS[node.op_type](node, attrs, opset)
            self._steps.append((kernel, list(node.input), list(node.output)))
        # The last step that reads each tensor, so intermediates are released as soon as possible.
        self._last_use: dict[str, int] = {}
        for index, (_, inputs, _) in enumerate(self._steps):
            for name in inputs:
                self._last_use[name] = index

    def _store(self, name: str, value: Tensor) -> None:
        if value.is_floating_point():
            key = f"constant_{len(self._buffer_of)}"
            self.register_buffer(key, value)
            self._buffer_of[name] = key
        else:
            self._host[name] = value

    def constant(self, name: str) -> Tensor:
        """The stored value of an initializer or ``Constant`` output."""
        if name in self._buffer_of:
            return getattr(self, self._buffer_of[name])
        return self._host[name]

    def forward(
        self,
        feeds: Mapping[str, Tensor],
        overrides: Mapping[str, Tensor] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Run the graph.

        Args:
            feeds: a tensor per graph input.
            overrides: a value for every ``provided`` initializer (and optionally others).
            outputs: tensors to return (graph outputs by default; any intermediate name works).

        Returns:
            ``{name: tensor}`` for each requested output.
        """
        wanted = list(outputs) if outputs is not None else self.output_names
        keep = set(wanted)
        values: dict[str, Any] = {"": None}
        values.update(self._host)
        values.update({name: getattr(self, key) for name, key in self._buffer_of.items()})
        values.update(feeds)
        if overrides:
            values.update(overrides)
        absent = [name for name in list(self.input_names) + list(self.provided) if name not in values]
        if absent:
            raise ModelError(f"no value given for {', '.join(absent[:3])}")
        for index, (kernel, inputs, names) in enumerate(self._steps):
            arguments = [values[name] for name in inputs]
            arguments = _on_one_device(arguments)
            results = kernel(arguments)
            for name, result in zip(names, results, strict=False):
                if name:
                    values[name] = result
            for name in inputs:
                if name and self._last_use.get(name) == index and name not in keep and name in values:
                    if name not in self._host and name not in self._buffer_of:
                        del values[name]
        return {name: values[name] for name in wanted}


def _on_one_device(arguments: list[Any]) -> list[Any]:
    """Move host tensors next to the first accelerator tensor among a node's inputs (no-op on CPU)."""
    device = None
    for value in arguments:
        if isinstance(value, Tensor) and value.device.type != "cpu":
            device = value.device
            break
    if device is None:
        return arguments
    return [v.to(device) if isinstance(v, Tensor) and v.device != device else v for v in arguments]
