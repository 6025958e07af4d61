"""Fine-tuning: the torch evaluator against ONNX Runtime, factor pairs, forms, fold-back, the loop, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxsvd  # noqa: E402
from onnxsvd.cli import main  # noqa: E402
from onnxsvd.errors import ProviderError, UnsupportedOpError, UsageError  # noqa: E402
from onnxsvd.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxsvd.finetune.forms import balanced_split, product_svd  # noqa: E402
from onnxsvd.finetune.sites import find_factor_pairs  # noqa: E402
from onnxsvd.finetune.student import Student, fold_back  # noqa: E402
from onnxsvd.finetune.torch_graph import TorchGraph  # noqa: E402
from onnxsvd.finetune.train import _layout, _relation_error, _Samples  # noqa: E402
from tests.conftest import MODELS, REPO  # noqa: E402
from tests.models import gemm_case, make_model, relative_error, run  # noqa: E402

MLP = MODELS / "digits_mlp.onnx"
VIT = MODELS / "digits_vit.onnx"
MINILM = REPO / "build" / "minilm"
FLOAT = TensorProto.FLOAT


def torch_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    graph = TorchGraph(model)
    with torch.no_grad():
        values = graph({name: torch.from_numpy(np.asarray(value)) for name, value in feeds.items()})
    return [values[name].numpy() for name in graph.output_names]


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tolerance: float = 1e-4) -> None:
    expected = run(model, feeds)
    actual = torch_run(model, feeds)
    for output, want, got in zip(model.graph.output, expected, actual, strict=True):
        assert got.shape == want.shape, (output.name, got.shape, want.shape)
        assert got.dtype == want.dtype, (output.name, got.dtype, want.dtype)
        if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=output.name)
        else:
            assert relative_error(got, want) < tolerance, output.name


def value(name: str, dtype: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def op_zoo_model(nodes, inputs, outputs, initializers, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """Like tests.models.make_model, for outputs of undeclared shape (the full check wants shapes)."""
    graph = helper.make_graph(nodes, "op_zoo", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    inferred_graph = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v for v in list(inferred_graph.value_info) + list(inferred_graph.output)}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(inferred[output.name].type)
    onnx.checker.check_model(model)
    return model


def ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def floats(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


# --------------------------------------------------------------------------------------------------------
# The evaluator reproduces ONNX Runtime


@pytest.mark.parametrize("path", [MLP, VIT], ids=["mlp", "vit"])
def test_evaluator_matches_ort_on_shipped_models(path: Path) -> None:
    model = onnx.load(str(path))
    inputs = dict(np.load(MODELS / "digits_eval.npz"))
    assert_matches_ort(model, {"input": inputs["input"][:32]})


def test_evaluator_matches_ort_on_minilm() -> None:
    if not (MINILM / "model.onnx").exists():
        pytest.skip("MiniLM is not exported; python tools/export_minilm.py")
    model = onnx.load(str(MINILM / "model.onnx"))
    data = np.load(MINILM / "eval.npz")
    feeds = {name: data[name][:4, :24] for name in ("input_ids", "attention_mask", "token_type_ids")}
    expected = run(model, feeds)
    actual = torch_run(model, feeds)
    mask = feeds["attention_mask"].astype(bool)
    assert relative_error(actual[0][mask], expected[0][mask]) < 1e-4  # padded positions are arbitrary
    assert relative_error(actual[1], expected[1]) < 1e-4


def elementwise_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Arithmetic, activations, normalisation, reductions, comparisons and logic at opset 17."""
    n = helper.make_node
    nodes = [
        n("Add", ["X", "Y"], ["add"]), n("Sub", ["add", "X"], ["sub"]), n("Mul", ["sub", "X"], ["mul"]),
        n("Div", ["mul", "two"], ["div"]), n("Abs", ["div"], ["abs"]), n("Add", ["abs", "one"], ["pos"]),
        n("Pow", ["pos", "three_halves"], ["pow"]), n("Sqrt", ["pos"], ["sqrt"]), n("Reciprocal", ["pos"], ["recip"]),
        n("Neg", ["recip"], ["neg"]), n("Log", ["pos"], ["log"]), n("Exp", ["neg"], ["exp"]), n("Erf", ["X"], ["erf"]),
        n("Tanh", ["X"], ["tanh"]), n("Sigmoid", ["X"], ["sigmoid"]), n("Relu", ["X"], ["relu"]),
        n("Min", ["pow", "sqrt", "log"], ["min"]), n("Max", ["erf", "tanh"], ["max"]),
        n("Clip", ["X", "low", "high"], ["clip"]), n("Clip", ["X", "", "high"], ["clip_high"]),
        n("Softmax", ["X"], ["softmax"], axis=1),
        n("LayerNormalization", ["X", "scale", "bias"], ["norm"], axis=-1, epsilon=1e-3),
        n("ReduceMean", ["X"], ["mean"], axes=[1], keepdims=0),
        n("ReduceSum", ["X", "axes_02"], ["sum"], keepdims=1),
        n("ReduceSum", ["X"], ["sum_all"], keepdims=0),
        n("Greater", ["X", "zero"], ["greater"]), n("Neg", ["X"], ["neg_x"]),
        n("Where", ["greater", "X", "neg_x"], ["where"]), n("Less", ["X", "Y"], ["less"]),
        n("GreaterOrEqual", ["X", "Y"], ["ge"]),
        n("Equal", ["ids", "ids_ref"], ["equal"]), n("Not", ["equal"], ["not"]), n("And", ["less", "ge"], ["and"]),
        n("Cast", ["and"], ["and_f"], to=FLOAT), n("Div", ["ids", "ids_div"], ["int_div"]),
        n("Add", ["min", "max"], ["s1"]), n("Add", ["s1", "exp"], ["s2"]), n("Add", ["s2", "clip"], ["s3"]),
        n("Add", ["s3", "softmax"], ["s4"]), n("Add", ["s4", "norm"], ["s5"]), n("Add", ["s5", "where"], ["s6"]),
        n("Add", ["s6", "and_f"], ["s7"]), n("Add", ["s7", "sigmoid"], ["s8"]), n("Add", ["s8", "relu"], ["s9"]),
        n("Add", ["s9", "clip_high"], ["out"]),
    ]
    inits = [
        floats("two", np.array(2.0)), floats("one", np.array(1.0)), floats("three_halves", np.array(1.5)),
        floats("zero", np.array(0.0)), floats("low", np.array(-0.5)), floats("high", np.array(0.7)),
        floats("scale", rng.standard_normal(4)), floats("bias", rng.standard_normal(4)), ints("axes_02", [0, 2]),
        ints("ids_ref", [1, 2, 3]), ints("ids_div", [2, -2, 3]),
    ]
    inputs = [value("X", FLOAT, [2, 3, 4]), value("Y", FLOAT, [4]), value("ids", TensorProto.INT64, [3])]
    outputs = [
        value("out", FLOAT, [2, 3, 4]), value("mean", FLOAT, None), value("sum", FLOAT, None),
        value("sum_all", FLOAT, None), value("not", TensorProto.BOOL, None), value("int_div", TensorProto.INT64, None),
    ]
    model = op_zoo_model(nodes, inputs, outputs, inits)
    feeds = {
        "X": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "Y": rng.standard_normal(4).astype(np.float32),
        "ids": np.array([1, -7, 3], dtype=np.int64),
    }
    return model, feeds


