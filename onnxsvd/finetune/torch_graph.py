"""Running an ONNX graph in torch: an evaluator of the project's own, for the ops exported models use.

:class:`TorchGraph` is a ``torch.nn.Module`` built from an ``onnx.ModelProto``. It executes the nodes in
topological order with torch ops, so gradients flow through the whole graph to any initializer whose
value the caller provides at run time (``provided`` names, fed through ``overrides``); every other
initializer and every ``Constant`` node is a buffer (float) or a CPU tensor (integers, booleans: shape
arithmetic stays on the host, and an operand is moved to the accelerator only where it meets one).

The registry :data:`OPS` (op type → builder) is the one list of supported ops; the builders live by
family in :mod:`~onnxsvd.finetune.torch_kernels` (element-wise, reductions, shapes, indexing, attention),
:mod:`~onnxsvd.finetune.torch_nn_kernels` (convolutions, pools, normalisation, padding, resizing) and
:mod:`~onnxsvd.finetune.torch_rnn_kernels` (RNN, GRU, LSTM). A model with any other op, a non-default
domain, a subgraph (If, Loop, Scan), or a tensor of a type torch cannot hold is refused up front with
:class:`onnxsvd.errors.UnsupportedOpError` naming the op and the node (or the tensor); a variant of a
supported op that no kernel runs is refused the same way, naming the variant. Semantics follow the ONNX
specification, including the opset-dependent forms; ``tests/test_torch_graph_conformance.py`` runs the
specification's node test cases for every op in :data:`OPS`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import onnx
import torch
from onnx import helper

from onnxsvd.errors import ModelError, QuantizationError, UnsupportedOpError
from onnxsvd.finetune import torch_kernels as kernels
from onnxsvd.finetune import torch_nn_kernels as nn_kernels
from onnxsvd.finetune import torch_rnn_kernels as rnn_kernels
from onnxsvd.finetune.torch_kernels import Builder, Kernel, Tensor, torch_dtype
from onnxsvd.quantize import dequantized_weight

__all__ = ["CONTRIB_OPS", "OPS", "TorchGraph", "supported_ops", "check_supported", "torch_dtype"]

#: The supported ops: op type → builder. One registry, read by :func:`supported_ops` and the error message.
OPS: dict[str, Builder] = {
    # linear algebra
    "MatMul": kernels.matmul,
    "Gemm": kernels.gemm,
    # element-wise arithmetic (numpy broadcasting, as ONNX's multidirectional broadcasting)
    "Add": kernels.binary(torch.add),
    "Sub": kernels.binary(torch.sub),
    "Mul": kernels.binary(torch.mul),
    "Div": kernels.binary(kernels.divide),
    "Pow": kernels.binary(kernels.power),
    "Min": kernels.variadic(torch.minimum),
    "Max": kernels.variadic(torch.maximum),
    "Sum": kernels.variadic(torch.add),
    "Mean": kernels.mean_op,
    "Sqrt": kernels.unary(torch.sqrt),
    "Reciprocal": kernels.unary(torch.reciprocal),
    "Neg": kernels.unary(torch.neg),
    "Abs": kernels.unary(torch.abs),
    "Exp": kernels.unary(torch.exp),
    "Log": kernels.unary(torch.log),
    "Floor": kernels.unary(torch.floor),
    "Ceil": kernels.unary(torch.ceil),
    "Sign": kernels.unary(torch.sign),
    "IsNaN": kernels.unary(torch.isnan),
    "IsInf": kernels.is_inf,
    "Sin": kernels.unary(torch.sin),
    "Cos": kernels.unary(torch.cos),
    "Clip": kernels.clip,
    "Mod": kernels.mod,
    "BitShift": kernels.bit_shift,
    "Round": kernels.unary(torch.round),  # half to even, as ONNX
    "Tan": kernels.unary(torch.tan),
    "Asin": kernels.unary(torch.asin),
    "Acos": kernels.unary(torch.acos),
    "Atan": kernels.unary(torch.atan),
    "Sinh": kernels.unary(torch.sinh),
    "Cosh": kernels.unary(torch.cosh),
    "Asinh": kernels.unary(torch.asinh),
    "Acosh": kernels.unary(torch.acosh),
    "Atanh": kernels.unary(torch.atanh),
    "Det": kernels.unary(torch.linalg.det),
    "Einsum": kernels.einsum,
    # activations
    "Erf": kernels.unary(torch.erf),
    "Tanh": kernels.unary(torch.tanh),
    "Sigmoid": kernels.unary(torch.sigmoid),
    "Relu": kernels.unary(torch.relu),
    "LeakyRelu": kernels.leaky_relu,
    "Elu": kernels.elu,
    "HardSigmoid": kernels.hard_sigmoid,
    "Softplus": kernels.unary(torch.nn.functional.softplus),
    "Gelu": kernels.gelu,
    "PRelu": kernels.binary(kernels.prelu),
    "Selu": kernels.selu,
    "Celu": kernels.celu,
    "ThresholdedRelu": kernels.thresholded_relu,
    "HardSwish": kernels.hard_swish,
    "Swish": kernels.swish,
    "Mish": kernels.unary(kernels.mish),
    "Softsign": kernels.unary(kernels.softsign),
    "Shrink": kernels.shrink,
    "Softmax": kernels.softmax_like(kernels.softmax),
    "LogSoftmax": kernels.softmax_like(torch.log_softmax),
    "LayerNormalization": kernels.layer_norm,
    "RMSNormalization": kernels.rms_normalization,
    "Attention": kernels.attention,
    "LpNormalization": kernels.lp_normalization,
    "MeanVarianceNormalization": kernels.mean_variance_normalization,
    # convolutional networks
    "Conv": nn_kernels.conv,
    "ConvTranspose": nn_kernels.conv_transpose,
    "BatchNormalization": nn_kernels.batch_normalization,
    "InstanceNormalization": nn_kernels.instance_normalization,
    "GroupNormalization": nn_kernels.group_normalization,
    "MaxPool": nn_kernels.max_pool,
    "AveragePool": nn_kernels.average_pool,
    "LpPool": nn_kernels.lp_pool,
    "GlobalAveragePool": nn_kernels.global_pool("average"),
    "GlobalMaxPool": nn_kernels.global_pool("max"),
    "Pad": nn_kernels.pad,
    "Resize": nn_kernels.resize,
    "Upsample": nn_kernels.resize,
    # recurrent networks
    "RNN": rnn_kernels.recurrent,
    "GRU": rnn_kernels.recurrent,
    "LSTM": rnn_kernels.recurrent,
    # reductions
    "ReduceMean": kernels.reduce_op(lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep)),
    "ReduceSum": kernels.reduce_op(lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep)),
    "ReduceMax": kernels.reduce_op(kernels.reduce_max),
    "ReduceMin": kernels.reduce_op(kernels.reduce_min),
    "ReduceProd": kernels.reduce_op(kernels.reduce_prod),
    "ReduceL2": kernels.reduce_op(kernels.reduce_l2),
    "ReduceL1": kernels.reduce_op(kernels.reduce_l1),
    "ReduceSumSquare": kernels.reduce_op(kernels.reduce_sum_square),
    "ReduceLogSum": kernels.reduce_op(kernels.reduce_log_sum),
    "ReduceLogSumExp": kernels.reduce_op(kernels.reduce_log_sum_exp),
    "CumSum": kernels.cumulative_sum,
    "TopK": kernels.top_k,
    "ArgMax": kernels.arg_reduce(torch.argmax),
    "ArgMin": kernels.arg_reduce(torch.argmin),
    # shapes and indexing
    "Transpose": kernels.transpose,
    "Reshape": kernels.reshape,
    "Shape": kernels.shape_op,
    "Size": kernels.size_op,
    "Gather": kernels.gather,
    "GatherElements": kernels.gather_elements,
    "GatherND": kernels.gather_nd,
    "ScatterND": kernels.scatter_nd,
    "ScatterElements": kernels.scatter_elements,
    "NonZero": kernels.non_zero,
    "Compress": kernels.compress,
    "OneHot": kernels.one_hot,
    "Trilu": kernels.trilu,
    "EyeLike": kernels.eye_like,
    "DepthToSpace": kernels.depth_to_space,
    "SpaceToDepth": kernels.space_to_depth,
    "Unsqueeze": kernels.unsqueeze,
    "Squeeze": kernels.squeeze,
    "Concat": kernels.concat_op,
    "Slice": kernels.slice_op,
    "Split": kernels.split_op,
    "Expand": kernels.expand_op,
    "Tile": kernels.tile_op,
    "Flatten": kernels.flatten,
    "Range": kernels.range_op,
    "ConstantOfShape": kernels.constant_of_shape,
    "Identity": kernels.identity_op,
    "Dropout": kernels.dropout,
    # types and logic
    "Cast": kernels.cast_op,
    "CastLike": kernels.cast_like,
    "Where": kernels.where_op,
    "Equal": kernels.compare_op(torch.eq),
    "Greater": kernels.compare_op(torch.gt),
    "GreaterOrEqual": kernels.compare_op(torch.ge),
    "Less": kernels.compare_op(torch.lt),
    "LessOrEqual": kernels.compare_op(torch.le),
    "Not": kernels.unary(torch.logical_not),
    "And": kernels.binary(torch.logical_and),
    "Or": kernels.binary(torch.logical_or),
    "Xor": kernels.binary(torch.logical_xor),
    # quantized weights: the dequantized weight is a fixed tensor (see CONTRIB_OPS for MatMulNBits)
    "DequantizeLinear": kernels.dequantize_linear,
    # Constant is evaluated once when the module is built (see TorchGraph).
    "Constant": kernels.identity_op,
}

#: Ops of other domains: (domain, op type) → builder. ``MatMulNBits`` reads its packed weight as a fixed
#: ``Ŵ`` that :class:`TorchGraph` reads back from ONNX Runtime's kernel when it is built
#: (:func:`onnxsvd.quantize.dequantized_weight`), so torch multiplies by exactly the weight ONNX Runtime
#: uses; with ``accuracy_level=4`` ONNX Runtime also rounds the activations to int8, which torch does not.
CONTRIB_OPS: dict[tuple[str, str], Builder] = {
    ("com.microsoft", "MatMulNBits"): kernels.matmul_nbits,
}


def supported_ops() -> list[str]:
    """The op types the evaluator runs, sorted (those of other domains as ``domain.op``)."""
    return sorted(OPS) + sorted(f"{domain}.{op}" for domain, op in CONTRIB_OPS)


def _builder(node: onnx.NodeProto) -> Builder | None:
    if node.domain in ("", "ai.onnx"):
        return OPS.get(node.op_type)
    return CONTRIB_OPS.get((node.domain, node.op_type))


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


def _check_types(graph: onnx.GraphProto) -> None:
    """Refuse a graph whose inputs, outputs or initializers have a type torch cannot hold here."""
    named = [(value.name, value.type) for value in (*graph.input, *graph.output, *graph.value_info)]
    for name, kind in named:
        held = kind.WhichOneof("value")
        if held is None:  # an intermediate declared without a type: nothing to check
            continue
        if held != "tensor_type":
            raise UnsupportedOpError(
                f"'{name}' is a {held.removesuffix('_type')}, not a tensor; the torch evaluator runs tensors only"
            )
        if kind.tensor_type.elem_type and kind.tensor_type.elem_type not in kernels.TORCH_DTYPES:
            _refuse_type(name, kind.tensor_type.elem_type)
    for tensor in graph.initializer:
        if tensor.data_type not in kernels.TORCH_DTYPES:
            _refuse_type(tensor.name, tensor.data_type)


def _refuse_type(name: str, elem_type: int) -> None:
    type_name = onnx.TensorProto.DataType.Name(elem_type)
    raise UnsupportedOpError(
        f"tensor '{name}' has type {type_name}, which the torch evaluator does not support "
        f"(it supports {', '.join(kernels.supported_dtypes())})"
    )


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse, before any work, a model the evaluator cannot run.

    Raises:
        UnsupportedOpError: one line naming the first unsupported op and its node, or the first tensor
            of a type torch cannot hold here (strings, unsigned integers wider than 8 bits, float8…).
    """
    for position, node in enumerate(model.graph.node):
        if _builder(node) is None:
            raise _unsupported(node, position)
        subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        if any(attribute.type in subgraphs for attribute in node.attribute):
            raise _unsupported(node, position, " with a subgraph")
    _check_types(model.graph)


