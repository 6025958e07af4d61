"""Weights shared through chains: one factorization per stored weight, whatever the chains between.

Sharing is decided on the stored constant after following every chain (``Identity``, ``Transpose``,
``Cast``, ``Reshape``, ``DequantizeLinear``, ``Cast → Mul``): a rewrite never grows a model whose
weights serve many nodes, and ``inspect`` never counts more parameters in sites than the model holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.calibrate.stats import ActivationStats, Statistics
from onnxsvd.graph import GraphIndex, find_sites, load_weight
from onnxsvd.io import count_parameters, fingerprint
from onnxsvd.pipeline.group import group_statistics
from onnxsvd.pipeline.inspect import inspect_model
from tests.conftest import FULL_RANK
from tests.models import assert_valid, identity_shared_case, make_model, relative_error, run

FULL_RANK_TOLERANCE = 1e-4


def _value(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def test_uses_through_separate_identities_and_transposes_are_one_group_per_stored_weight(
    rng: np.random.Generator,
) -> None:
    case = identity_shared_case(rng, dim=16, layers=3)
    match = find_sites(case.model)
    assert len(match.sites) == 9 and not match.skips
    groups: dict[str, list[str]] = {}
    for site in match.sites:
        groups.setdefault(site.group, []).append(site.name)
    assert sorted(groups.values()) == [
        ["layer0/a", "layer1/a", "layer2/a"],
        ["layer0/b", "layer0/bt", "layer1/b", "layer1/bt", "layer2/b", "layer2/bt"],
    ]
    by_name = {site.name: site for site in match.sites}
    assert not by_name["layer1/b"].kn_transposed and by_name["layer1/bt"].kn_transposed
    index = GraphIndex(case.model.graph)
    for site in match.sites:
        np.testing.assert_array_equal(load_weight(index, site), case.weights[site.name])


def test_shared_weights_never_grow_the_model_and_full_rank_is_exact(rng: np.random.Generator, tmp_path: Path) -> None:
    case = identity_shared_case(rng, dim=48, layers=4)
    full = rewrite(case.model, RewriteConfig(policy=FULL_RANK))
    assert_valid(full.model)
    for expected, actual in zip(run(case.model, case.feeds), run(full.model, case.feeds), strict=True):
        assert relative_error(actual, expected) < FULL_RANK_TOLERANCE

    half = rewrite(case.model, RewriteConfig(policy=RankPolicy("ratio", 0.5)))
    assert_valid(half.model)
    report = half.report
    assert len(report.factorized) == 12
    rank = report.factorized[0].rank
    # Two factorizations (one per stored weight), each stored once: the transposed uses read them through
    # Transpose nodes, not copies.
    assert report.params_after == 2 * rank * (48 + 48) < report.params_before == 2 * 48 * 48
    assert report.bytes_after < report.bytes_before
    assert sum(node.op_type == "Transpose" for node in half.model.graph.node) == 2  # Aᵀ and Bᵀ of Wb, once
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(case.model, before)
    onnx.save(half.model, after)
    assert after.stat().st_size < before.stat().st_size


def test_inspect_counts_each_stored_weight_once(rng: np.random.Generator) -> None:
    case = identity_shared_case(rng, dim=32, layers=4)
    inspection = inspect_model(case.model)
    assert len(inspection.sites) == 12
    assert inspection.params_in_sites == inspection.params_total == count_parameters(case.model) == 2 * 32 * 32
    shared = {site.name: site.shared_with for site in inspection.sites}
    assert len(shared["layer0/a"]) == 3 and len(shared["layer0/b"]) == 7


def _stats(rng: np.random.Generator, channels: int, rows: int) -> ActivationStats:
    x = rng.standard_normal((rows, channels))  # [T, K]
    return ActivationStats(x.T @ x, np.abs(x).sum(axis=0), np.abs(x).max(axis=0), rows)


def test_statistics_of_a_shared_weight_sum_the_grams_of_its_distinct_uses(rng: np.random.Generator) -> None:
    case = identity_shared_case(rng, dim=8, layers=2)
    sites = {site.name: site for site in find_sites(case.model).sites}
    group = [sites[name] for name in ("layer0/b", "layer0/bt", "layer1/b", "layer1/bt")]
    parts = {site.statistics_key: _stats(rng, 8, 10 + i) for i, site in enumerate(sites.values())}
    statistics = Statistics(fingerprint(case.model), parts)
    combined = group_statistics(group, statistics)
    assert combined is not None
    # G = Σ XᵀX over the uses in the factorized orientation (layer0/b and layer1/b); the transposed uses'
    # inputs are in the other space and stay out.
    expected = parts[sites["layer0/b"].statistics_key].gram + parts[sites["layer1/b"].statistics_key].gram
    np.testing.assert_allclose(combined.gram, expected)
    assert combined.rows == parts[sites["layer0/b"].statistics_key].rows + parts[sites["layer1/b"].statistics_key].rows
    # A site listed twice (or two sites reading one activation) counts its activation once.
    again = group_statistics([group[0], group[0]], statistics)
    np.testing.assert_allclose(again.gram, parts[group[0].statistics_key].gram)


def test_whitened_rewrite_of_a_shared_weight_reports_which_uses_make_the_metric(rng: np.random.Generator) -> None:
    case = identity_shared_case(rng, dim=16, layers=2)
    sites = find_sites(case.model).sites
    parts = {site.statistics_key: _stats(rng, 16, 40) for site in sites}
    statistics = Statistics(fingerprint(case.model), parts)
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 4, align=1), method="whiten"), statistics)
    reasons = {site.name: site.reason for site in result.report.sites}
    assert "metric from the 2 use(s) reading the weight as [16, 16]" in reasons["layer0/bt"]
    assert "metric from" not in reasons["layer0/a"]
    assert_valid(result.model)


@pytest.mark.parametrize("layout", ["fused", "stages"])
def test_mirror_and_transposed_uses_share_factors_exactly(layout: str, rng: np.random.Generator) -> None:
    # W [K, N] read as X·W, as W·X (mirror), through Transpose (X·Wᵀ) and through Identity → Transpose as Gemm transB.
    k, n = 12, 7
    nodes = [
        helper.make_node("MatMul", ["X1", "W"], ["Y1"], name="plain"),
        helper.make_node("MatMul", ["W", "X2"], ["Y2"], name="mirror"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="t"),
        helper.make_node("MatMul", ["X3", "Wt"], ["Y3"], name="transposed"),
        helper.make_node("Identity", ["W"], ["Wi"], name="i"),
        helper.make_node("Gemm", ["X4", "Wi"], ["Y4"], name="gemm", transB=1),
        helper.make_node("MatMul", ["Wt", "X5"], ["Y5"], name="mirror_t"),
    ]
    shapes = {"1": ([3, k], [3, n]), "2": ([n, 4], [k, 4]), "3": ([3, n], [3, k]), "4": ([2, n], [2, k])}
    shapes["5"] = ([k, 2], [n, 2])
    inputs = [_value(f"X{i}", x) for i, (x, _) in shapes.items()]
    outputs = [_value(f"Y{i}", y) for i, (_, y) in shapes.items()]
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    model = make_model(nodes, inputs, outputs, [weight])
    feeds = {f"X{i}": rng.standard_normal(x).astype(np.float32) for i, (x, _) in shapes.items()}
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, layout=layout, stages=2))
    assert_valid(result.model)
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < FULL_RANK_TOLERANCE
    assert all(len(site.shared_with) == 4 for site in result.report.sites)
    factors = [t for t in result.model.graph.initializer if t.name.startswith("W.svd")]
    assert len(factors) == 2 * (1 if layout == "fused" else 2)
    assert count_parameters(result.model) == min(k, n) * (k + n)


def test_reshaped_constant_is_followed(rng: np.random.Generator) -> None:
    # A weight stored flat [K·N] and reshaped to [K, N], read by two MatMuls through their own Reshapes.
    k, n = 6, 10
    flat = rng.standard_normal(k * n).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["Wflat", "shape"], ["W1"], name="reshape1"),
        helper.make_node("Reshape", ["Wflat", "shape"], ["W2"], name="reshape2"),
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="first"),
        helper.make_node("Relu", ["H"], ["R"], name="relu"),
        helper.make_node("Reshape", ["R", "back"], ["R2"], name="dynamic_reshape"),
    ]
    model = make_model(
        nodes + [helper.make_node("MatMul", ["X", "W2"], ["Y"], name="second")],
        [_value("X", [3, k])],
        [_value("Y", [3, n]), _value("R2", [3 * n])],
        [
            numpy_helper.from_array(flat, "Wflat"),
            numpy_helper.from_array(np.array([k, -1], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "back"),
        ],
    )
    match = find_sites(model)
    assert [site.name for site in match.sites] == ["first", "second"] and not match.skips
    assert match.sites[0].group == match.sites[1].group
    np.testing.assert_array_equal(load_weight(GraphIndex(model.graph), match.sites[0]), flat.reshape(k, n))
    feeds = {"X": rng.standard_normal((3, k)).astype(np.float32)}
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert_valid(result.model)
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < FULL_RANK_TOLERANCE
    assert "dynamic_reshape" in {node.name for node in result.model.graph.node}


def test_calibrated_sequential_and_global_rewrites_of_shared_weights(rng: np.random.Generator) -> None:
    from onnxsvd.calibrate import calibrate
    from onnxsvd.pipeline.sequential import rewrite_sequential

    case = identity_shared_case(rng, dim=16, layers=2)
    x = rng.standard_normal((4, 5, 16)).astype(np.float32)

    def batches():
        return ({"X": x[i : i + 2]} for i in range(0, 4, 2))  # the model's batch is 2

    statistics = calibrate(case.model, batches)
    config = RewriteConfig(policy=RankPolicy("rank", 4, align=1), method="whiten")
    runs = {
        "one-shot": rewrite(case.model, config, statistics),
        "sequential": rewrite_sequential(case.model, config, batches),
        "global": rewrite(
            case.model, RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1), method="whiten", allocate="global"),
            statistics, batches=batches,
        ),
    }
    (reference,) = run(case.model, {"X": x[:2]})
    for label, result in runs.items():
        assert_valid(result.model)
        report = result.report
        assert report.params_after < report.params_before, label
        factorized = report.factorized
        assert len(factorized) == 6, label
        # Each stored weight's factors once, whatever the number of its uses.
        ranks = {site.name.split("/")[1].rstrip("t"): site.rank for site in factorized}
        assert report.params_after == sum(ranks.values()) * (16 + 16), label
        (output,) = run(result.model, {"X": x[:2]})
        assert output.shape == reference.shape and np.all(np.isfinite(output)), label
        reasons = {site.name: site.reason for site in factorized}
        assert "metric from the 2 use(s)" in reasons["layer1/bt"] and "metric from" not in reasons["layer1/a"], label


def test_chains_that_change_the_value_differently_are_never_one_group(rng: np.random.Generator) -> None:
    # One stored int8 tensor, dequantized three ways: per channel before a Transpose, the same after an
    # Identity (same value: one group), and with another scale (another value: its own group). A per-axis
    # dequantization after a Transpose is kept apart too (the signature records the orientation).
    k, n = 8, 6
    quantized = rng.integers(-100, 100, size=(k, n)).astype(np.int8)
    tensors = [
        numpy_helper.from_array(quantized, "Q"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, size=n).astype(np.float32), "s1"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, size=n).astype(np.float32), "s2"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, size=n).astype(np.float32), "s3"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["Q", "s1"], ["D1"], name="dq1", axis=1),
        helper.make_node("MatMul", ["X1", "D1"], ["Y1"], name="plain"),
        helper.make_node("Identity", ["Q"], ["Qi"], name="id"),
        helper.make_node("DequantizeLinear", ["Qi", "s1"], ["D2"], name="dq2", axis=1),
        helper.make_node("Transpose", ["D2"], ["D2t"], name="t2"),
        helper.make_node("MatMul", ["D2t", "X2"], ["Y2"], name="mirror_of_transpose"),  # W_kn = D2 again
        helper.make_node("DequantizeLinear", ["Q", "s2"], ["D3"], name="dq3", axis=1),
        helper.make_node("MatMul", ["X1", "D3"], ["Y3"], name="other_scale"),
        helper.make_node("Transpose", ["Q"], ["Qt"], name="t4"),
        helper.make_node("DequantizeLinear", ["Qt", "s3"], ["D4"], name="dq4", axis=0),
        helper.make_node("MatMul", ["X3", "D4"], ["Y4"], name="transposed_first"),
    ]
    inputs = [_value("X1", [3, k]), _value("X2", [k, 2]), _value("X3", [3, n])]
    outputs = [_value("Y1", [3, n]), _value("Y2", [n, 2]), _value("Y3", [3, n]), _value("Y4", [3, k])]
    model = make_model(nodes, inputs, outputs, tensors)
    sites = {site.name: site for site in find_sites(model).sites}
    assert sites["plain"].group == sites["mirror_of_transpose"].group
    assert not sites["plain"].kn_transposed and not sites["mirror_of_transpose"].kn_transposed
    assert len({sites[name].group for name in ("plain", "other_scale", "transposed_first")}) == 3
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert_valid(result.model)
    feeds = {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
             for v in inputs}
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < FULL_RANK_TOLERANCE


def test_uses_that_widen_a_weight_share_its_factors(rng: np.random.Generator) -> None:
    # An fp16 weight read as stored by an fp16 MatMul and, through Cast → fp32, by an fp32 one (mixed
    # precision). The values are equal: one factorization, stored once in fp16, cast for the fp32 use.
    k, n = 12, 10
    nodes = [
        helper.make_node("MatMul", ["X16", "W"], ["Y16"], name="half"),
        helper.make_node("Cast", ["W"], ["W32"], name="widen", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W32"], ["W32t"], name="t"),
        helper.make_node("MatMul", ["W32t", "X32"], ["Y32"], name="single"),  # the mirror: W_kn = W again
        helper.make_node("Cast", ["W"], ["W8"], name="narrow", to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("Cast", ["W8"], ["W8f"], name="back", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["X16", "W8f"], ["Y8"], name="rounded"),  # another value
    ]
    inputs = [_value("X16", [3, k], TensorProto.FLOAT16), _value("X32", [k, 2])]
    outputs = [_value("Y16", [3, n], TensorProto.FLOAT16), _value("Y32", [n, 2])]
    outputs.append(_value("Y8", [3, n], TensorProto.FLOAT16))
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float16), "W")
    model = make_model(nodes, inputs, outputs, [weight], opset=19, ir_version=9)
    sites = {site.name: site for site in find_sites(model).sites}
    assert sites["half"].group == sites["single"].group != sites["rounded"].group
    assert sites["single"].weight.compute_dtype == TensorProto.FLOAT
    result = rewrite(model, RewriteConfig(policy=FULL_RANK))
    assert_valid(result.model)
    factors = [t for t in result.model.graph.initializer if t.name.startswith("W.svd")]
    assert len(factors) == 4 and all(t.data_type == TensorProto.FLOAT16 for t in factors)
    feeds = {"X16": rng.standard_normal((3, k)).astype(np.float16)}
    feeds["X32"] = rng.standard_normal((k, 2)).astype(np.float32)
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert actual.dtype == expected.dtype
        assert relative_error(actual, expected) < 1e-2  # fp16 factors of an fp16 weight


def test_emitted_nodes_of_shared_factors_carry_records_and_finetune_trains_each_pair_once(
    rng: np.random.Generator,
) -> None:
    from onnxsvd.finetune.sites import find_factor_pairs
    from onnxsvd.graph.records import read_record

    case = identity_shared_case(rng, dim=16, layers=2)
    result = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 4, align=1)))
    original = {node.name for node in case.model.graph.node}
    emitted = [node for node in result.model.graph.node if node.name not in original]
    assert all(read_record(node) is not None for node in emitted)
    transposes = [node for node in emitted if node.op_type == "Transpose"]
    assert len(transposes) == 2 and {read_record(node).role for node in transposes} == {"transpose"}
    pairs, skips = find_factor_pairs(result.model)
    # One pair per stored weight, trained through its direct uses; the transposed uses read the same
    # initializers through Transpose nodes, so training the pair changes them too.
    assert sorted(pair.sites for pair in pairs) == [("layer0/a", "layer1/a"), ("layer0/b", "layer1/b")]
    assert sorted(skip.site for skip in skips) == ["layer0/bt", "layer1/bt"]
    assert all("reads the shared factor" in skip.reason and "trained with the chains" in skip.reason
               for skip in skips)