def shape_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Shape arithmetic and indexing at opset 17: Shape, Gather, Unsqueeze, Concat, Reshape, Slice…"""
    n = helper.make_node
    nodes = [
        n("Shape", ["X"], ["shape"]), n("Shape", ["X"], ["shape_tail"], start=1),
        n("Shape", ["X"], ["shape_head"], end=-1),
        n("Gather", ["shape", "last"], ["dim_last"], axis=0), n("Unsqueeze", ["dim_last", "axes_0"], ["dim_1d"]),
        n("Concat", ["minus_one", "dim_1d"], ["flat_shape"], axis=0), n("Reshape", ["X", "flat_shape"], ["flat"]),
        n("Reshape", ["X", "zero_minus_one"], ["keep_first"]),
        n("Reshape", ["X", "shape_2_12"], ["allow_zero"], allowzero=1),
        n("Transpose", ["X"], ["transposed"], perm=[2, 0, 1]), n("Transpose", ["X"], ["reversed"]),
        n("Flatten", ["X"], ["flatten"], axis=2), n("Flatten", ["X"], ["flatten_neg"], axis=-1),
        n("Slice", ["X", "starts", "ends", "slice_axes", "steps"], ["sliced"]),
        n("Slice", ["X", "starts_1", "ends_1"], ["sliced_default"]),
        n("Unsqueeze", ["X", "axes_0_3"], ["unsqueezed"]), n("Squeeze", ["unsqueezed", "axes_0_3"], ["squeezed"]),
        n("Squeeze", ["unsqueezed"], ["squeezed_all"]),
        n("Expand", ["row", "shape_3_1"], ["expanded"]), n("ConstantOfShape", ["shape_head"], ["filled"],
                                                          value=numpy_helper.from_array(np.array([2.5], np.float32))),
        n("ConstantOfShape", ["shape_head"], ["zeros"]),
        n("Range", ["r_start", "dim_last", "r_step"], ["range"]), n("Cast", ["range"], ["range_f"], to=FLOAT),
        n("Identity", ["range_f"], ["range_id"]),
        n("Constant", [], ["const"], value_floats=[1.0, 2.0, 3.0, 4.0]), n("Add", ["range_id", "const"], ["range_c"]),
        n("Gather", ["X", "picks"], ["gathered"], axis=1), n("Gather", ["X", "last"], ["gathered_scalar"], axis=-1),
        n("Split", ["X", "split_sizes"], ["part_a", "part_b"], axis=2),
        n("Tile", ["row", "tiles"], ["tiled"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(-1, dtype=np.int64), "last"),
        ints("axes_0", [0]), ints("minus_one", [-1]), ints("zero_minus_one", [0, -1]), ints("shape_2_12", [2, 12]),
        ints("starts", [-1, 0]), ints("ends", [-1000, 4]), ints("slice_axes", [1, 2]), ints("steps", [-2, 3]),
        ints("starts_1", [1]), ints("ends_1", [100]), ints("axes_0_3", [0, 3]), ints("shape_3_1", [3, 1]),
        floats("row", rng.standard_normal((1, 4))), ints("picks", [[0, -1], [1, 1]]),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "r_start"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "r_step"), ints("split_sizes", [1, 3]),
        ints("tiles", [2, 1]),
    ]
    names = ["shape", "shape_tail", "flat", "keep_first", "allow_zero", "transposed", "reversed", "flatten",
             "flatten_neg", "sliced", "sliced_default", "squeezed", "squeezed_all", "expanded", "filled", "zeros",
             "range_c", "gathered", "gathered_scalar", "part_a", "part_b", "tiled"]
    outputs = [value(name, TensorProto.INT64 if name.startswith("shape") else FLOAT, None) for name in names]
    model = op_zoo_model(nodes, [value("X", FLOAT, [2, 3, 4])], outputs, inits)
    return model, {"X": rng.standard_normal((2, 3, 4)).astype(np.float32)}


def old_opset_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Opset 11 forms: attribute axes for Unsqueeze/Squeeze/ReduceSum, Softmax coerced to 2-D."""
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["X"], ["u"], axes=[0, -1]), n("Squeeze", ["u"], ["s"], axes=[0]),
        n("ReduceSum", ["X"], ["sum"], axes=[-1], keepdims=1), n("ReduceMean", ["X"], ["mean"], axes=[0, 1]),
        n("Softmax", ["X"], ["softmax"], axis=1), n("Softmax", ["X"], ["softmax_default"]),
        n("Clip", ["X", "low", "high"], ["clip"]), n("Slice", ["X", "starts", "ends", "axes"], ["slice"]),
    ]
    inits = [floats("low", np.array(-0.3)), floats("high", np.array(0.4)), ints("starts", [1]), ints("ends", [-1]),
             ints("axes", [2])]
    outputs = [value(name, FLOAT, None) for name in ("s", "sum", "mean", "softmax", "softmax_default", "clip", "slice")]
    model = op_zoo_model(nodes, [value("X", FLOAT, [2, 3, 4])], outputs, inits, opset=11)
    return model, {"X": rng.standard_normal((2, 3, 4)).astype(np.float32)}


