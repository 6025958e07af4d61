"""Sites inside If/Loop/Scan bodies (``onnxsvd.graph.scopes``), and weight-only int8 stored back as int8.

Every model is built here with onnx.helper; each test checks the graph's structure, the numbers through ONNX
Runtime (exact at full rank on every branch, bounded at reduced rank) and ``check_model(full_check=True)``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RewriteConfig, rewrite
from onnxsvd.calibrate import calibrate
from onnxsvd.config import QuantizeConfig, RankPolicy
from onnxsvd.finetune.sites import find_factor_pairs
from onnxsvd.finetune.torch_graph import UnsupportedOpError, check_supported
from onnxsvd.graph import find_sites
from onnxsvd.graph.scopes import body_graphs
from onnxsvd.pipeline.group import DATA_FREE_REASON
from onnxsvd.pipeline.inspect import inspect_model
from onnxsvd.pipeline.sequential import rewrite_sequential
from onnxsvd.pipeline.speed import UNTIMED_IN_BODY, SiteSpeedCheck, SpeedCheckConfig
from onnxsvd.validate.profile import site_flops
from tests.conftest import FULL_RANK
from tests.models import assert_valid, make_model, relative_error, run

F = TensorProto.FLOAT
#: Reduced rank on tiny layers: the default floor would keep them dense.
LOW_RANK = RankPolicy("rank", 4, align=1, min_rank=1)


def _value(name: str, shape: list[int | None] | None, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for _, body in body_graphs(node):
            found.extend(_graphs(body))
    return found


def _initializers(model: onnx.ModelProto) -> dict[str, str]:
    """Every initializer of every scope → the name of the graph holding it."""
    return {tensor.name: graph.name for graph in _graphs(model.graph) for tensor in graph.initializer}


def _if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """``H = X·Wmain``; ``Y = If(flag)``: then ``Gemm(X, Wbody, transB) → MatMul(·, Wout)``, else
    ``MatMul(X, Wout)``; ``Z = Y·Wout``. ``Wout`` is an outer weight read in both branches and the main graph;
    ``Wbody`` an initializer of the then branch."""
    then_branch = helper.make_graph(
        [
            helper.make_node("Gemm", ["X", "Wbody"], ["t"], name="cell", transB=1),
            helper.make_node("MatMul", ["t", "Wout"], ["then_out"], name="proj"),
        ],
        "then", [], [_value("then_out", [2, 16])], [_weight(rng, "Wbody", (16, 16))],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wout2"], ["else_out"], name="cell")],
        "else", [], [_value("else_out", [2, 16])],
    )
    return make_model(
        [
            helper.make_node("MatMul", ["X", "Wmain"], ["H"], name="pre"),
            helper.make_node("Identity", ["Wout"], ["Wout2"], name="alias"),
            helper.make_node("If", ["flag"], ["Y"], name="gate", then_branch=then_branch, else_branch=else_branch),
            helper.make_node("MatMul", ["Y", "Wout"], ["Z"], name="post"),
        ],
        [_value("X", [2, 16]), _value("flag", [], TensorProto.BOOL)],
        [_value("Z", [2, 16]), _value("H", [2, 16])],
        [_weight(rng, "Wout", (16, 16)), _weight(rng, "Wmain", (16, 16))],
    )


def _both_branches(rng: np.random.Generator, original: onnx.ModelProto, rewritten: onnx.ModelProto) -> list[float]:
    x = rng.standard_normal((2, 16)).astype(np.float32)
    errors = []
    for flag in (True, False):
        feeds = {"X": x, "flag": np.array(flag)}
        for expected, actual in zip(run(original, feeds), run(rewritten, feeds), strict=True):
            errors.append(relative_error(actual, expected))
    return errors


def test_if_sites_are_found_with_their_scope_and_unique_names(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    match = find_sites(model)
    assert not match.skips
    assert [(site.name, site.scope) for site in match.sites] == [
        ("pre", ""), ("post", ""),
        ("gate/else_branch/cell", "gate/else_branch"),
        ("gate/then_branch/cell", "gate/then_branch"),
        ("gate/then_branch/proj", "gate/then_branch"),
    ]
    names = [site.name for site in match.sites]
    assert len(set(names)) == len(names)  # both branches name their node "cell"
    sites = {site.name: site for site in match.sites}
    # One stored weight through an Identity in the main graph, read in both branches and the main graph.
    assert sites["post"].group == sites["gate/else_branch/cell"].group == sites["gate/then_branch/proj"].group
    assert sites["gate/then_branch/cell"].weight.tensor == "Wbody" and sites["gate/then_branch/cell"].transpose_weight
    inspection = inspect_model(model)
    assert [(site.name, site.scope) for site in inspection.sites] == [(s.name, s.scope) for s in match.sites]
    assert inspection.params_in_sites == 3 * 16 * 16  # Wout counted once


def test_a_main_graph_name_like_a_scoped_path_keeps_names_unique(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    model.graph.node[0].name = "gate/then_branch/cell"  # the main MatMul named like the Gemm in the branch
    names = [site.name for site in find_sites(model).sites]
    assert names[0] == "gate/then_branch/cell" and "gate/then_branch/cell#2" in names
    assert len(set(names)) == len(names)


def test_if_full_rank_is_exact_on_both_branches_and_shares_one_factorization(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert all(site.action == "factorized" for site in result.report.sites)
    assert {site.name: site.scope for site in result.report.sites}["gate/then_branch/proj"] == "gate/then_branch"
    assert_valid(result.model)
    assert max(_both_branches(rng, model, result.model)) < 1e-5
    homes = _initializers(result.model)
    # Wout's factors once, in the main graph where Wout was; Wbody's in the then branch; no dense weight left.
    assert sorted(name for name in homes if name.startswith("Wout")) == ["Wout.svd_a", "Wout.svd_b"]
    assert homes["Wout.svd_a"] == "test_graph" and homes["Wbody.svd_a"] == "then"
    assert not {"Wout", "Wbody", "Wmain"} & set(homes)
    assert "alias" not in [node.name for node in result.model.graph.node]  # the dead Identity is swept
    (if_node,) = [node for node in result.model.graph.node if node.op_type == "If"]
    then_branch = next(body for label, body in body_graphs(if_node) if label == "then_branch")
    assert [node.op_type for node in then_branch.node] == ["Gemm", "Gemm", "MatMul", "MatMul"]


def test_if_reduced_rank_shrinks_bytes_and_stays_close(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    result = rewrite(model, RewriteConfig(policy=LOW_RANK))
    report = result.report
    assert [site.rank for site in report.sites] == [4] * 5
    assert report.bytes_after < report.bytes_before
    assert report.bytes_before == 4 * 3 * 16 * 16  # Wmain, Wout and the then branch's Wbody, fp32
    assert report.bytes_after == 4 * (4 * 32 * 3)  # each at rank 4, Wout's factors once
    assert_valid(result.model)
    assert max(_both_branches(rng, model, result.model)) < 1.5  # random weights: bounded, not exact


def test_flops_find_the_chains_inside_bodies(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    rewritten = rewrite(model, RewriteConfig(policy=LOW_RANK, exclude="^gate/else_branch/")).model
    flops = site_flops(model, rewritten)
    # Inferred from the rewritten model's names in every scope: the else branch's MatMul stays, and so do the
    # two others reading its weight Wout; the chains are found by name inside the then branch.
    assert flops.source == "inferred"
    assert {cost.name: cost.flops_per_row_after for cost in flops.sites} == {
        "pre": 2 * 4 * 32, "gate/then_branch/cell": 2 * 4 * 32,
    }


def _loop_scan_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A Loop whose body reads an outer weight in a MatMul and holds a nested If with a MatMul on a
    Constant of the loop body (then) and on the outer weight (else); a Scan whose body has its own weight."""
    constant = helper.make_node("Constant", [], ["Wconst"], name="wconst",
                                value=_weight(rng, "Wconst_value", (16, 16)))
    inner_if = helper.make_node(
        "If", ["cond_in"], ["branch_out"], name="gate",
        then_branch=helper.make_graph(
            [helper.make_node("MatMul", ["next", "Wconst"], ["deep"], name="deep_mm")], "inner_then", [],
            [_value("deep", [2, 16])],
        ),
        else_branch=helper.make_graph(
            [helper.make_node("MatMul", ["next", "Wloop"], ["other"], name="deep_mm")], "inner_else", [],
            [_value("other", [2, 16])],
        ),
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state", "Wloop"], ["next"], name="step"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
            constant,
            inner_if,
        ],
        "body",
        [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("state", [2, 16])],
        [_value("cond_out", [], TensorProto.BOOL), _value("next", [2, 16]), _value("branch_out", [2, 16])],
    )
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "Wscan"], ["scanned"], name="project")],
        "scan_body", [_value("row", [1, 16])], [_value("scanned", [1, 16])], [_weight(rng, "Wscan", (16, 16))],
    )
    return make_model(
        [
            helper.make_node("Loop", ["trips", "cond", "S0"], ["S", "outs"], name="loop", body=loop_body),
            helper.make_node("Scan", ["rows"], ["scanned_all"], name="scan", body=scan_body, num_scan_inputs=1),
        ],
        [_value("trips", [], TensorProto.INT64), _value("cond", [], TensorProto.BOOL), _value("S0", [2, 16]),
         _value("rows", [5, 1, 16])],
        [_value("S", [2, 16]), _value("outs", [None, 2, 16]), _value("scanned_all", [5, 1, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "Wloop")],
    )


def _loop_feeds(rng: np.random.Generator, cond: bool) -> dict[str, np.ndarray]:
    return {
        "trips": np.array(3, np.int64), "cond": np.array(cond), "S0": rng.standard_normal((2, 16)).astype(np.float32),
        "rows": rng.standard_normal((5, 1, 16)).astype(np.float32),
    }


def test_loop_scan_and_an_if_nested_in_a_loop_full_rank_is_exact(rng: np.random.Generator) -> None:
    model = _loop_scan_model(rng)
    match = find_sites(model)
    assert not match.skips
    assert [(site.name, site.scope) for site in match.sites] == [
        ("loop/body/step", "loop/body"),
        ("loop/body/gate/else_branch/deep_mm", "loop/body/gate/else_branch"),
        ("loop/body/gate/then_branch/deep_mm", "loop/body/gate/then_branch"),
        ("scan/body/project", "scan/body"),
    ]
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert [site.action for site in result.report.sites] == ["factorized"] * 4
    assert_valid(result.model)
    homes = _initializers(result.model)
    assert homes["Wloop.svd_a"] == "test_graph" and homes["Wscan.svd_a"] == "scan_body"
    assert homes["Wconst.svd_a"] == "body"  # where the Constant was; the Constant itself is gone
    assert not {"Wloop", "Wscan"} & set(homes)
    loop_body = result.model.graph.node[0].attribute[0].g
    assert "Constant" not in [node.op_type for node in loop_body.node]
    for cond in (True, False):  # the Loop runs three trips; the nested If takes the branch of `cond`
        feeds = _loop_feeds(rng, cond)
        for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
            assert relative_error(actual, expected) < 1e-5
    low = rewrite(model, RewriteConfig(policy=LOW_RANK))
    assert low.report.bytes_after < low.report.bytes_before
    assert_valid(low.model)


def test_outer_weight_read_by_a_dense_body_node_stays_with_its_sites(rng: np.random.Generator) -> None:
    # W feeds a main MatMul and a MatMul in the then branch, but the else branch negates it: it must stay,
    # so neither MatMul is factorized (their factors would add to the dense copy), and the reason says why.
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["then_out"], name="inner")], "then", [], [_value("then_out", [16, 16])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["W"], ["else_out"], name="negate")], "else", [], [_value("else_out", [16, 16])]
    )
    model = make_model(
        [
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
            helper.make_node("If", ["flag"], ["Z"], name="branch", then_branch=then_branch, else_branch=else_branch),
        ],
        [_value("X", [16, 16]), _value("flag", [], TensorProto.BOOL)],
        [_value("Y", [16, 16]), _value("Z", [16, 16])],
        [_weight(rng, "W", (16, 16))],
    )
    match = find_sites(model)
    assert not match.sites
    reasons = {skip.name: skip.reason for skip in match.skips}
    assert "Neg node 'branch/else_branch/negate' inside If node 'branch'" in reasons["mm"]
    assert "keeps the dense copy" in reasons["branch/then_branch/inner"]
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert "W" in _initializers(result.model) and not result.report.factorized


