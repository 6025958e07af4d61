"""The rewrite pass, end to end: graph structure, numbers through ONNX Runtime, and the checker.

At full rank (every singular value kept, growth allowed) a rewrite must reproduce the model; at reduced
rank its error must be exactly what the discarded singular values predict.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.errors import UsageError
from tests.conftest import FULL_RANK
from tests.models import (
    BIAS_KINDS,
    BLOCKED_SOURCE,
    WEIGHT_SOURCES,
    Case,
    assert_valid,
    gemm_case,
    initializer,
    make_model,
    matmul_case,
    op_types,
    relative_error,
    run,
    shared_weight_case,
)

#: Relative error (max |Δ| over max |y|) allowed at full rank with fp32 factors.
FULL_RANK_TOLERANCE = 1e-4


def full_rank(**fields) -> RewriteConfig:
    return RewriteConfig(policy=FULL_RANK, **fields)


def assert_reproduces(case: Case, rewritten: onnx.ModelProto, tolerance: float = FULL_RANK_TOLERANCE) -> None:
    assert_valid(rewritten)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in case.model.graph.output]
    before, after = run(case.model, case.feeds), run(rewritten, case.feeds)
    for expected, actual in zip(before, after, strict=True):
        assert actual.dtype == expected.dtype
        assert relative_error(actual, expected) < tolerance


def site_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm")]


def assert_chain_structure(model: onnx.ModelProto, layout: str, stages: int) -> None:
    """One site replaced: two MatMul/Gemm (fused), or two per stage summed by ``stages − 1`` Adds."""
    chains = 1 if layout == "fused" else stages
    assert len(site_nodes(model)) == 2 * chains
    assert op_types(model).count("Add") == chains - 1


def _value(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# ------------------------------------------------------------------------------ full rank, every kind


@pytest.mark.parametrize("source", WEIGHT_SOURCES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_full_rank_matmul_reproduces_every_weight_source(source: str, side: str, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 9, 6, lead=(2, 3), side=side, source=source)
    # fp32 factors: exact up to fp32 rounding whatever the weight was stored as.
    result = rewrite(case.model, full_rank(dtype="fp32"))
    assert_reproduces(case, result.model)
    (site,) = result.report.sites
    assert (site.name, site.action, site.rank, site.shape) == ("mm", "factorized", 6, [9, 6])
    nodes = site_nodes(result.model)
    assert [node.op_type for node in nodes] == ["MatMul", "MatMul"]
    assert "mm" not in {node.name for node in result.model.graph.node}
    # The chain reads the activation first: never a constant A·B subgraph a folder would make dense.
    assert "X" in nodes[0].input and nodes[1].output[0] == "Y"
    first = initializer(result.model, nodes[0].input[1 if side == "right" else 0])
    second = initializer(result.model, nodes[1].input[1 if side == "right" else 0])
    assert first.shape == ((9, 6) if side == "right" else (6, 9))
    assert second.shape == (6, 6)
    assert first.dtype == second.dtype == np.float32
    # The dense weight and the nodes that produced it are gone.
    assert not {"Transpose", "Identity", "Cast", "DequantizeLinear", "Constant"} & set(op_types(result.model))
    assert len(result.model.graph.initializer) == 2


@pytest.mark.parametrize(
    ("source", "storage", "tolerance"),
    [("cast_fp16", TensorProto.FLOAT16, 1e-3), ("cast_bf16", TensorProto.BFLOAT16, 1e-2)],
)
@pytest.mark.parametrize("side", ["right", "left"])
def test_low_precision_weights_keep_their_storage_dtype(
    source: str, storage: int, tolerance: float, side: str, rng: np.random.Generator
) -> None:
    case = matmul_case(rng, 24, 16, lead=(5,), side=side, source=source)
    result = rewrite(case.model, full_rank())
    assert_reproduces(case, result.model, tolerance)
    assert [tensor.data_type for tensor in result.model.graph.initializer] == [storage, storage]
    casts = [node for node in result.model.graph.node if node.op_type == "Cast"]
    assert len(casts) == 2
    assert all(helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT for node in casts)


def test_fp16_storage_of_an_fp32_model(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 24, 16, lead=(5,))
    result = rewrite(case.model, full_rank(dtype="fp16"))
    assert_reproduces(case, result.model, tolerance=1e-3)
    assert [tensor.data_type for tensor in result.model.graph.initializer] == [TensorProto.FLOAT16] * 2
    assert op_types(result.model) == ["Cast", "Cast", "MatMul", "MatMul"]


def test_activation_aware_methods_need_statistics(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 8, 8)
    for method in ("asvd", "whiten"):
        with pytest.raises(UsageError, match="calibration"):
            rewrite(case.model, RewriteConfig(method=method))


def test_fp16_model(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 32, 24, lead=(2, 4), source="initializer", dtype=TensorProto.FLOAT16)
    result = rewrite(case.model, full_rank())
    assert_valid(result.model)
    assert [tensor.data_type for tensor in result.model.graph.initializer] == [TensorProto.FLOAT16] * 2
    assert "Cast" not in op_types(result.model)
    x = case.feeds["X"].astype(np.float64)
    reference = x @ case.weights["mm"]
    (original,), (rewritten,) = run(case.model, case.feeds), run(result.model, case.feeds)
    assert rewritten.dtype == np.float16
    # fp16 factors and an fp16 hidden activation: a few fp16 roundings, like the original's own.
    assert relative_error(original, reference) < 2e-3
    assert relative_error(rewritten, reference) < 4e-3


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 2, 3)], ids=["rank1", "rank2", "rank3", "rank4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_full_rank_matmul_any_activation_rank(lead: tuple[int, ...], side: str, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 8, 5, lead=lead, side=side)  # left with rank 1: W [N, K] · X [K] → [N]
    assert_reproduces(case, rewrite(case.model, full_rank()).model)


@settings(max_examples=40)
@given(
    k=st.integers(1, 9),
    n=st.integers(1, 9),
    lead=st.lists(st.integers(1, 3), max_size=3).map(tuple),
    side=st.sampled_from(["right", "left"]),
    source=st.sampled_from(WEIGHT_SOURCES),
    layout=st.sampled_from(["fused", "stages"]),
)
def test_full_rank_matmul_property(k: int, n: int, lead: tuple[int, ...], side: str, source: str, layout: str) -> None:
    rng = np.random.default_rng([k, n, len(lead), WEIGHT_SOURCES.index(source)])
    case = matmul_case(rng, k, n, lead=lead, side=side, source=source)
    result = rewrite(case.model, full_rank(dtype="fp32", stages=2, layout=layout))
    (site,) = result.report.sites
    assert site.action == "factorized" and site.rank == min(k, n) and site.shape == [k, n]
    assert site.stage_ranks == ([1] if site.rank == 1 else [-(-site.rank // 2), site.rank // 2])
    assert_chain_structure(result.model, layout, len(site.stage_ranks))
    assert_reproduces(case, result.model)


def test_blocked_dequantize_linear(rng: np.random.Generator) -> None:
    for side in ("right", "left"):
        case = matmul_case(rng, 7, 5, side=side, source=BLOCKED_SOURCE, opset=21, ir_version=10)
        result = rewrite(case.model, full_rank())
        assert result.report.sites[0].action == "factorized"
        assert_reproduces(case, result.model)


@settings(max_examples=60)
@given(
    m=st.integers(1, 7),
    k=st.integers(1, 7),
    n=st.integers(1, 7),
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -1.5]),
    beta=st.sampled_from([1.0, 0.0, 2.5]),
    bias=st.sampled_from(BIAS_KINDS),
    weight_as=st.sampled_from("BA"),
    opset=st.sampled_from([17, 11, 9]),
    layout=st.sampled_from(["fused", "stages"]),
)
def test_full_rank_gemm_every_attribute_combination(
    m: int,
    k: int,
    n: int,
    trans_a: int,
    trans_b: int,
    alpha: float,
    beta: float,
    bias: str,
    weight_as: str,
    opset: int,
    layout: str,
) -> None:
    if opset < 11 and bias == "none":
        bias = "n"  # C is required before opset 11
    rng = np.random.default_rng([m, k, n, trans_a, trans_b, opset])
    case = gemm_case(rng, m, k, n, trans_a, trans_b, alpha, beta, bias, weight_as, opset=opset)
    result = rewrite(case.model, full_rank(stages=2, layout=layout))
    (site,) = result.report.sites
    assert site.action == "factorized"
    normal = (k, n) if weight_as == "B" else (k, m)
    assert site.shape == list(normal) and site.rank == min(normal)
    assert_chain_structure(result.model, layout, len(site.stage_ranks))
    assert_reproduces(case, result.model)
    assert result.model.opset_import[0].version == opset


@pytest.mark.parametrize("source", ["constant", "transpose", "identity", "dequant_channel", "constant_transpose"])
@pytest.mark.parametrize("weight_as", ["B", "A"])
def test_full_rank_gemm_weight_sources(source: str, weight_as: str, rng: np.random.Generator) -> None:
    case = gemm_case(
        rng, 4, 9, 6, trans_a=0, trans_b=1, alpha=0.7, beta=1.5, bias="1n", weight_as=weight_as, source=source
    )
    assert_reproduces(case, rewrite(case.model, full_rank()).model)


@pytest.mark.parametrize("opset", [9, 10])
def test_old_opset_gemm(opset: int, rng: np.random.Generator) -> None:
    case = gemm_case(rng, 5, 12, 10, trans_a=1, trans_b=1, alpha=0.5, beta=2.0, bias="mn", opset=opset)
    result = rewrite(case.model, full_rank())
    assert_reproduces(case, result.model)
    # Before opset 11 every Gemm needs C: only the node carrying the bias may be a Gemm.
    gemms = [node for node in result.model.graph.node if node.op_type == "Gemm"]
    assert len(gemms) == 1 and gemms[0].input[2] == "C"


@pytest.mark.parametrize("layout", ["fused", "stages"])
@pytest.mark.parametrize("bias", ["n", "1n", "scalar"])
def test_opset6_gemm_keeps_broadcast(bias: str, layout: str, rng: np.random.Generator) -> None:
    # Gemm-6 broadcasts C only with broadcast=1: the node that carries C must keep it. ONNX Runtime has
    # no Gemm-6 kernel, so the numbers come from onnx's reference evaluator.
    from onnx.reference import ReferenceEvaluator

    case = gemm_case(rng, 5, 12, 10, trans_a=1, trans_b=1, alpha=0.5, beta=2.0, bias=bias, opset=6)
    (gemm,) = case.model.graph.node
    gemm.attribute.append(helper.make_attribute("broadcast", 1))
    onnx.checker.check_model(case.model, full_check=True)
    result = rewrite(case.model, full_rank(stages=2, layout=layout))
    onnx.checker.check_model(result.model, full_check=True)
    (carrier,) = [node for node in result.model.graph.node if node.op_type == "Gemm"]
    assert carrier.input[2] == "C"
    assert {a.name: helper.get_attribute_value(a) for a in carrier.attribute}.get("broadcast") == 1
    expected = ReferenceEvaluator(case.model).run(None, case.feeds)[0]
    actual = ReferenceEvaluator(result.model).run(None, case.feeds)[0]
    assert relative_error(expected, actual) < FULL_RANK_TOLERANCE


# ------------------------------------------------------------------------------------- shared weights


def test_shared_weight_is_factorized_once(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng, k=24, n=16)
    result = rewrite(case.model, full_rank())
    assert_reproduces(case, result.model)
    assert len(result.model.graph.initializer) == 2  # one pair of factors for both sites
    factors = [node.input[1] for node in site_nodes(result.model)]  # first: A, B; second: A, B
    assert factors[0] == factors[2] and factors[1] == factors[3]
    reports = {site.name: site for site in result.report.sites}
    assert reports["first"].shared_with == ["second"] and reports["second"].shared_with == ["first"]
    # Per site each counts its factors; the model counts them once.
    assert result.report.params_after == 16 * (24 + 16)


def test_one_weight_read_by_many_kinds_of_site(rng: np.random.Generator) -> None:
    k, n = 6, 5
    value = _value
    nodes = [
        helper.make_node("MatMul", ["X1", "W"], ["Y1"], name="matmul"),
        helper.make_node("Gemm", ["X2", "W", "C"], ["Y2"], name="gemm"),  # same W_kn as "matmul"
        helper.make_node("MatMul", ["W", "X3"], ["Y3"], name="mirror"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="transpose"),
        helper.make_node("Gemm", ["X4", "Wt"], ["Y4"], name="gemm_t", transB=1, alpha=2.0),
        helper.make_node("MatMul", ["X5", "Wt"], ["Y5"], name="matmul_t"),
        helper.make_node("Cast", ["W"], ["W64"], name="cast", to=TensorProto.DOUBLE),
        helper.make_node("MatMul", ["X6", "W64"], ["Y6"], name="double"),
        helper.make_node("Gemm", ["X7", "W"], ["Y7"], name="gemm_wt", transB=1),  # same W_kn = Wᵀ as "mirror"
    ]
    inputs = [
        value("X1", [3, k]),
        value("X2", [2, k]),
        value("X3", [n, 4]),
        value("X4", [3, k]),
        value("X5", [3, n]),
        value("X6", [3, k], TensorProto.DOUBLE),
        value("X7", [2, n]),
    ]
    outputs = [
        value("Y1", [3, n]),
        value("Y2", [2, n]),
        value("Y3", [k, 4]),
        value("Y4", [3, n]),
        value("Y5", [3, k]),
        value("Y6", [3, n], TensorProto.DOUBLE),
        value("Y7", [2, k]),
    ]
    tensors = [
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"),
    ]
    model = make_model(nodes, inputs, outputs, tensors)
    feeds = {
        v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(
            np.float64 if v.name == "X6" else np.float32
        )
        for v in inputs
    }
    for layout in ("fused", "stages"):
        result = rewrite(model, full_rank(layout=layout, stages=2))
        assert_reproduces(Case(model, feeds, {}), result.model)
        reports = {site.name: site for site in result.report.sites}
        assert all(site.action == "factorized" for site in reports.values())
        # One factorization of W for every use that reads it as W or Wᵀ, whatever the Transpose between:
        # the mirror, the Transpose'd MatMul and the transB Gemm read the same factors from the other end,
        # and the fp64 use reads them through a Cast (fp32 → fp64 changes no value). α = 2 changes the
        # value: that Gemm is factorized on its own.
        one = ["matmul", "gemm", "mirror", "matmul_t", "double", "gemm_wt"]
        for name in one:
            assert reports[name].shared_with == [other for other in one if other != name]
        assert reports["gemm_t"].shared_with == []
        initializers = {tensor.name for tensor in result.model.graph.initializer}
        assert "W" not in initializers
        stored = [name for name in initializers if name.startswith("W.svd")]
        assert len(stored) == 2 * 2 * (1 if layout == "fused" else 2)  # A and B per stage, for 2 values of W


# -------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("side", ["right", "left"])
def test_layouts(side: str, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 40, 32, lead=(6,), side=side)
    policy = RankPolicy("rank", 12, align=1)
    fused = rewrite(case.model, RewriteConfig(policy=policy, stages=3, layout="fused"))
    stages = rewrite(case.model, RewriteConfig(policy=policy, stages=3, layout="stages"))
    for result in (fused, stages):
        assert_valid(result.model)
        assert result.report.sites[0].stage_ranks == [4, 4, 4]
    # fused: exactly two MatMuls replace the site, reading the stages' factors concatenated.
    assert op_types(fused.model) == ["MatMul", "MatMul"]
    assert sorted(initializer(fused.model, name).shape for name in _factor_names(fused.model)) == sorted(
        [(40, 12), (12, 32)] if side == "right" else [(12, 40), (32, 12)]
    )
    # stages: one chain per stage, summed by Add into the site's output.
    assert op_types(stages.model).count("MatMul") == 6 and op_types(stages.model).count("Add") == 2
    assert stages.model.graph.node[-1].op_type == "Add" and stages.model.graph.node[-1].output[0] == "Y"
    assert len(stages.model.graph.initializer) == 6
    # Same factors, same numbers.
    (y_fused,), (y_stages,) = run(fused.model, case.feeds), run(stages.model, case.feeds)
    assert relative_error(y_stages, y_fused) < 1e-5


def _factor_names(model: onnx.ModelProto) -> list[str]:
    names = {tensor.name for tensor in model.graph.initializer}
    return [name for node in model.graph.node for name in node.input if name in names]


def test_stages_layout_keeps_the_bias_on_the_first_stage(rng: np.random.Generator) -> None:
    case = gemm_case(rng, 4, 16, 12, trans_b=1, beta=0.5, bias="n")
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 4, align=1), stages=2, layout="stages"))
    assert_valid(result.model)
    with_bias = [node for node in result.model.graph.node if "C" in node.input]
    assert len(with_bias) == 1 and with_bias[0].output[0].endswith("svd_s1_y")
    # Dropping trailing stages is meant to work: the bias must not be counted twice, so check numbers.
    factorization_error = run(case.model, case.feeds)[0] - run(result.model, case.feeds)[0]
    x = case.feeds["X"].astype(np.float64)
    model_error = x @ (case.weights["gemm"] - _fused_product(result.model))
    assert np.max(np.abs(factorization_error - model_error)) < 1e-4 * np.max(np.abs(model_error))


def _fused_product(model: onnx.ModelProto) -> np.ndarray:
    """``Σ_i A_i B_i`` of a right-hand stages/fused chain, read back from the initializers."""
    firsts = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and node.input[0] == "X"]
    total = 0.0
    for first in firsts:
        second = next(node for node in model.graph.node if first.output[0] in node.input)
        a = initializer(model, first.input[1]).astype(np.float64)  # [K, r]
        b = initializer(model, second.input[1]).astype(np.float64)  # [r, N]
        total = total + a @ b
    return total


# -------------------------------------------------------------------------------------- reduced rank


@pytest.mark.parametrize("layout", ["fused", "stages"])
@pytest.mark.parametrize("rank", [1, 5, 11])
def test_reduced_rank_error_is_what_the_discarded_singular_values_predict(
    rank: int, layout: str, rng: np.random.Generator
) -> None:
    case = matmul_case(rng, 30, 24, lead=(8,))
    weight = case.weights["mm"]  # [K, N]
    sigma = np.linalg.svd(weight, compute_uv=False)
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", rank, align=1), layout=layout))
    assert_valid(result.model)
    product = _fused_product(result.model)  # A·B as stored
    discarded = np.sqrt(np.sum(sigma[rank:] ** 2))
    assert np.linalg.norm(weight - product) == pytest.approx(discarded, rel=1e-5)
    (site,) = result.report.sites
    assert site.rank == rank
    assert site.kept_energy == pytest.approx(np.sum(sigma[:rank] ** 2) / np.sum(sigma**2), rel=1e-9)
    assert site.weight_error == pytest.approx(discarded / np.linalg.norm(weight), rel=1e-5)
    assert site.params_after == rank * (30 + 24)
    # Through ONNX Runtime the output moves by exactly X·(W − A·B).
    x = case.feeds["X"].astype(np.float64)
    (before,), (after,) = run(case.model, case.feeds), run(result.model, case.feeds)
    predicted = x @ (weight - product)
    assert np.max(np.abs((before - after) - predicted)) < 1e-5 * np.max(np.abs(x @ weight))


# ------------------------------------------------------------------------------- kept dense, and why


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weight_with_nan_or_inf_stays_dense(bad: float, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 8, 8)
    weight = numpy_helper.to_array(case.model.graph.initializer[0]).copy()
    weight[2, 3] = bad
    case.model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
    result = rewrite(case.model, full_rank())
    (site,) = result.report.sites
    assert site.action == "kept" and "NaN" in site.reason and "Inf" in site.reason
    assert result.model.graph.node == case.model.graph.node
    assert result.model.graph.initializer == case.model.graph.initializer
    assert result.report.params_after == result.report.params_before == 64


def test_break_even_guard_keeps_the_layer_dense_unless_growth_is_allowed(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 12, 10)  # break-even rank ⌈120/22⌉ = 6
    kept = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 6)))
    (site,) = kept.report.sites
    assert site.action == "kept" and "break-even" in site.reason and site.params_after == 120
    assert op_types(kept.model) == ["MatMul"] and kept.model.graph.node[0].name == "mm"
    below = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 5)))
    assert below.report.sites[0].action == "factorized"
    grown = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 6, allow_growth=True)))
    assert grown.report.sites[0].action == "factorized" and grown.report.sites[0].params_after == 6 * 22
    staged = rewrite(case.model, RewriteConfig(stage_ranks=(4, 2)))
    assert staged.report.sites[0].action == "kept" and "break-even" in staged.report.sites[0].reason


def test_skips_are_reported_with_their_reasons_and_left_untouched(rng: np.random.Generator) -> None:
    weight = numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "W")
    batched = numpy_helper.from_array(rng.standard_normal((2, 5, 4)).astype(np.float32), "W3")
    nodes = [
        helper.make_node("MatMul", ["X", "Z"], ["H"], name="dynamic"),
        helper.make_node("MatMul", ["H", "W"], ["G"], name="dense"),
        helper.make_node("MatMul", ["G", "W3"], ["Y"], name="batched"),
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3, 7]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, [2, 7, 6]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, 4])],
        [weight, batched],
    )
    feeds = {
        "X": rng.standard_normal((2, 3, 7)).astype(np.float32),
        "Z": rng.standard_normal((2, 7, 6)).astype(np.float32),
    }
    case = Case(model, feeds, {})
    result = rewrite(model, full_rank())
    assert_reproduces(case, result.model)
    report = result.report.to_dict()
    assert [(s["name"], s["action"]) for s in report["sites"]] == [
        ("dynamic", "kept"),
        ("dense", "factorized"),
        ("batched", "kept"),
    ]
    assert "both operands are dynamic" in report["sites"][0]["reason"]
    assert "rank 3" in report["sites"][2]["reason"] and report["sites"][2]["params_before"] == 40
    names = [node.name for node in result.model.graph.node]
    assert "dynamic" in names and "batched" in names and "dense" not in names


# --------------------------------------------------------------------------------------- the output


def _metadata_model(rng: np.random.Generator) -> Case:
    case = matmul_case(rng, 32, 32, lead=(4,), opset=13)
    case.model.ir_version = 7
    onnx.helper.set_model_props(case.model, {"author": "tests", "licence": "MIT"})
    onnx.checker.check_model(case.model, full_check=True)
    return case


def test_output_model_is_valid_and_keeps_opset_ir_and_metadata(rng: np.random.Generator) -> None:
    case = _metadata_model(rng)
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("ratio", 0.5)))
    assert result.report.sites[0].action == "factorized"
    assert_valid(result.model)
    assert result.model.ir_version == 7
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", 13)]
    metadata = {prop.key: prop.value for prop in result.model.metadata_props}
    assert metadata["author"] == "tests" and metadata["licence"] == "MIT"
    assert metadata["onnxsvd.method"] == "svd"


def test_rewrite_is_deterministic_and_does_not_touch_its_input(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng, k=40, n=48)
    original = case.model.SerializeToString()
    snapshot = copy.deepcopy(case.model)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.4), stages=2)
    first = rewrite(case.model, config)
    second = rewrite(case.model, config)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert case.model.SerializeToString() == original and case.model == snapshot
    assert first.model is not case.model


def _taken_name_model(rng: np.random.Generator, where: str) -> Case:
    """``Y = X·W`` where the name the emitter would give the chain's hidden tensor, ``Y/svd_h``, is
    already taken: by a ``value_info`` entry of another type, or inside an If body (a local output,
    and a branch output that reads ``Y`` from the outer scope)."""
    case = matmul_case(rng, 12, 10, lead=(4,))
    graph = case.model.graph
    if where == "value_info":
        graph.value_info.append(helper.make_tensor_value_info("Y/svd_h", TensorProto.INT64, [7]))
    else:
        then_branch = helper.make_graph(
            [helper.make_node("Neg", ["Y"], ["Y/svd_h"], name="negate")],
            "then",
            [],
            [helper.make_tensor_value_info("Y/svd_h", TensorProto.FLOAT, [4, 10])],
        )
        else_branch = helper.make_graph(
            [helper.make_node("Identity", ["Y"], ["Y/svd_h_1"], name="keep")],
            "else",
            [],
            [helper.make_tensor_value_info("Y/svd_h_1", TensorProto.FLOAT, [4, 10])],
        )
        graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        graph.node.append(
            helper.make_node("If", ["flag"], ["Z"], name="branch", then_branch=then_branch, else_branch=else_branch)
        )
        graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [4, 10]))
        case.feeds["flag"] = np.array(True)
    onnx.checker.check_model(case.model, full_check=True)
    return case


@pytest.mark.parametrize("where", ["value_info", "if_body"])
def test_fresh_names_avoid_value_info_and_subgraph_names(where: str, rng: np.random.Generator) -> None:
    case = _taken_name_model(rng, where)
    result = rewrite(case.model, full_rank())
    assert result.report.sites[0].action == "factorized"
    nodes = result.model.graph.node
    (hidden,) = [node.output[0] for node in nodes if node.op_type == "MatMul" and node.output[0] != "Y"]
    taken = {"Y/svd_h"} if where == "value_info" else {"Y/svd_h", "Y/svd_h_1"}
    assert hidden not in taken
    assert_reproduces(case, result.model)


def test_report_fields(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng, k=40, n=48)
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("ratio", 0.5)))
    report = result.report.to_dict()
    assert report["params_before"] == 40 * 48
    rank = 8 * (int(0.5 * 40 * 48 / 88) // 8)  # ⌊0.5·1920/88⌋ = 10 → 8
    assert report["params_after"] == rank * (40 + 48) == len(_all_values(result.model))
    assert report["sites_factorized"] == 2 and report["sites_kept"] == 0
    for site in report["sites"]:
        assert {"name", "op_type", "shape", "action", "reason", "rank", "params_before", "params_after"} <= set(site)
        assert site["op_type"] == "MatMul" and site["shape"] == [40, 48] and site["action"] == "factorized"
        assert site["rank"] == rank and site["params_before"] == 1920 and site["params_after"] == rank * 88
        assert site["reason"].startswith("ratio 0.5")


def _all_values(model: onnx.ModelProto) -> np.ndarray:
    return np.concatenate([numpy_helper.to_array(t).ravel() for t in model.graph.initializer])


def test_shipped_models_at_full_rank_reproduce_their_outputs(shipped_model) -> None:
    model = onnx.load(str(shipped_model))
    result = rewrite(model, full_rank())
    factorized = result.report.factorized
    assert factorized and all(site.rank == min(site.shape) for site in factorized)
    images = np.load(shipped_model.parent / "digits_eval.npz")["input"][:64]
    case = Case(model, {"input": images}, {})
    assert_reproduces(case, result.model)


def test_shipped_models_at_half_ratio_shrink(shipped_model) -> None:
    model = onnx.load(str(shipped_model))
    result = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.5)))
    assert_valid(result.model)
    assert result.report.params_after < result.report.params_before
    stored = sum(int(np.prod(tensor.dims)) for tensor in result.model.graph.initializer)
    constants = sum(
        int(np.prod(node.attribute[0].t.dims)) for node in result.model.graph.node if node.op_type == "Constant"
    )
    assert result.report.params_after == stored + constants
    for site in result.report.factorized:
        assert site.params_after < site.params_before
    images = np.load(shipped_model.parent / "digits_eval.npz")["input"][:32]
    (logits,) = run(result.model, {"input": images})
    assert logits.shape == (32, 10) and np.all(np.isfinite(logits))