def new_opset_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Opset 20 forms: ReduceMean/ReduceMax with ``axes`` as an input, Gelu, Split into equal parts."""
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["X", "axes"], ["mean"], keepdims=0), n("ReduceMax", ["X", "axes"], ["max"]),
        n("ReduceMean", ["X"], ["mean_all"]), n("Gelu", ["X"], ["gelu"]),
        n("Gelu", ["X"], ["gelu_tanh"], approximate="tanh"), n("Split", ["X"], ["a", "b"], axis=2, num_outputs=2),
    ]
    outputs = [value(name, FLOAT, None) for name in ("mean", "max", "mean_all", "gelu", "gelu_tanh", "a", "b")]
    model = op_zoo_model(nodes, [value("X", FLOAT, [2, 3, 4])], outputs, [ints("axes", [-1, 0])], opset=20,
                         ir_version=10)
    return model, {"X": rng.standard_normal((2, 3, 4)).astype(np.float32)}


@pytest.mark.parametrize("build", [elementwise_model, shape_model, old_opset_model, new_opset_model],
                         ids=["elementwise", "shapes", "opset11", "opset20"])
def test_evaluator_matches_ort_on_tiny_models(build, rng: np.random.Generator) -> None:
    model, feeds = build(rng)
    assert_matches_ort(model, feeds)


@pytest.mark.parametrize(
    "trans_a,trans_b,alpha,beta,bias,weight_as",
    [(0, 1, 1.0, 1.0, "n", "B"), (1, 0, 0.5, 2.0, "mn", "B"), (1, 1, 1.5, 0.5, "scalar", "A"),
     (0, 0, 1.0, 1.0, "none", "A"), (0, 1, 2.0, 1.0, "1n", "B")],
)
def test_evaluator_gemm_attributes(trans_a, trans_b, alpha, beta, bias, weight_as, rng: np.random.Generator) -> None:
    case = gemm_case(rng, 5, 6, 7, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias,
                     weight_as=weight_as)
    assert_matches_ort(case.model, case.feeds)


def test_evaluator_gradients_reach_provided_initializers(rng: np.random.Generator) -> None:
    case = gemm_case(rng, 4, 6, 3, trans_b=1, bias="n")
    graph = TorchGraph(case.model, provided=["W"])
    weight = torch.from_numpy(numpy_helper.to_array(case.model.graph.initializer[0]).copy()).requires_grad_()
    out = graph({"X": torch.from_numpy(case.feeds["X"])}, overrides={"W": weight})
    out["Y"].sum().backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0


# --------------------------------------------------------------------------------------------------------
# Unsupported ops: one line naming the op and the node


def unsupported_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["H"], name="dense"),
        helper.make_node("Hardmax", ["H"], ["Y"], name="hardmax_3"),
    ]
    weight = floats("W", rng.standard_normal((16, 12)))
    return make_model(nodes, [value("X", FLOAT, ["batch", 16])], [value("Y", FLOAT, ["batch", 12])], [weight])


def test_unsupported_op_is_one_line_naming_op_and_node() -> None:
    with pytest.raises(UnsupportedOpError) as caught:
        TorchGraph(unsupported_model())
    message = str(caught.value)
    assert "\n" not in message
    assert "op 'Hardmax' (node 'hardmax_3') is not supported by the torch evaluator" in message
    assert "finetune supports:" in message and "MatMul" in message


def test_unsupported_domain_is_refused() -> None:
    model = unsupported_model()
    model.graph.node[1].op_type = "FusedThing"
    model.graph.node[1].domain = "com.example"
    with pytest.raises(UnsupportedOpError, match=r"op 'com.example.FusedThing' \(node 'hardmax_3'\)"):
        TorchGraph(model)


def test_cli_unsupported_op_exit_code_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = unsupported_model()
    rewritten = onnxsvd.rewrite(teacher, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 4))).model
    onnx.save(teacher, str(tmp_path / "teacher.onnx"))
    onnx.save(rewritten, str(tmp_path / "small.onnx"))
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))
    code = main(["finetune", str(tmp_path / "small.onnx"), "--teacher", str(tmp_path / "teacher.onnx"),
                 "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "out.onnx")])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxsvd: error: op 'Hardmax' (node 'hardmax_3')"), captured.err
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------------------------------------
# Factor pairs, forms and folding back


def mixed_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A Gemm with transB and a bias (PyTorch's Linear), a weight-on-the-left MatMul, and a plain MatMul."""
    n = helper.make_node
    nodes = [
        n("Gemm", ["X", "W1", "b1"], ["h1"], name="linear", transB=1, beta=0.5),
        n("Relu", ["h1"], ["a1"], name="relu"),
        n("Transpose", ["a1"], ["a1_t"], name="to_columns", perm=[1, 0]),
        n("MatMul", ["W2", "a1_t"], ["h2_t"], name="left"),
        n("Transpose", ["h2_t"], ["h2"], name="to_rows", perm=[1, 0]),
        n("Tanh", ["h2"], ["a2"], name="tanh"),
        n("MatMul", ["a2", "W3"], ["Y"], name="right"),
    ]
    inits = [
        floats("W1", rng.standard_normal((24, 20)) / 4), floats("b1", rng.standard_normal(24)),
        floats("W2", rng.standard_normal((18, 24)) / 4), floats("W3", rng.standard_normal((18, 10)) / 4),
    ]
    model = make_model(nodes, [value("X", FLOAT, ["batch", 20])], [value("Y", FLOAT, ["batch", 10])], inits)
    return model, {"X": rng.standard_normal((64, 20)).astype(np.float32)}