def test_whiten_and_sequential_factorize_body_sites_data_free_and_say_so(rng: np.random.Generator) -> None:
    model = _if_model(rng)
    x = rng.standard_normal((16, 2, 16)).astype(np.float32)

    def batches():
        return ({"X": x[i], "flag": np.array(i % 2 == 0)} for i in range(len(x)))

    statistics = calibrate(model, batches)
    assert set(statistics.activations) == {"X", "Y"}  # the main-graph sites' inputs; a body's cannot be exposed
    config = RewriteConfig(policy=LOW_RANK, method="whiten")
    report = rewrite(model, config, statistics).report
    by_name = {site.name: site for site in report.sites}
    reason = DATA_FREE_REASON.format(method="--method whiten")
    assert by_name["gate/then_branch/cell"].data_free == reason and reason in by_name["gate/then_branch/cell"].reason
    assert by_name["pre"].data_free is None
    # Wout's group has a main-graph use: its metric comes from that use, and the report says the body uses
    # share the factors without statistics.
    assert by_name["post"].data_free is None and "inside If/Loop/Scan bodies share" in by_name["post"].reason
    sequential = rewrite_sequential(model, config, batches)
    by_name = {site.name: site for site in sequential.report.sites}
    assert by_name["gate/then_branch/cell"].action == "factorized"
    assert by_name["gate/then_branch/cell"].data_free == DATA_FREE_REASON.format(method="--method whiten --sequential")
    assert_valid(sequential.model)