def _constant_value(node: onnx.NodeProto, position: int) -> Tensor:
    """The value of a ``Constant`` node."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return kernels.to_tensor(attribute.t)
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
                self._store(tensor.name, kernels.to_tensor(tensor))
        self._steps: list[tuple[Kernel, list[str], list[str]]] = []
        for position, node in _toposort(graph):
            if node.op_type == "Constant":
                self._store(node.output[0], _constant_value(node, position))
                continue
            attrs = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
            kernel = _builder(node)(node, attrs, opset)  # type: ignore[misc]
            inputs = list(node.input)
            if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
                inputs = self._dequantized_inputs(node, position, graph, initializer_names)
            self._steps.append((kernel, inputs, list(node.output)))
        # The last step that reads each tensor, so intermediates are released as soon as possible.
        self._last_use: dict[str, int] = {}
        for index, (_, inputs, _) in enumerate(self._steps):
            for name in inputs:
                self._last_use[name] = index

    def _dequantized_inputs(
        self, node: onnx.NodeProto, position: int, graph: onnx.GraphProto, initializer_names: set[str]
    ) -> list[str]:
        """The inputs of a MatMulNBits step: ``X``, ``Ŵ`` ``[K, N]`` (read back from ONNX Runtime and stored
        once per packed weight, in the scales' dtype) and the bias (input 5) if any."""

        packed = node.input[1] if len(node.input) > 1 else ""
        if any(name in self.provided for name in node.input[1:4]):
            raise _unsupported(node, position, " with a trained packed weight")
        key = f"{packed}::dequantized"
        if key not in self._buffer_of:
            wanted = [name for name in node.input[1:4] if name in initializer_names]
            tensors = {t.name: t for t in graph.initializer if t.name in wanted}
            try:
                weight = dequantized_weight(node, tensors)  # Ŵ [K, N]
            except QuantizationError as error:
                raise _unsupported(node, position, f" ({error})") from error
            scales = next(t for t in graph.initializer if t.name == node.input[2])
            self._store(key, torch.from_numpy(weight).to(torch_dtype(scales.data_type)))
        bias = node.input[5] if len(node.input) > 5 else ""
        return [node.input[0], key, bias]

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