def rewritten_mixed(rng: np.random.Generator, dtype: str = "auto") -> tuple[onnx.ModelProto, onnx.ModelProto,
                                                                            dict[str, np.ndarray]]:
    teacher, feeds = mixed_model(rng)
    config = onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 4, align=1), dtype=dtype)
    return teacher, onnxsvd.rewrite(teacher, config).model, feeds


def structure(model: onnx.ModelProto) -> tuple:
    return (
        [(node.op_type, node.name, tuple(node.input), tuple(node.output)) for node in model.graph.node],
        [(t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer],
    )


def test_factor_pairs_of_every_site_kind(rng: np.random.Generator) -> None:
    _, rewritten, _ = rewritten_mixed(rng)
    pairs, skips = find_factor_pairs(rewritten)
    assert skips == []
    by_site = {pair.sites[0]: pair for pair in pairs}
    assert set(by_site) == {"linear", "left", "right"}
    assert (by_site["linear"].k, by_site["linear"].n, by_site["linear"].rank) == (20, 24, 4)
    assert by_site["left"].a_transposed and by_site["left"].b_transposed
    assert not by_site["right"].a_transposed and not by_site["right"].b_transposed
    assert [node.op_type for node in rewritten.graph.node if node.name.startswith("linear/")] == ["Gemm", "Gemm"]


def test_product_svd_and_balanced_split(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal((30, 6)) * 0.01, rng.standard_normal((6, 12)) * 50  # badly balanced
    u, s, v = product_svd(a, b)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, a @ b, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-10)
    first, second = balanced_split(a, b)
    np.testing.assert_allclose(first @ second, a @ b, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(first, axis=0), np.linalg.norm(second, axis=1), rtol=1e-8)
    wide_u, wide_s, _ = product_svd(rng.standard_normal((3, 5)), rng.standard_normal((5, 4)))  # r > K
    assert wide_u.shape == (3, 5) and wide_s[3:].tolist() == [0.0, 0.0]


def perturb(student: Student, generator: torch.Generator) -> None:
    """Stand in for training: move every trainable tensor by a random step."""
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator) * (parameter.abs().mean() + 0.1))