def test_finetune_lists_body_chains_as_not_trained(rng: np.random.Generator) -> None:
    rewritten = rewrite(_if_model(rng), RewriteConfig(policy=LOW_RANK)).model
    pairs, skips = find_factor_pairs(rewritten)
    assert [pair.sites for pair in pairs] == [("pre",)]  # Wout's factors are read inside the If too
    reasons = {skip.site: skip.reason for skip in skips}
    assert "finetune trains no factors inside bodies" in reasons["gate/then_branch/cell"]
    assert "shared with a chain inside an If/Loop/Scan body" in reasons["post"]
    # finetune refuses a model with control flow, in one line
    with pytest.raises(UnsupportedOpError, match="op 'If' .node 'gate'. is not supported"):
        check_supported(rewritten)


def test_speed_check_and_quantize_leave_body_sites_with_their_reason(rng: np.random.Generator) -> None:
    model = _loop_scan_model(rng)
    check = SiteSpeedCheck(SpeedCheckConfig(), batch=_loop_feeds(rng, True))
    report = rewrite(model, RewriteConfig(policy=LOW_RANK), speed_check=check).report
    assert [site.action for site in report.sites] == ["factorized"] * 4
    assert all(UNTIMED_IN_BODY in site.reason for site in report.sites)
    quantized = rewrite(_if_model(rng), RewriteConfig(policy=LOW_RANK, quantize=QuantizeConfig(block_size=16)))
    by_name = {site.name: site for site in quantized.report.sites}
    assert len(by_name) == 5 and by_name["pre"].action == "factorized"
    assert "--quantize does not emit quantized bases inside" in by_name["gate/then_branch/cell"].reason
    assert "shares its weight with a site inside a body" in by_name["post"].reason
    assert_valid(quantized.model)


