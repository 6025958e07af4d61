"""The site matcher: the normal form ``Y = X · W_kn`` of every supported site, and every skip's reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RewriteConfig
from onnxsvd.graph import GraphIndex, find_sites, load_weight, remove_dead_weights
from tests.models import (
    BIAS_KINDS,
    WEIGHT_SOURCES,
    gemm_case,
    make_model,
    matmul_case,
    shared_weight_case,
    tied_embedding_case,
)


def only_site(model: onnx.ModelProto, config: RewriteConfig | None = None):
    match = find_sites(model, config)
    assert len(match.sites) == 1 and not match.skips, match
    return match.sites[0]


def only_skip(model: onnx.ModelProto, config: RewriteConfig | None = None):
    match = find_sites(model, config)
    assert not match.sites and len(match.skips) == 1, match
    return match.skips[0]


@pytest.mark.parametrize("source", WEIGHT_SOURCES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_normal_form(source: str, side: str, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 7, 5, side=side, source=source)
    site = only_site(case.model)
    assert (site.name, site.op_type, site.weight_side) == ("mm", "MatMul", side)
    assert (site.k, site.n) == (7, 5) and site.params == 35
    assert site.activation == "X" and site.output == "Y"
    assert site.weight.compute_dtype == TensorProto.FLOAT
    chain_ops = [case.model.graph.node[p].op_type for p in site.weight.chain]
    expected_chain = {
        "initializer": [],
        "constant": [],
        "transpose": ["Transpose"],
        "identity": ["Identity"],
        "cast_fp16": ["Cast"],
        "cast_bf16": ["Cast"],
        "dequant_tensor": ["DequantizeLinear"],
        "dequant_channel": ["DequantizeLinear"],
        "constant_transpose": ["Transpose"],
    }[source]
    assert chain_ops == expected_chain
    storage = {"cast_fp16": TensorProto.FLOAT16, "cast_bf16": TensorProto.BFLOAT16}.get(source, TensorProto.FLOAT)
    if source.startswith("dequant"):
        storage = TensorProto.INT8
    assert site.weight.storage_dtype == storage
    weight = load_weight(GraphIndex(case.model.graph), site)
    assert weight.shape == (7, 5)
    np.testing.assert_allclose(weight, case.weights["mm"], rtol=1e-6, atol=1e-7)


@given(
    m=st.integers(1, 6),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, 3.0]),
    bias=st.sampled_from(BIAS_KINDS),
    weight_as=st.sampled_from("AB"),
)
def test_gemm_normal_form(
    m: int, k: int, n: int, trans_a: int, trans_b: int, alpha: float, beta: float, bias: str, weight_as: str
) -> None:
    rng = np.random.default_rng(m * 1000 + k * 100 + n)
    case = gemm_case(rng, m, k, n, trans_a, trans_b, alpha, beta, bias, weight_as)
    site = only_site(case.model)
    expected_kn = (k, n) if weight_as == "B" else (k, m)
    assert (site.k, site.n) == expected_kn
    assert site.weight_side == ("right" if weight_as == "B" else "left")
    # The activation's own transpose flag stays on the activation.
    assert site.transpose_activation == bool(trans_a if weight_as == "B" else trans_b)
    assert (site.alpha, site.beta) == (alpha, beta)
    assert site.bias == (None if bias == "none" else "C")
    weight = load_weight(GraphIndex(case.model.graph), site)  # α folded in
    np.testing.assert_allclose(weight, case.weights["gemm"], rtol=1e-6, atol=1e-7)


def test_shared_weight_is_one_group(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng)
    match = find_sites(case.model)
    assert [site.name for site in match.sites] == ["first", "second"] and not match.skips
    assert match.sites[0].group == match.sites[1].group


def test_unnamed_nodes_get_deterministic_names(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 4, 3, name="")
    assert only_site(case.model).name == "MatMul_0"


# ---------------------------------------------------------------------------------------------- skips


def _model(nodes, inputs, outputs, initializers=()):
    return make_model(nodes, inputs, outputs, list(initializers))


def _tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _value(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def test_rank3_weight_is_skipped(rng: np.random.Generator) -> None:
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="batched")],
        [_value("X", [2, 3, 4])],
        [_value("Y", [2, 3, 5])],
        [_tensor(rng, "W", (2, 4, 5))],
    )
    skip = only_skip(model)
    assert skip.name == "batched" and skip.shape == (2, 4, 5)
    assert "rank 3" in skip.reason and "broadcast batch" in skip.reason


def test_vector_weight_is_skipped(rng: np.random.Generator) -> None:
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="dot")],
        [_value("X", [3, 4])],
        [_value("Y", [3])],
        [_tensor(rng, "W", (4,))],
    )
    assert "rank 1" in only_skip(model).reason


def test_both_operands_dynamic_is_skipped() -> None:
    model = _model(
        [helper.make_node("MatMul", ["X", "Z"], ["Y"], name="attention")],
        [_value("X", [3, 4]), _value("Z", [4, 5])],
        [_value("Y", [3, 5])],
    )
    skip = only_skip(model)
    assert skip.name == "attention" and "both operands are dynamic" in skip.reason


def test_both_operands_constant_is_skipped(rng: np.random.Generator) -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["P", "Q"], ["R"], name="folded"),
            helper.make_node("Add", ["X", "R"], ["Y"], name="add"),
        ],
        [_value("X", [3, 5])],
        [_value("Y", [3, 5])],
        [_tensor(rng, "P", (3, 4)), _tensor(rng, "Q", (4, 5))],
    )
    assert "both operands are constant" in only_skip(model).reason


def test_initializer_that_is_also_a_graph_input_is_not_constant(rng: np.random.Generator) -> None:
    # An initializer listed among the inputs is a default the caller may override: not a constant.
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="overridable")],
        [_value("X", [3, 4]), _value("W", [4, 5])],
        [_value("Y", [3, 5])],
        [_tensor(rng, "W", (4, 5))],
    )
    assert "both operands are dynamic" in only_skip(model).reason


def test_integer_weight_is_skipped(rng: np.random.Generator) -> None:
    weight = numpy_helper.from_array(rng.integers(-3, 3, (4, 5)).astype(np.int32), "W")
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="integer")],
        [_value("X", [3, 4], TensorProto.INT32)],
        [_value("Y", [3, 5], TensorProto.INT32)],
        [weight],
    )
    assert "not floating point" in only_skip(model).reason


def test_gemm_with_alpha_zero_is_skipped(rng: np.random.Generator) -> None:
    case = gemm_case(rng, 3, 4, 5, alpha=0.0, bias="n")
    assert "alpha is 0" in only_skip(case.model).reason


def test_include_exclude_and_min_params(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng)  # sites "first" and "second" share W [24, 16]
    # Both names excluded/included together keeps the shared weight consistent.
    included = find_sites(case.model, RewriteConfig(include="^(first|second)$"))
    assert len(included.sites) == 2
    excluded = find_sites(case.model, RewriteConfig(exclude="s"))  # matches both "first" and "second"
    assert not excluded.sites
    assert all("--exclude 's'" in skip.reason for skip in excluded.skips)
    not_included = find_sites(case.model, RewriteConfig(include="^nothing$"))
    assert all("does not match --include '^nothing$'" in skip.reason for skip in not_included.skips)
    small = find_sites(case.model, RewriteConfig(min_params=24 * 16 + 1))
    assert not small.sites
    assert all("384 parameters < --min-params 385" in skip.reason for skip in small.skips)
    assert len(find_sites(case.model, RewriteConfig(min_params=24 * 16)).sites) == 2


def test_excluding_one_user_of_a_shared_weight_keeps_the_other_dense(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng)
    match = find_sites(case.model, RewriteConfig(exclude="^second$"))
    assert not match.sites
    reasons = {skip.name: skip.reason for skip in match.skips}
    assert "--exclude" in reasons["second"]
    assert "also read by MatMul node 'second'" in reasons["first"] and "dense copy" in reasons["first"]


def test_tied_embedding_is_skipped(rng: np.random.Generator) -> None:
    match = find_sites(tied_embedding_case(rng).model)
    assert not match.sites
    lookup, skip = match.skips  # the lookup holds the table too: it is listed, in graph order
    assert (lookup.name, lookup.kind, lookup.weights) == ("lookup", "weights", ("E",))
    assert skip.name == "project"
    assert "'E'" in skip.reason and "Gather node 'lookup'" in skip.reason and "dense copy" in skip.reason


def test_weight_read_inside_a_subgraph_is_skipped(rng: np.random.Generator) -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["then_out"])], "then", [], [_value("then_out", [4, 5])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["W"], ["else_out"])], "else", [], [_value("else_out", [4, 5])]
    )
    model = _model(
        [
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
            helper.make_node("If", ["flag"], ["Z"], name="branch", then_branch=then_branch, else_branch=else_branch),
        ],
        [_value("X", [3, 4]), _value("flag", [], TensorProto.BOOL)],
        [_value("Y", [3, 5]), _value("Z", [4, 5])],
        [_tensor(rng, "W", (4, 5))],
    )
    assert "If node 'branch'" in only_skip(model).reason


def test_weight_read_two_bodies_deep_is_skipped(rng: np.random.Generator) -> None:
    inner = helper.make_graph([helper.make_node("Neg", ["W"], ["deep"])], "inner", [], [_value("deep", [4, 5])])
    keep = helper.make_graph([helper.make_node("Identity", ["W"], ["kept"])], "keep", [], [_value("kept", [4, 5])])
    then_branch = helper.make_graph(
        [helper.make_node("If", ["flag"], ["nested"], then_branch=inner, else_branch=keep)],
        "then",
        [],
        [_value("nested", [4, 5])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["plain"])], "else", [], [_value("plain", [3, 4])]
    )
    model = _model(
        [
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
            helper.make_node("If", ["flag"], ["Z"], name="outer", then_branch=then_branch, else_branch=else_branch),
        ],
        [_value("X", [3, 4]), _value("flag", [], TensorProto.BOOL)],
        [_value("Y", [3, 5]), _value("Z", [4, 5])],
        [_tensor(rng, "W", (4, 5))],
    )
    index = GraphIndex(model.graph)
    assert index.consumers["W"] == [0, 1] and index.consumers["flag"] == [1] and index.producer["Z"] == 1
    assert "If node 'outer'" in only_skip(model).reason


def test_cleanup_removes_only_what_nobody_reads(rng: np.random.Generator) -> None:
    # A dead weight chain Constant → Transpose → Cast and a dead initializer go; an initializer read only
    # inside an If body, a dead node of the model's own (Relu) and value_info of live tensors stay.
    weight = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "stored")
    body = helper.make_graph([helper.make_node("Neg", ["B"], ["neg"])], "then", [], [_value("neg", [4])])
    other = helper.make_graph([helper.make_node("Identity", ["B"], ["same"])], "else", [], [_value("same", [4])])
    model = _model(
        [
            helper.make_node("Constant", [], ["W0"], name="constant", value=weight),
            helper.make_node("Transpose", ["W0"], ["W1"], name="transpose"),
            helper.make_node("Cast", ["W1"], ["W2"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Relu", ["X"], ["unused_relu"], name="relu"),
            helper.make_node("Neg", ["X"], ["Y"], name="negate"),
            helper.make_node("If", ["flag"], ["Z"], name="branch", then_branch=body, else_branch=other),
        ],
        [_value("X", [3, 4]), _value("flag", [], TensorProto.BOOL)],
        [_value("Y", [3, 4]), _value("Z", [4])],
        [_tensor(rng, "B", (4,)), _tensor(rng, "dead", (2, 2))],
    )
    model.graph.value_info.extend([_value("W2", [4, 5]), _value("unused_relu", [3, 4]), _value("gone", [1])])
    remove_dead_weights(model)
    assert [node.name for node in model.graph.node] == ["relu", "negate", "branch"]
    assert [tensor.name for tensor in model.graph.initializer] == ["B"]
    assert [value.name for value in model.graph.value_info] == ["unused_relu"]
    onnx.checker.check_model(model, full_check=True)


def test_weight_that_is_a_graph_output_is_skipped(rng: np.random.Generator) -> None:
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        [_value("X", [3, 4])],
        [_value("Y", [3, 5]), _value("W", [4, 5])],
        [_tensor(rng, "W", (4, 5))],
    )
    assert "graph output" in only_skip(model).reason


def test_skips_and_sites_are_in_graph_order(rng: np.random.Generator) -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["X", "Z"], ["H"], name="dynamic"),
            helper.make_node("MatMul", ["H", "W"], ["Y"], name="weighted"),
            helper.make_node("MatMul", ["Y", "B3"], ["V"], name="batched"),
        ],
        [_value("X", [2, 3, 4]), _value("Z", [2, 4, 4])],
        [_value("V", [2, 3, 6])],
        [_tensor(rng, "W", (4, 5)), _tensor(rng, "B3", (2, 5, 6))],
    )
    match = find_sites(model)
    assert [site.name for site in match.sites] == ["weighted"]
    assert [(skip.name, skip.node_index) for skip in match.skips] == [("dynamic", 0), ("batched", 2)]
