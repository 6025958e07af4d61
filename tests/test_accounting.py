"""Every weight-holding node is accounted for: nodes with constant weights that are not sites (LSTM, GRU,
RNN, Conv, MatMulInteger, ConvInteger, QLinear*, Attention, MatMulNBits, Einsum, Gather) and MatMul/Gemm
inside If/Loop/Scan bodies are skips with a reason, in ``find_sites``, ``inspect`` and the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RewriteConfig, rewrite
from onnxsvd.graph import find_sites
from onnxsvd.io import count_parameters
from onnxsvd.pipeline.inspect import inspect_model
from tests.conftest import FULL_RANK
from tests.models import assert_valid, make_model, relative_error, run

F, I8, U8 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8


def _value(name: str, shape: list[int] | None, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _array(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100), size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _holder(
    op: str, rng: np.random.Generator
) -> tuple[list[onnx.NodeProto], list, list, list[onnx.TensorProto], str]:
    """One node of ``op`` with constant weights: (nodes, inputs, outputs, initializers, opset domain)."""
    t = numpy_helper.from_array
    hidden, features = 8, 6
    if op in ("LSTM", "GRU", "RNN"):
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        tensors = [
            t(_array(rng, (1, gates * hidden, features)), "W"),
            t(_array(rng, (1, gates * hidden, hidden)), "R"),
            t(_array(rng, (1, 2 * gates * hidden)), "B"),
        ]
        node = helper.make_node(op, ["X", "W", "R", "B"], ["Y"], name="rnn", hidden_size=hidden)
        return [node], [_value("X", [5, 2, features])], [_value("Y", [5, 1, 2, hidden])], tensors, ""
    if op == "ConvTranspose":
        node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="deconv", kernel_shape=[3, 3])
        weight = t(_array(rng, (3, 4, 3, 3)), "W")
        return [node], [_value("X", [1, 3, 8, 8])], [_value("Y", [1, 4, 10, 10])], [weight], ""
    if op == "ConvInteger":
        node = helper.make_node("ConvInteger", ["X", "W"], ["Y"], name="conv_int")
        weight = t(_array(rng, (4, 3, 3, 3), np.uint8), "W")
        return [node], [_value("X", [1, 3, 8, 8], U8)], [_value("Y", [1, 4, 6, 6], TensorProto.INT32)], [weight], ""
    if op == "MatMulInteger":
        node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"], name="mm_int")
        weight = t(_array(rng, (16, 8), np.int8), "W")
        return [node], [_value("X", [2, 16], I8)], [_value("Y", [2, 8], TensorProto.INT32)], [weight], ""
    if op == "QLinearMatMul":
        names = ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz"]
        tensors = [
            t(np.array(0.1, np.float32), "xs"), t(np.array(0, np.int8), "xz"), t(_array(rng, (16, 8), np.int8), "W"),
            t(np.array(0.05, np.float32), "ws"), t(np.array(0, np.int8), "wz"),
            t(np.array(0.2, np.float32), "ys"), t(np.array(0, np.int8), "yz"),
        ]
        node = helper.make_node("QLinearMatMul", names, ["Y"], name="qmm")
        return [node], [_value("X", [2, 16], I8)], [_value("Y", [2, 8], I8)], tensors, ""
    if op == "QLinearConv":
        names = ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz"]
        tensors = [
            t(np.array(0.1, np.float32), "xs"), t(np.array(0, np.uint8), "xz"),
            t(_array(rng, (4, 3, 3, 3), np.uint8), "W"), t(np.array(0.05, np.float32), "ws"),
            t(np.array(0, np.uint8), "wz"), t(np.array(0.2, np.float32), "ys"), t(np.array(0, np.uint8), "yz"),
        ]
        node = helper.make_node("QLinearConv", names, ["Y"], name="qconv")
        return [node], [_value("X", [1, 3, 8, 8], U8)], [_value("Y", [1, 4, 6, 6], U8)], tensors, ""
    if op == "Einsum":
        node = helper.make_node("Einsum", ["X", "W"], ["Y"], name="einsum", equation="bk,kn->bn")
        return [node], [_value("X", [2, 16])], [_value("Y", [2, 8])], [t(_array(rng, (16, 8)), "W")], ""
    if op == "Gather":
        node = helper.make_node("Gather", ["E", "ids"], ["Y"], name="lookup")
        table = t(_array(rng, (20, 8)), "E")
        return [node], [_value("ids", [3], TensorProto.INT64)], [_value("Y", [3, 8])], [table], ""
    if op == "Attention":  # com.microsoft: fused QKV weight [D, 3D] and bias [3D]
        node = helper.make_node("Attention", ["X", "W", "B"], ["Y"], name="attention", domain="com.microsoft",
                                num_heads=2)
        tensors = [t(_array(rng, (8, 24)), "W"), t(_array(rng, (24,)), "B")]
        return [node], [_value("X", [1, 4, 8])], [_value("Y", [1, 4, 8])], tensors, "com.microsoft"
    if op == "MatMulNBits":  # com.microsoft: 4-bit blocks [N, K/block, block/2] with scales
        node = helper.make_node("MatMulNBits", ["X", "W", "S"], ["Y"], name="nbits", domain="com.microsoft",
                                K=32, N=8, bits=4, block_size=16)
        tensors = [t(_array(rng, (8, 2, 8), np.uint8), "W"), t(_array(rng, (16,)), "S")]
        return [node], [_value("X", [2, 32])], [_value("Y", [2, 8])], tensors, "com.microsoft"
    raise ValueError(op)


HOLDERS = ("LSTM", "GRU", "RNN", "ConvTranspose", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearConv",
           "Einsum", "Gather", "Attention", "MatMulNBits")


def _holder_model(op: str, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inputs, outputs, tensors, domain = _holder(op, rng)
    graph = helper.make_graph(nodes, "holder", inputs, outputs, tensors)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("op", HOLDERS)
def test_weight_holding_node_is_a_skip_with_its_reason(op: str, rng: np.random.Generator) -> None:
    model = _holder_model(op, rng)
    match = find_sites(model)
    assert not match.sites
    (skip,) = match.skips
    assert (skip.op_type, skip.kind) == (op, "weights")
    expected = {
        "LSTM": "LSTM weights are not a site yet",
        "ConvTranspose": "ConvTranspose weights are not a site (its factors would need a transposed chain)",
        "MatMulInteger": "MatMulInteger (integer product) weights are not a site",
        "Gather": "an embedding table is looked up (Gather), not multiplied; not a site",
        "MatMulNBits": "MatMulNBits weights are already packed in low-bit blocks; not a site",
    }
    if op in expected:
        assert skip.reason == expected[op]
    assert skip.params > 0 and skip.dense_bytes > 0
    inspection = inspect_model(model)
    assert [(s.name, s.kind) for s in inspection.skips] == [(skip.name, "weights")]  # never "0 sites, 0 skipped"
    assert inspection.params_in_skipped == skip.params <= count_parameters(model)


def test_lstm_counts_every_weight_and_bias(rng: np.random.Generator) -> None:
    (skip,) = find_sites(_holder_model("LSTM", rng)).skips
    hidden, features = 8, 6
    assert set(skip.weights) == {"W", "R", "B"}
    assert skip.params == 4 * hidden * features + 4 * hidden * hidden + 8 * hidden
    assert skip.shape == (1, 4 * hidden, hidden)  # the largest of them
    assert skip.dense_bytes == 4 * skip.params


def test_small_constants_and_weight_chains_are_not_listed(rng: np.random.Generator) -> None:
    # A 1-D bias, a [2, 3] constant and a Transpose over a site's weight are no weight holders.
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="tr"),
        helper.make_node("MatMul", ["X", "Wt"], ["H"], name="mm"),
        helper.make_node("Add", ["H", "b"], ["Y"], name="bias"),
        helper.make_node("Mul", ["Z", "small"], ["V"], name="small_mul"),
    ]
    model = make_model(
        nodes,
        [_value("X", [3, 16]), _value("Z", [2, 3])],
        [_value("Y", [3, 8]), _value("V", [2, 3])],
        [numpy_helper.from_array(_array(rng, (8, 16)), "W"), numpy_helper.from_array(_array(rng, (8,)), "b"),
         numpy_helper.from_array(_array(rng, (2, 3)), "small")],
    )
    match = find_sites(model)
    assert [site.name for site in match.sites] == ["mm"] and not match.skips


def test_rewrite_reports_weight_holders_and_leaves_them_as_they_are(rng: np.random.Generator) -> None:
    hidden, features = 8, 16
    nodes = [
        helper.make_node("MatMul", ["X", "P"], ["H"], name="proj"),
        helper.make_node("LSTM", ["H", "W", "R"], ["Y"], name="lstm", hidden_size=hidden),
    ]
    model = make_model(
        nodes,
        [_value("X", [5, 2, features])],
        [_value("Y", [5, 1, 2, hidden])],
        [
            numpy_helper.from_array(_array(rng, (features, features)), "P"),
            numpy_helper.from_array(_array(rng, (1, 4 * hidden, features)), "W"),
            numpy_helper.from_array(_array(rng, (1, 4 * hidden, hidden)), "R"),
        ],
    )
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert_valid(result.model)
    feeds = {"X": _array(rng, (5, 2, features))}
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < 1e-4
    reports = {site.name: site for site in result.report.sites}
    assert reports["proj"].action == "factorized"
    lstm = reports["lstm"]
    assert (lstm.action, lstm.op_type, lstm.shape) == ("kept", "LSTM", None)
    assert lstm.reason == "LSTM weights are not a site yet"
    assert lstm.params_before == lstm.params_after == 4 * hidden * (features + hidden)
    assert [site.name for site in result.report.sites] == ["proj", "lstm"]
    assert {"W", "R"} <= {tensor.name for tensor in result.model.graph.initializer}


def _gemm_body(rng: np.random.Generator, name: str, inner_weight: bool) -> onnx.GraphProto:
    """A body computing ``out = Gemm(X, W)``: ``W`` an initializer of the body, or the outer ``Wout``."""
    weight = "Wbody" if inner_weight else "Wout"
    initializers = [numpy_helper.from_array(_array(rng, (16, 8)), "Wbody")] if inner_weight else []
    node = helper.make_node("Gemm", ["X", weight], [f"{name}_out"], name="cell")
    return helper.make_graph([node], name, [], [_value(f"{name}_out", [2, 8])], initializers)


def test_matmul_gemm_inside_if_branches_are_skips_with_their_scope(rng: np.random.Generator) -> None:
    # A voice-activity model's shape: the LSTM cell's Gemms inside an If with two branches.
    if_node = helper.make_node(
        "If", ["flag"], ["Y"], name="rate",
        then_branch=_gemm_body(rng, "then", inner_weight=True),
        else_branch=_gemm_body(rng, "else", inner_weight=False),
    )
    model = make_model(
        [if_node],
        [_value("X", [2, 16]), _value("flag", [], TensorProto.BOOL)],
        [_value("Y", [2, 8])],
        [numpy_helper.from_array(_array(rng, (16, 8)), "Wout")],
    )
    match = find_sites(model)
    assert not match.sites
    assert [(s.name, s.kind, s.weights) for s in match.skips] == [  # in the order of the If's attributes
        ("rate/else_branch/cell", "subgraph", ("Wout",)),
        ("rate/then_branch/cell", "subgraph", ("Wbody",)),
    ]
    assert match.skips[1].scope == "then_branch of If 'rate'"
    assert match.skips[1].reason == (
        "inside then_branch of If 'rate': sites inside If/Loop/Scan bodies are not supported yet"
    )
    inspection = inspect_model(model)
    assert len(inspection.skips) == 2 and inspection.params_in_skipped == 16 * 8  # Wout; Wbody is in the body
    report = rewrite(model, RewriteConfig(policy=FULL_RANK)).report
    assert [(site.name, site.action, site.shape) for site in report.sites] == [
        ("rate/else_branch/cell", "kept", None),
        ("rate/then_branch/cell", "kept", None),
    ]


def test_loop_and_scan_bodies_nested_are_searched(rng: np.random.Generator) -> None:
    # Loop body with a MatMul on an outer weight and, nested in an If inside it, an LSTM on a body weight.
    hidden = 8
    inner_if = helper.make_node(
        "If", ["cond_in"], ["branch_out"], name="gate",
        then_branch=helper.make_graph(
            [helper.make_node("LSTM", ["seq", "Wl", "Rl"], ["lstm_out"], name="lstm", hidden_size=hidden)],
            "then", [], [_value("lstm_out", [3, 1, 2, hidden])],
            [numpy_helper.from_array(_array(rng, (1, 4 * hidden, hidden)), "Wl"),
             numpy_helper.from_array(_array(rng, (1, 4 * hidden, hidden)), "Rl")],
        ),
        else_branch=helper.make_graph(
            [helper.make_node("Unsqueeze", ["seq", "axes"], ["plain"], name="pass")], "else", [],
            [_value("plain", [3, 1, 2, hidden])], [numpy_helper.from_array(np.array([1], np.int64), "axes")],
        ),
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state", "Wloop"], ["next"], name="step"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
            inner_if,
        ],
        "body",
        [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("state", [2, 16])],
        [_value("cond_out", [], TensorProto.BOOL), _value("next", [2, 16]), _value("branch_out", [3, 1, 2, hidden])],
    )
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "Wscan"], ["scanned"], name="project")],
        "scan_body",
        [_value("row", [1, 16])],
        [_value("scanned", [1, 16])],
        [numpy_helper.from_array(_array(rng, (16, 16)), "Wscan")],
    )
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "S0"], ["S", "outs"], name="loop", body=loop_body),
        helper.make_node("Scan", ["rows"], ["scanned_all"], name="scan", body=scan_body, num_scan_inputs=1),
    ]
    model = make_model(
        nodes,
        [_value("trips", [], TensorProto.INT64), _value("cond", [], TensorProto.BOOL), _value("S0", [2, 16]),
         _value("seq", [3, 2, hidden]), _value("rows", [5, 1, 16])],
        [_value("S", [2, 16]), _value("outs", [None, 3, 1, 2, hidden]), _value("scanned_all", [5, 1, 16])],
        [numpy_helper.from_array(_array(rng, (16, 16)), "Wloop")],
    )
    names = [(skip.name, skip.op_type, skip.scope) for skip in find_sites(model).skips]
    assert names == [
        ("loop/body/step", "MatMul", "body of Loop 'loop'"),
        ("loop/body/gate/then_branch/lstm", "LSTM", "then_branch of If 'loop/body/gate'"),
        ("scan/body/project", "MatMul", "body of Scan 'scan'"),
    ]