@pytest.mark.parametrize("form", ["core", "factors"])
@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_fold_back_reproduces_trained_student_through_ort(form: str, dtype: str, rng: np.random.Generator) -> None:
    _, rewritten, feeds = rewritten_mixed(rng, dtype)
    pairs, _ = find_factor_pairs(rewritten)
    generator = torch.Generator().manual_seed(0)
    student = Student(rewritten, pairs, form, lora_rank=2, generator=generator)
    with torch.no_grad():
        before = student({"X": torch.from_numpy(feeds["X"])})["Y"].numpy()
    assert relative_error(before, run(rewritten, feeds)[0]) < (1e-5 if dtype == "auto" else 2e-3)
    perturb(student, generator)
    with torch.no_grad():
        trained = student({"X": torch.from_numpy(feeds["X"])})["Y"].numpy()
    assert relative_error(trained, before) > 0.05  # the perturbation changed the model
    folded = fold_back(rewritten, student)
    onnx.checker.check_model(folded, full_check=True)
    assert structure(folded) == structure(rewritten)
    assert relative_error(run(folded, feeds)[0], trained) < (1e-5 if dtype == "auto" else 5e-3)


@pytest.mark.parametrize(
    "trans_a,trans_b,alpha,beta,bias,weight_as",
    [(1, 1, 0.5, 2.0, "mn", "B"), (1, 0, 1.0, 1.0, "n", "A"), (0, 1, 2.0, 0.5, "scalar", "A")],
)
@pytest.mark.parametrize("form", ["core", "factors"])
def test_fold_back_on_gemm_variants(trans_a, trans_b, alpha, beta, bias, weight_as, form, rng) -> None:
    """transA on the activation, α folded into the factors, C and β on the second node, the mirror Gemm."""
    case = gemm_case(rng, 12, 16, 14, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias,
                     weight_as=weight_as)
    rewritten = onnxsvd.rewrite(case.model, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 3, align=1))).model
    pairs, skips = find_factor_pairs(rewritten)
    assert len(pairs) == 1 and skips == []
    assert (pairs[0].a_transposed, pairs[0].b_transposed) == ((False, False) if weight_as == "B" else (True, True))
    generator = torch.Generator().manual_seed(1)
    student = Student(rewritten, pairs, form, lora_rank=2, generator=generator)
    feeds = {"X": torch.from_numpy(case.feeds["X"])}
    with torch.no_grad():
        assert relative_error(student(feeds)["Y"].numpy(), run(rewritten, case.feeds)[0]) < 1e-5
    perturb(student, generator)
    with torch.no_grad():
        trained = student(feeds)["Y"].numpy()
    folded = fold_back(rewritten, student)
    assert structure(folded) == structure(rewritten)
    assert relative_error(run(folded, case.feeds)[0], trained) < 1e-5