def _int8_model(rng: np.random.Generator, k: int = 256, n: int = 192) -> onnx.ModelProto:
    """``Y = X · (Cast(W_q) · scale)`` with a per-column scale: weight-only int8 as quantizers write it."""
    quantized = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.005, 0.05, size=(n,)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Cast", ["W_q"], ["W_f"], name="cast", to=F),
            helper.make_node("Mul", ["W_f", "scale"], ["W"], name="scale_op"),
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
        ],
        [_value("X", [4, k])], [_value("Y", [4, n])],
        [numpy_helper.from_array(quantized, "W_q"), numpy_helper.from_array(scale, "scale")],
    )


def test_weight_only_int8_is_stored_back_as_int8(rng: np.random.Generator, tmp_path) -> None:
    model = _int8_model(rng)
    result = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 64, align=1)))
    (site,) = result.report.sites
    assert site.action == "factorized" and site.factor_dtype == "int8" and "int8 factors" in site.reason
    assert site.factor_bytes == 64 * (256 + 192) + 4 * 2 * 64  # int8 payload plus fp32 scales per component
    assert_valid(result.model)
    types = {tensor.name: tensor.data_type for tensor in result.model.graph.initializer}
    assert types == {"W_q.svd_a": TensorProto.INT8, "W_q.svd_b": TensorProto.INT8,
                     "W_q.svd_a_scale": F, "W_q.svd_b_scale": F}
    # Smaller on disk than the original (fp32 factors at this rank would be larger: 64·448·4 > 256·192 + 768).
    original, rewritten = tmp_path / "int8.onnx", tmp_path / "small.onnx"
    onnx.save(model, original)
    onnx.save(result.model, rewritten)
    assert os.path.getsize(rewritten) < os.path.getsize(original)
    feeds = {"X": rng.standard_normal((4, 256)).astype(np.float32)}
    (expected,), (actual,) = run(model, feeds), run(result.model, feeds)
    assert relative_error(actual, expected) < 0.95  # rank 64 of 192: lossy, bounded
    full = rewrite(model, RewriteConfig(policy=FULL_RANK))
    (expected,), (actual,) = run(model, feeds), run(full.model, feeds)
    assert relative_error(actual, expected) < 0.02  # full rank through int8 factors: their rounding only
    floats = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 64, align=1), dtype="fp32"))
    (site,) = floats.report.sites
    assert site.action == "kept" and "fp32 factors" in site.reason  # an explicit --dtype wins


@pytest.mark.parametrize("layout", ["fused", "stages"])
def test_int8_factors_shared_and_transposed_uses_run(rng: np.random.Generator, layout: str) -> None:
    # One int8 weight read as X·W and, through a Transpose, as W·X2: the factors are stored once as int8.
    base = _int8_model(rng, 32, 32)
    nodes = list(base.graph.node) + [
        helper.make_node("Transpose", ["W"], ["Wt"], name="flip"),
        helper.make_node("MatMul", ["X2", "Wt"], ["Y2"], name="mm_t"),
    ]
    inputs, outputs = [_value("X", [4, 32]), _value("X2", [4, 32])], [_value("Y", [4, 32]), _value("Y2", [4, 32])]
    model = make_model(nodes, inputs, outputs, list(base.graph.initializer))
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, layout=layout, stages=2 if layout == "stages" else 1))
    assert [site.factor_dtype for site in result.report.sites] == ["int8", "int8"]
    assert_valid(result.model)
    int8 = [t.name for t in result.model.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(int8) == (2 if layout == "fused" else 4)
    feeds = {name: rng.standard_normal((4, 32)).astype(np.float32) for name in ("X", "X2")}
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < 0.02
