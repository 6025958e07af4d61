"""The torch evaluator against ONNX Runtime on the CNN and RNN forms the spec's cases leave out.

The spec's node cases (tests/test_torch_graph_conformance.py) are mostly 2-D and small; exporters also
emit 1-D and 3-D convolutions and pools, grouped and dilated convolutions with asymmetric pads, and
bidirectional recurrent layers. Each case here is a single node with random inputs, compared with ONNX
Runtime; gradients must reach a provided convolution weight; unsupported variants are refused in one line.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxsvd.errors import UnsupportedOpError  # noqa: E402
from onnxsvd.finetune.torch_graph import TorchGraph  # noqa: E402
from tests.models import relative_error, run  # noqa: E402

FLOAT = TensorProto.FLOAT


def single_node(op: str, shapes: dict[str, list[int]], outputs: int = 1, opset: int = 17, **attributes):
    """A model of one node whose inputs are graph inputs of the given shapes (output shapes inferred)."""
    node = helper.make_node(op, list(shapes), [f"y{i}" for i in range(outputs)], name=f"{op.lower()}_node",
                            **attributes)
    inputs = [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in shapes.items()]
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info(f"y{i}", FLOAT, None)
                                                   for i in range(outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_matches_ort(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    expected = run(model, feeds)
    graph = TorchGraph(model)
    with torch.no_grad():
        values = graph({name: torch.from_numpy(array) for name, array in feeds.items()})
    for name, want in zip(graph.output_names, expected, strict=True):
        got = values[name].numpy()
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert relative_error(got, want) < 1e-5, name


CASES = {
    "conv1d_groups_dilated_asymmetric": ("Conv", {"x": [2, 4, 11], "w": [6, 2, 3]},
                                         dict(group=2, dilations=[2], pads=[2, 1], strides=[2])),
    "conv3d_same_lower": ("Conv", {"x": [1, 2, 5, 6, 4], "w": [3, 2, 2, 3, 2], "b": [3]},
                          dict(auto_pad="SAME_LOWER", strides=[2, 1, 2])),
    "conv2d_depthwise_same_upper": ("Conv", {"x": [2, 3, 7, 8], "w": [3, 1, 3, 3]},
                                    dict(group=3, auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_transpose1d_output_shape": ("ConvTranspose", {"x": [2, 4, 5], "w": [4, 3, 3], "b": [3]},
                                      dict(strides=[2], output_shape=[12])),
    "conv_transpose2d_groups_padding": ("ConvTranspose", {"x": [1, 4, 3, 4], "w": [4, 1, 3, 2]},
                                        dict(group=2, strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2],
                                             dilations=[1, 2])),
    "conv_transpose3d": ("ConvTranspose", {"x": [1, 2, 3, 3, 2], "w": [2, 2, 2, 2, 2]}, dict(strides=[2, 1, 2])),
    "max_pool1d_ceil": ("MaxPool", {"x": [2, 3, 10]}, dict(kernel_shape=[3], strides=[2], ceil_mode=1)),
    "max_pool3d_pads": ("MaxPool", {"x": [1, 2, 5, 6, 7]}, dict(kernel_shape=[2, 3, 2], pads=[1, 1, 0, 0, 1, 1])),
    "average_pool1d_include_pad": ("AveragePool", {"x": [2, 3, 9]},
                                   dict(kernel_shape=[4], strides=[3], pads=[2, 1], count_include_pad=1)),
    "average_pool3d_ceil": ("AveragePool", {"x": [1, 2, 5, 5, 6]}, dict(kernel_shape=[2, 2, 3], strides=[2, 2, 2],
                                                                       ceil_mode=1)),
    "global_average_pool1d": ("GlobalAveragePool", {"x": [2, 3, 7]}, {}),
    "global_max_pool3d": ("GlobalMaxPool", {"x": [2, 3, 3, 4, 2]}, {}),
    "instance_norm3d": ("InstanceNormalization", {"x": [2, 3, 4, 3, 2], "s": [3], "b": [3]}, dict(epsilon=1e-3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cnn_forms_match_ort(case: str, rng: np.random.Generator) -> None:
    op, shapes, attributes = CASES[case]
    assert_matches_ort(single_node(op, shapes, **attributes), rng)


def test_batch_norm_1d_and_3d_match_ort(rng: np.random.Generator) -> None:
    for shape in ([4, 3, 5], [2, 3, 2, 3, 4]):
        nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)]
        stats = [numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), name) for name in "sbm"]
        stats.append(numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "v"))
        graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", FLOAT, shape)], initializer=stats)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
        assert_matches_ort(model, rng)


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_bidirectional_recurrent_layers_match_ort(op: str, gates: int, rng: np.random.Generator) -> None:
    hidden, size = 5, 3
    shapes = {"x": [6, 2, size], "w": [2, gates * hidden, size], "r": [2, gates * hidden, hidden],
              "b": [2, 2 * gates * hidden]}
    outputs = 3 if op == "LSTM" else 2
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    model = single_node(op, shapes, outputs=outputs, hidden_size=hidden, direction="bidirectional", **extra)
    assert_matches_ort(model, rng)


def test_gradients_reach_a_provided_convolution_weight(rng: np.random.Generator) -> None:
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 4, 3, 3])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph_module = TorchGraph(model, provided=["w"])
    trainable = torch.from_numpy(numpy_helper.to_array(weight).copy()).requires_grad_()
    out = graph_module({"x": torch.from_numpy(rng.standard_normal((1, 3, 6, 6)).astype(np.float32))},
                       overrides={"w": trainable})
    out["y"].sum().backward()
    assert trainable.grad is not None and float(trainable.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "op,shapes,attributes,variant",
    [
        ("LpNormalization", {"x": [2, 3]}, dict(p=3), "with p=3 (1 or 2)"),
        ("Resize", {"x": [1, 1, 2, 2], "roi": [0], "scales": [4]}, dict(mode="area"), "with mode=area"),
        ("Pad", {"x": [2, 3], "pads": [4]}, dict(mode="mirror"), "with mode=mirror"),
    ],
    ids=["lp-norm-p3", "resize-area", "pad-mirror"],
)
def test_unsupported_variant_is_one_line_naming_op_node_and_variant(op, shapes, attributes, variant) -> None:
    node = helper.make_node(op, list(shapes), ["y"], name="the_node", **attributes)
    inputs = [helper.make_tensor_value_info(name, FLOAT if name == "x" else TensorProto.INT64, shape)
              for name, shape in shapes.items()]
    if op == "Resize":
        inputs[1] = helper.make_tensor_value_info("roi", FLOAT, [0])
        inputs[2] = helper.make_tensor_value_info("scales", FLOAT, [4])
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("y", FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedOpError) as caught:
        TorchGraph(model)
    message = str(caught.value)
    assert "\n" not in message
    assert f"op '{op}' (node 'the_node') {variant} is not supported by the torch evaluator" in message


def test_a_tensor_type_torch_cannot_hold_is_refused_up_front() -> None:
    node = helper.make_node("Add", ["x", "x"], ["y"], name="add")
    graph = helper.make_graph([node], "uint16", [helper.make_tensor_value_info("x", TensorProto.UINT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match=r"^tensor 'x' has type UINT16, which the torch evaluator does not "
                                                 r"support \(it supports FLOAT, DOUBLE"):
        TorchGraph(model)


def test_finetune_trains_a_rewritten_cnn(rng: np.random.Generator) -> None:
    """Conv → BatchNorm → Relu → MaxPool → GlobalAveragePool → Flatten → Gemm: the evaluator in training, the
    Conv a site too."""
    import onnxsvd
    from onnxsvd.finetune import FinetuneConfig, finetune

    def constant(name: str, shape: tuple[int, ...], low: float | None = None) -> onnx.TensorProto:
        values = rng.uniform(low, 2.0, shape) if low is not None else rng.standard_normal(shape) / 3
        return numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "fc2_w", "fc2_b"], ["y"], transB=1),
    ]
    initializers = [
        constant("conv_w", (16, 3, 3, 3)), constant("conv_b", (16,)), constant("bn_s", (16,)),
        constant("bn_b", (16,)), constant("bn_m", (16,)), constant("bn_v", (16,), low=0.5),
        constant("fc1_w", (32, 16)), constant("fc1_b", (32,)), constant("fc2_w", (10, 32)), constant("fc2_b", (10,)),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, ["batch", 10])], initializer=initializers)
    teacher = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(teacher, full_check=True)
    rewritten = onnxsvd.rewrite(teacher, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 4, align=1)))
    data = {"x": rng.standard_normal((48, 3, 8, 8)).astype(np.float32)}
    config = FinetuneConfig(steps=15, lr=1e-2, eval_every=5, batch_size=16, threads=1)
    result = finetune(rewritten.model, teacher, data, config)
    assert result.report.pairs == 3  # the Conv chain and the two Gemm chains
    assert result.report.heldout_after < result.report.heldout_before


def old_opset_model(node: onnx.NodeProto, inputs: dict[str, list[int]], initializers: list[onnx.TensorProto],
                    outputs: int, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "old", [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.INT64 if name == "indices" else FLOAT, None)
         for name in node.output[:outputs]], initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


def test_opset_dependent_forms_match_ort(rng: np.random.Generator) -> None:
    """Attribute forms before their inputs: Pad-2, TopK-1, Upsample-7 and -9, Resize-10, BatchNorm-7."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales")
    stats = [numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), name) for name in "sbmv"]
    models = [
        old_opset_model(helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 2, 0], mode="constant", value=1.5),
                        {"x": [2, 3]}, [], 1, 7),
        old_opset_model(helper.make_node("Pad", ["x"], ["y"], pads=[1, 2, 1, 0], mode="reflect"),
                        {"x": [3, 4]}, [], 1, 7),
        old_opset_model(helper.make_node("TopK", ["x"], ["y", "indices"], k=2, axis=1), {"x": [3, 5]}, [], 2, 7),
        old_opset_model(helper.make_node("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 3.0], mode="nearest"),
                        {"x": [1, 2, 3, 2]}, [], 1, 7),
        old_opset_model(helper.make_node("Upsample", ["x", "scales"], ["y"], mode="linear"),
                        {"x": [1, 2, 3, 2]}, [scales], 1, 9),
        old_opset_model(helper.make_node("Resize", ["x", "scales"], ["y"], mode="nearest"),
                        {"x": [1, 2, 3, 2]}, [scales], 1, 10),
        old_opset_model(helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3),
                        {"x": [2, 3, 4]}, stats, 1, 7),
    ]
    for model in models:
        onnx.checker.check_model(model)
        assert_matches_ort(model, rng)