def test_core_form_trains_only_the_core(rng: np.random.Generator) -> None:
    _, rewritten, _ = rewritten_mixed(rng)
    pairs, _ = find_factor_pairs(rewritten)
    core = Student(rewritten, pairs, "core", lora_rank=2, generator=torch.Generator().manual_seed(0))
    whole = Student(rewritten, pairs, "factors", lora_rank=2, generator=torch.Generator().manual_seed(0))
    # Per pair: σ [r] + X [r, R] + Y [R, r] against A [K, r] + B [r, N].
    assert core.trainable_parameters() == 3 * (4 + 4 * 2 + 2 * 4)
    assert whole.trainable_parameters() == 4 * (20 + 24) + 4 * (24 + 18) + 4 * (18 + 10)
    assert all(not buffer.requires_grad for buffer in core.buffers())


# --------------------------------------------------------------------------------------------------------
# The training loop


@pytest.fixture(scope="module")
def mlp_pair() -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    teacher = onnx.load(str(MLP))
    rewritten = onnxsvd.rewrite(teacher, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 8))).model
    return teacher, rewritten, {"input": np.load(MODELS / "digits_calib.npz")["input"]}


@pytest.mark.parametrize("form", ["core", "factors"])
def test_finetune_lowers_heldout_loss_and_keeps_the_graph(form: str, mlp_pair) -> None:
    teacher, rewritten, data = mlp_pair
    result = finetune(rewritten, teacher, data, FinetuneConfig(train=form, steps=120, lr=1e-2, eval_every=20))
    report = result.report
    assert report.heldout_after < 0.7 * report.heldout_before
    assert report.best_step > 0 and report.history[0].step == 0
    assert report.history[0].heldout_loss == pytest.approx(report.heldout_before, rel=1e-4)
    assert structure(result.model) == structure(rewritten)
    onnx.checker.check_model(result.model, full_check=True)
    assert report.pairs == 3 and report.train_samples + report.heldout_samples == 256
    json.dumps(report.to_dict(), allow_nan=False)


def test_site_activations_are_matched_by_default(mlp_pair) -> None:
    teacher, rewritten, data = mlp_pair
    config = FinetuneConfig(steps=60, lr=1e-2, eval_every=20)
    matched = finetune(rewritten, teacher, data, config).report
    plain = finetune(rewritten, teacher, data, dataclasses.replace(config, match_activations=False)).report
    site_outputs = [output for pair in find_factor_pairs(rewritten)[0] for output in pair.outputs]
    teacher_tensors = {name for node in teacher.graph.node for name in node.output}
    assert matched.matched_activations == site_outputs and set(site_outputs) <= teacher_tensors
    assert plain.matched_activations == []
    # The held-out loss is the outputs' alone, so both runs start from the same value; the activations'
    # term changes what training does, and it still lowers that loss.
    assert matched.heldout_before == pytest.approx(plain.heldout_before, rel=1e-9)
    assert matched.heldout_after < 0.8 * matched.heldout_before
    assert matched.heldout_after != pytest.approx(plain.heldout_after, rel=1e-6)


def test_finetune_never_returns_a_worse_model(mlp_pair) -> None:
    teacher, rewritten, data = mlp_pair
    result = finetune(rewritten, teacher, data, FinetuneConfig(steps=20, lr=50.0, eval_every=5, patience=2))
    report = result.report
    assert report.best_step == 0 and report.heldout_after == report.heldout_before
    assert report.stopped_early and report.notes
    for ours, theirs in zip(result.model.graph.initializer, rewritten.graph.initializer, strict=True):
        assert ours.SerializeToString() == theirs.SerializeToString()


def test_finetune_is_deterministic(mlp_pair) -> None:
    teacher, rewritten, data = mlp_pair
    config = FinetuneConfig(train="core", steps=10, lr=1e-2, eval_every=5, seed=3)
    first = finetune(rewritten, teacher, data, config).model
    second = finetune(rewritten, teacher, data, config).model
    assert [t.SerializeToString() for t in first.graph.initializer] == [
        t.SerializeToString() for t in second.graph.initializer
    ]


def test_relation_error_compares_cosine_similarities(rng: np.random.Generator) -> None:
    teacher = rng.standard_normal((6, 5))
    student = teacher + 0.3 * rng.standard_normal((6, 5))
    total, count = _relation_error(torch.from_numpy(student), torch.from_numpy(teacher))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = (unit(student) @ unit(student).T - unit(teacher) @ unit(teacher).T) ** 2
    assert count == 30 and float(total) == pytest.approx(expected.sum(), rel=1e-5)
    scaled = teacher * rng.uniform(0.5, 3.0, size=(6, 1))  # each sample's length changed, not its direction
    assert float(_relation_error(torch.from_numpy(scaled), torch.from_numpy(teacher))[0]) < 1e-10


def test_relation_weight_adds_a_similarity_term_and_training_lowers_it(mlp_pair) -> None:
    teacher, rewritten, data = mlp_pair
    plain = finetune(rewritten, teacher, data, FinetuneConfig(steps=1)).report
    config = FinetuneConfig(train="factors", steps=120, lr=1e-2, eval_every=20, relation_weight=1.0)
    related = finetune(rewritten, teacher, data, config).report
    assert related.heldout_before > plain.heldout_before  # the held-out loss includes the relational term
    assert related.heldout_after < 0.7 * related.heldout_before and not related.notes
    with pytest.raises(UsageError, match="--relation-weight"):
        FinetuneConfig(relation_weight=-1.0)


def test_finetune_refuses_a_model_without_factors(mlp_pair) -> None:
    teacher, _, data = mlp_pair
    with pytest.raises(UsageError, match="no factor chains recorded by .onnxsvd rewrite."):
        finetune(teacher, teacher, data, FinetuneConfig(steps=1))


def test_padding_is_trimmed_and_masked(rng: np.random.Generator) -> None:
    """A token model: padded positions are cut from batches and left out of the loss."""
    n = helper.make_node
    nodes = [
        n("Gather", ["table", "input_ids"], ["tokens"], name="embed"),
        n("MatMul", ["tokens", "W"], ["hidden"], name="proj"),
        n("Cast", ["attention_mask"], ["mask_f"], name="cast", to=FLOAT),
        n("Unsqueeze", ["mask_f", "axes"], ["mask_3d"], name="unsqueeze"),
        n("Mul", ["hidden", "mask_3d"], ["masked"], name="mul"),
        n("ReduceSum", ["masked", "axes_1"], ["pooled"], name="pool", keepdims=0),
    ]
    inits = [floats("table", rng.standard_normal((30, 16))), floats("W", rng.standard_normal((16, 16))),
             ints("axes", [-1]), ints("axes_1", [1])]
    inputs = [value("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              value("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [value("hidden", FLOAT, ["batch", "sequence", 16]), value("pooled", FLOAT, ["batch", 16])]
    teacher = make_model(nodes, inputs, outputs, inits)
    rewritten = onnxsvd.rewrite(teacher, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 4, align=1))).model
    lengths = rng.integers(2, 7, size=80)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)  # at most 6 of 12 columns used
    ids = rng.integers(0, 30, size=(80, 12)) * mask
    data = {"input_ids": ids, "attention_mask": mask}
    result = finetune(rewritten, teacher, data, FinetuneConfig(train="factors", steps=40, lr=1e-2, eval_every=10))
    assert result.report.heldout_after < result.report.heldout_before
    augmented = finetune(rewritten, teacher, data,
                         FinetuneConfig(train="factors", steps=40, lr=1e-2, eval_every=10, augment=0.2))
    assert augmented.report.heldout_after < augmented.report.heldout_before and not augmented.report.notes

    related = finetune(rewritten, teacher, data,
                       FinetuneConfig(train="factors", steps=40, lr=1e-2, eval_every=10, relation_weight=1.0))
    assert related.report.heldout_after < related.report.heldout_before and not related.report.notes
    pooled = finetune(rewritten, teacher, data,
                      FinetuneConfig(train="factors", steps=40, lr=1e-2, eval_every=10, outputs=("pooled",)))
    assert pooled.report.outputs == ["pooled"] and pooled.report.heldout_after < pooled.report.heldout_before
    with pytest.raises(UsageError, match=r"--outputs logits: .*choose from hidden, pooled"):
        finetune(rewritten, teacher, data, FinetuneConfig(steps=1, outputs=("logits",)))

    layout = _layout(rewritten, trim=True)
    assert layout.mask == "attention_mask" and layout.sequence_outputs == {"hidden"}
    samples = _Samples({**data, "token_type_ids": np.zeros_like(ids)}, dataclasses.replace(
        layout, sequence_inputs=layout.sequence_inputs | {"token_type_ids"}))
    assert samples.lengths is not None and samples.lengths.tolist() == lengths.tolist()
    samples.outputs = {"hidden": np.zeros((80, 12, 16)), "pooled": np.zeros((80, 16)), "score": np.zeros((80, 1))}
    assert samples.relational() == ["pooled"]  # not the sequence output, nor one value per sample
    batch = samples.epoch(np.arange(80), 16, np.random.default_rng(0))[0]
    feeds, _ = samples.feeds(batch)
    assert feeds["input_ids"].shape[1] == lengths[batch].max()
    augmenter = samples.token_augmenter(np.arange(80), 0.5)
    mask = feeds["attention_mask"]
    changed = augmenter(feeds, mask, np.random.default_rng(1))
    assert np.all(changed["input_ids"][mask == 0] == feeds["input_ids"][mask == 0])  # padding untouched
    assert np.mean(changed["input_ids"][mask != 0] != feeds["input_ids"][mask != 0]) > 0.3
    assert np.all(changed["token_type_ids"] == 0) and np.all(changed["attention_mask"] == mask)


# --------------------------------------------------------------------------------------------------------
# Configuration and the command line


def test_config_rejects_bad_values() -> None:
    with pytest.raises(UsageError, match="--train"):
        FinetuneConfig(train="everything")
    with pytest.raises(UsageError, match="--val-split"):
        FinetuneConfig(val_split=1.0)
    with pytest.raises(UsageError, match="--lr"):
        FinetuneConfig(lr=0.0)


def test_cuda_without_cuda_is_a_provider_error(mlp_pair) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    teacher, rewritten, data = mlp_pair
    with pytest.raises(ProviderError, match=r"torch.cuda.is_available\(\) is False"):
        finetune(rewritten, teacher, data, FinetuneConfig(device="cuda"))


def test_cli_finetune_writes_model_and_report(tmp_path: Path, mlp_pair, capsys: pytest.CaptureFixture[str]) -> None:
    _, rewritten, data = mlp_pair
    onnx.save(rewritten, str(tmp_path / "small.onnx"))
    np.savez(tmp_path / "data.npz", **data)
    code = main(["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "tuned.onnx"), "--train", "core", "--steps", "30", "--lr", "1e-2",
                 "--eval-every", "10", "--seed", "1", "--relation-weight", "0.5",
                 "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out loss:" in captured.out
    tuned = onnx.load(str(tmp_path / "tuned.onnx"))
    assert structure(tuned) == structure(rewritten)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train"] == "core" and report["config"]["seed"] == 1
    assert report["config"]["relation_weight"] == 0.5 and not report["notes"]
    assert report["heldout_after"] <= report["heldout_before"]
    code = main(["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "x.onnx"), "--val-split", "1.5"])
    captured = capsys.readouterr()
    assert code == 2 and "--val-split" in captured.err and len(captured.err.strip().splitlines()) == 1
    code = main(["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "x.onnx"), "--relation-weight", "-1"])
    captured = capsys.readouterr()
    assert code == 2 and "--relation-weight" in captured.err and len(captured.err.strip().splitlines()) == 1
    code = main(["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "x.onnx"), "--outputs", "embedding"])
    captured = capsys.readouterr()
    assert code == 2 and "--outputs embedding" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
