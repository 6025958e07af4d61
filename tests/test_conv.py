"""Conv sites: matching, both factor forms, full-rank exactness through ONNX Runtime, skips with reasons."""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.graph import find_sites
from onnxsvd.graph.records import read_record
from tests.conftest import FULL_RANK
from tests.models import assert_valid, relative_error, run

#: Relative error allowed at full rank with fp32 factors.
FULL_RANK_TOLERANCE = 1e-4


def conv_model(
    rng: np.random.Generator,
    kernel: tuple[int, ...] = (3, 3),
    channels: int = 4,
    filters: int = 6,
    size: int = 9,
    bias: bool = True,
    group: int = 1,
    batch: int = 2,
    **attrs,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One Conv with a constant weight (and bias), its input of ``size`` along every spatial axis."""
    dims = len(kernel)
    weight = rng.standard_normal((filters, channels // group, *kernel)).astype(np.float32)
    tensors = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        tensors.append(numpy_helper.from_array(rng.standard_normal(filters).astype(np.float32), "b"))
        inputs.append("b")
    if group != 1:
        attrs["group"] = group
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels] + [size] * dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, filters] + [None] * dims)], tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": rng.standard_normal((batch, channels) + (size,) * dims).astype(np.float32)}
    return model, feeds


def assert_reproduces(model: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    assert_valid(rewritten)
    (expected,), (actual,) = run(model, feeds), run(rewritten, feeds)
    assert relative_error(actual, expected) < FULL_RANK_TOLERANCE


ATTRIBUTES = [
    {},
    {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER"},
    {"auto_pad": "VALID", "strides": [1, 2]},
]


@pytest.mark.parametrize("form", ["channel", "spatial"])
@pytest.mark.parametrize("attrs", ATTRIBUTES, ids=lambda a: ",".join(a) or "plain")
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_2d_conv_reproduces_the_model(form: str, attrs: dict, bias: bool, rng: np.random.Generator) -> None:
    model, feeds = conv_model(rng, bias=bias, **attrs)
    (site,) = find_sites(model, RewriteConfig(conv=form)).sites
    assert site.conv is not None and site.conv.form == form
    assert site.shape == ((4 * 9, 6) if form == "channel" else (4 * 3, 3 * 6))
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, conv=form))
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    first, second = result.model.graph.node
    assert len(second.input) == (3 if bias else 2) and len(first.input) == 2  # the bias on the last Conv
    assert_reproduces(model, result.model, feeds)
    (report,) = result.report.sites
    assert report.action == "factorized" and report.conv_form == form


@pytest.mark.parametrize(
    ("kernel", "attrs"),
    [
        ((3,), {}),
        ((5,), {"strides": [2], "pads": [2, 1], "dilations": [2]}),
        ((1,), {}),
        ((3, 3, 3), {"strides": [1, 2, 1], "pads": [1, 1, 0, 0, 1, 1]}),
        ((2, 3, 1), {"auto_pad": "SAME_UPPER"}),
        ((1, 1), {"strides": [2, 2]}),
    ],
)
def test_full_rank_1d_3d_and_pointwise_convs_reproduce_the_model(
    kernel: tuple[int, ...], attrs: dict, rng: np.random.Generator
) -> None:
    model, feeds = conv_model(rng, kernel=kernel, size=7, **attrs)
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, conv="spatial"))  # no spatial form: channel
    first, second = result.model.graph.node
    assert (first.op_type, second.op_type) == ("Conv", "Conv")
    assert [a.ints for a in second.attribute if a.name == "kernel_shape"] == [[1] * len(kernel)]
    assert_reproduces(model, result.model, feeds)
    (report,) = result.report.sites
    assert "channel form" in " ".join(report.notes)


def test_records_name_the_conv_factors(rng: np.random.Generator) -> None:
    model, _ = conv_model(rng)
    rewritten = rewrite(model, RewriteConfig(policy=FULL_RANK)).model
    first, second = (read_record(node) for node in rewritten.graph.node)
    assert first is not None and second is not None
    assert (first.role, second.role, first.site, first.rank) == ("first", "second", "conv", 6)
    shapes = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    assert shapes[first.factor_a] == (6, 4, 3, 3) and shapes[first.factor_b] == (6, 6, 1, 1)


def test_low_rank_conv_reduces_parameters_and_bytes(rng: np.random.Generator, tmp_path) -> None:
    model, feeds = conv_model(rng, channels=16, filters=32, kernel=(3, 3))
    policy = RankPolicy("ratio", 0.25, align=1, min_rank=1)
    for form in ("channel", "spatial"):
        result = rewrite(model, RewriteConfig(policy=policy, conv=form))
        assert_valid(result.model)
        (site,) = result.report.sites
        assert site.action == "factorized" and site.rank < min(site.shape)
        assert site.flops_after < site.flops_before
        assert result.report.params_after < result.report.params_before
        original, small = tmp_path / "a.onnx", tmp_path / f"{form}.onnx"
        onnx.save(model, original)
        onnx.save(result.model, small)
        assert small.stat().st_size < original.stat().st_size
        (expected,), (actual,) = run(model, feeds), run(result.model, feeds)
        assert 0.0 < relative_error(actual, expected) < 1.0


def test_conv_skips_carry_their_reasons(rng: np.random.Generator) -> None:
    grouped, _ = conv_model(rng, channels=4, filters=6, group=2)
    (skip,) = find_sites(grouped).skips
    assert skip.op_type == "Conv" and "grouped Conv (group=2)" in skip.reason and skip.params == 6 * 2 * 9
    depthwise, _ = conv_model(rng, channels=4, filters=4, group=4)
    (skip,) = find_sites(depthwise).skips
    assert "depthwise Conv" in skip.reason
    dynamic = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn")], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
    ), opset_imports=[helper.make_opsetid("", 17)])
    (skip,) = find_sites(dynamic).skips
    assert skip.reason == "the Conv weight is dynamic (no constant weight)"


@functools.lru_cache(maxsize=1)
def spec_conv_cases() -> list[tuple[str, onnx.NodeProto, list[np.ndarray], np.ndarray]]:
    """ONNX's own Conv node test cases (``onnx.backend.test.case.node.conv``): ``(name, node, inputs,
    expected output)``, captured from the spec's ``export*`` functions (the wheel ships no data folders)."""
    from onnx.backend.test.case.node import conv as spec

    cases = []

    def capture(node: onnx.NodeProto, inputs: list, outputs: list, name: str, **_: Any) -> None:
        cases.append((name, node, [np.asarray(x) for x in inputs], np.asarray(outputs[0])))

    original = spec.expect
    spec.expect = capture
    try:
        for attribute in dir(spec.Conv):
            if attribute.startswith("export"):
                getattr(spec.Conv, attribute)()
    finally:
        spec.expect = original
    return cases


def _constant_weight_model(node: onnx.NodeProto, inputs: list[np.ndarray], expected: np.ndarray) -> onnx.ModelProto:
    """The case's node with its weight (and bias) as initializers; the first input stays the graph's."""
    constants = [numpy_helper.from_array(array.astype(np.float32), name)
                 for name, array in zip(node.input[1:], inputs[1:], strict=True) if name]
    graph = helper.make_graph(
        [copy.deepcopy(node)], "spec_conv",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, list(inputs[0].shape))],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, list(expected.shape))], constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_conv_node_cases_at_full_rank_reproduce_the_reference() -> None:
    cases = spec_conv_cases()
    assert len(cases) >= 5, [name for name, *_ in cases]
    for name, node, inputs, expected in cases:
        model = _constant_weight_model(node, inputs, expected)
        onnx.checker.check_model(model, full_check=True)
        for form in ("channel", "spatial"):
            result = rewrite(model, RewriteConfig(policy=FULL_RANK, conv=form))
            assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"], name
            assert_valid(result.model)
            (actual,) = run(result.model, {node.input[0]: inputs[0].astype(np.float32)})
            assert actual.shape == expected.shape, name
            assert relative_error(actual, expected) < FULL_RANK_TOLERANCE, (name, form)


def frobenius_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``‖Y' − Y‖_F / ‖Y‖_F``: on the calibration data, the error in the data metric."""
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def correlated_images(rng: np.random.Generator, mixing: np.ndarray, batch: int, size: int) -> np.ndarray:
    """Images ``[B, C, S, S]`` whose channels mix two latent maps (``mixing`` ``[C, 2]``), with a little noise:
    their 3×3 patches span about 18 of their ``9·C`` dimensions."""
    latent = rng.standard_normal((batch, 2, size, size))
    images = np.einsum("cl,blhw->bchw", mixing, latent)
    return (images + 0.01 * rng.standard_normal(images.shape)).astype(np.float32)


def test_patch_statistics_match_the_conv_and_whiten_beats_svd(rng: np.random.Generator) -> None:
    from onnxsvd.calibrate import CalibrateConfig, calibrate

    model, _ = conv_model(rng, channels=8, filters=16, size=10, batch=4, pads=[1, 1, 1, 1])
    mixing = rng.standard_normal((8, 2))
    batches = [{"x": correlated_images(rng, mixing, 4, 10)} for _ in range(3)]
    statistics = calibrate(model, lambda: iter(batches), CalibrateConfig(patch_rows=None))
    (site,) = find_sites(model).sites
    stats = statistics.activations[site.statistics_key]
    assert stats.gram.shape == (8 * 9, 8 * 9) and stats.rows == 3 * 4 * 10 * 10 and not stats.sampled
    policy = RankPolicy("rank", 12, align=1, min_rank=1)  # under break-even (13), under the data's 18 dimensions
    errors = {}
    for method in ("svd", "whiten"):
        result = rewrite(model, RewriteConfig(policy=policy, method=method), statistics=statistics)
        assert_valid(result.model)
        errors[method] = max(frobenius_error(run(result.model, feeds)[0], run(model, feeds)[0]) for feeds in batches)
    assert errors["whiten"] < 0.6 * errors["svd"], errors

    sampled = calibrate(model, lambda: iter(batches), CalibrateConfig(patch_rows=50, seed=3))
    stats = sampled.activations[site.statistics_key]
    assert (stats.rows, stats.positions) == (150, 1200) and stats.sampled
    again = calibrate(model, lambda: iter(batches), CalibrateConfig(patch_rows=50, seed=3))
    np.testing.assert_array_equal(again.activations[site.statistics_key].gram, stats.gram)  # seeded
    result = rewrite(model, RewriteConfig(policy=policy, method="whiten"), statistics=sampled)
    (report,) = result.report.sites
    assert any("from 150 of 1,200 positions" in note for note in report.notes)


def separable_kernel_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A 3×3 Conv whose kernel is a sum of two separable ones, ``w[n, c, i, j] = Σ_t u_t[c, i]·v_t[j, n]``:
    rank 2 in the spatial form, about full rank in the channel form."""
    channels, filters = 6, 8
    u = rng.standard_normal((2, channels, 3))
    v = rng.standard_normal((2, 3, filters))
    weight = np.einsum("tci,tjn->ncij", u, v).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="separable", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "separable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, filters, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_auto_picks_the_form_with_the_smaller_error(rng: np.random.Generator) -> None:
    separable = separable_kernel_model(rng)
    feeds = {"x": rng.standard_normal((2, 6, 8, 8)).astype(np.float32)}
    policy = RankPolicy("ratio", 0.5, align=1, min_rank=1)
    result = rewrite(separable, RewriteConfig(policy=policy, conv="auto"))
    (report,) = result.report.sites
    assert report.conv_form == "spatial" and any("--conv auto: spatial form" in note for note in report.notes)
    assert_valid(result.model)
    assert relative_error(run(result.model, feeds)[0], run(separable, feeds)[0]) < 1e-4  # rank 2 ≤ its rank
    generic, _ = conv_model(rng, channels=6, filters=8)
    filters = rng.standard_normal((8, 1)) @ rng.standard_normal((1, 6 * 9))  # rank 1 in the channel form
    generic.graph.initializer[0].CopyFrom(numpy_helper.from_array(filters.reshape(8, 6, 3, 3).astype(np.float32), "w"))
    result = rewrite(generic, RewriteConfig(policy=policy, conv="auto"))
    (report,) = result.report.sites
    assert report.conv_form == "channel" and any("--conv auto: channel form" in note for note in report.notes)


def two_conv_model(rng: np.random.Generator, channels: int = 8, width: int = 16) -> onnx.ModelProto:
    """Conv 3×3 (``channels`` → ``width``) → Relu → Conv 3×3 (``width`` → ``width``), padded."""
    scaled = [rng.standard_normal((width, c, 3, 3)) / (3.0 * np.sqrt(c)) for c in (channels, width)]
    weights = [weight.astype(np.float32) for weight in scaled]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width, 10, 10])],
        [numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(weights)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_sequential_whiten_on_conv_sites_beats_one_shot_svd(rng: np.random.Generator) -> None:
    from onnxsvd import rewrite_sequential

    model = two_conv_model(rng)
    mixing = rng.standard_normal((8, 2))
    batches = [{"x": correlated_images(rng, mixing, 4, 10)} for _ in range(3)]
    policy = RankPolicy("rank", 10, align=1, min_rank=1)
    config = RewriteConfig(policy=policy, method="whiten")
    sequential = rewrite_sequential(model, config, lambda: iter(batches))
    assert [site.action for site in sequential.report.sites] == ["factorized", "factorized"]
    assert_valid(sequential.model)
    plain = rewrite(model, RewriteConfig(policy=policy))
    errors = {
        name: max(frobenius_error(run(result.model, feeds)[0], run(model, feeds)[0]) for feeds in batches)
        for name, result in (("sequential", sequential), ("svd", plain))
    }
    assert errors["sequential"] < 0.8 * errors["svd"], errors


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_keep_dense_if_slower_times_conv_chains(form: str, rng: np.random.Generator) -> None:
    from onnxsvd.pipeline.speed import SiteSpeedCheck, SpeedCheckConfig, site_models

    model, feeds = conv_model(rng, channels=16, filters=32, size=12, strides=[2, 1], pads=[1, 1, 1, 1])
    check = SiteSpeedCheck(SpeedCheckConfig(input_shapes={"x": feeds["x"].shape}, warmup=1, iters=3, threads=1))
    policy = RankPolicy("ratio", 0.25, align=1, min_rank=1)
    result = rewrite(model, RewriteConfig(policy=policy, conv=form), speed_check=check)
    (report,) = result.report.sites
    assert report.dense_ms is not None and report.factorized_ms is not None and report.speed_provider == "cpu"
    assert report.action in ("factorized", "kept")  # which one is the machine's, not the test's, to say
    # The two timed models compute the same layer: the chain timed is the chain that would be written.
    (site,) = find_sites(model, RewriteConfig(conv=form)).sites
    from onnxsvd.factorize import decompose, truncate
    from onnxsvd.graph import GraphIndex, load_weight

    weight = load_weight(GraphIndex(model.graph), site)
    full = truncate(decompose(weight), [min(weight.shape)], np.float32)
    dense, factorized = site_models(site, model.graph.node[0], weight, np.zeros(32), feeds["x"].shape, full,
                                    TensorProto.FLOAT)
    assert [n.op_type for n in factorized.graph.node] == ["Conv", "Conv"]
    assert relative_error(run(factorized, feeds)[0], run(dense, feeds)[0]) < FULL_RANK_TOLERANCE


def test_inspect_lists_conv_sites_and_skips(rng: np.random.Generator) -> None:
    from onnxsvd.pipeline.inspect import inspect_model

    model = two_conv_model(rng)
    depthwise = helper.make_node("Conv", ["y", "dw"], ["z"], name="depthwise", group=16, pads=[1, 1, 1, 1])
    model.graph.node.append(depthwise)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "dw"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 16, 10, 10]))
    onnx.checker.check_model(model, full_check=True)
    inspection = inspect_model(model, RewriteConfig(conv="spatial"))
    assert [(s.name, s.op_type, s.shape) for s in inspection.sites] == [
        ("conv1", "Conv", [24, 48]), ("conv2", "Conv", [48, 48]),
    ]
    assert inspection.sites[0].note == "Conv 3×3, spatial form"
    (skip,) = inspection.skips
    assert (skip.name, skip.kind, skip.params) == ("depthwise", "weights", 16 * 9)
    assert skip.reason.startswith("depthwise Conv (group=16")
    assert inspection.params_in_skipped + sum(s.params for s in inspection.sites) == 8 * 16 * 9 + 16 * 16 * 9 + 144


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_conv_stages_layout_and_fp16_factors(dtype: str, rng: np.random.Generator) -> None:
    model, feeds = conv_model(rng, channels=8, filters=16)
    config = RewriteConfig(policy=FULL_RANK, conv="spatial", stages=2, layout="stages", dtype=dtype)
    result = rewrite(model, config)
    assert_valid(result.model)
    ops = [node.op_type for node in result.model.graph.node]
    assert ops.count("Conv") == 4 and ops.count("Add") == 1 and ops.count("Cast") == (4 if dtype == "fp16" else 0)
    (expected,), (actual,) = run(model, feeds), run(result.model, feeds)
    assert relative_error(actual, expected) < (5e-3 if dtype == "fp16" else FULL_RANK_TOLERANCE)


def test_cli_calibrate_and_rewrite_conv_sites(tmp_path, capsys: pytest.CaptureFixture[str], rng) -> None:
    import json

    from onnxsvd.cli import main

    model_path, stats_path, data_path = tmp_path / "two.onnx", tmp_path / "stats.npz", tmp_path / "calib.npz"
    onnx.save(two_conv_model(rng), model_path)
    np.savez(data_path, x=correlated_images(rng, rng.standard_normal((8, 2)), 8, 10))
    args = ["calibrate", model_path, "--data", data_path, "-o", stats_path, "--patch-rows", "100", "--seed", "1"]
    assert main([str(a) for a in args]) == 0
    report_path, output = tmp_path / "report.json", tmp_path / "small.onnx"
    args = ["rewrite", model_path, "-o", output, "--ratio", "0.5", "--method", "whiten", "--stats", stats_path,
            "--conv", "spatial", "--min-rank", "1", "--align", "1", "--report", report_path]
    assert main([str(a) for a in args]) == 0
    sites = json.loads(report_path.read_text())["sites"]
    assert [(s["name"], s["conv_form"], s["action"]) for s in sites] == [
        ("conv1", "spatial", "factorized"), ("conv2", "spatial", "factorized"),
    ]
    assert all(any("data-free" in note for note in s["notes"]) for s in sites)
    assert_valid(onnx.load(output))
    capsys.readouterr()
    assert main(["rewrite", str(model_path), "-o", str(tmp_path / "x.onnx"), "--conv", "diagonal"]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_profile_flops_count_conv_sites(rng: np.random.Generator) -> None:
    from onnxsvd.validate.profile import site_flops

    model = two_conv_model(rng)
    rewritten = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.5, align=1, min_rank=1))).model
    flops = site_flops(model, rewritten)
    assert [cost.name for cost in flops.sites] == ["conv1", "conv2"]
    assert flops.per_row_before == 2 * (72 * 16 + 144 * 16)  # 2 × multiply-adds per output position
    ranks = [site.rank for site in rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.5, align=1,
                                                                                     min_rank=1))).report.sites]
    assert flops.per_row_after == 2 * (ranks[0] * (72 + 16) + ranks[1] * (144 + 16))


@pytest.mark.parametrize("source", ["constant_node", "fp16_cast", "dequantize_per_channel"])
def test_conv_weight_through_chains(source: str, rng: np.random.Generator) -> None:
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    if source == "constant_node":
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w_value")))
    elif source == "fp16_cast":
        initializers.append(numpy_helper.from_array(weight.astype(np.float16), "w16"))
        nodes.append(helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    else:
        scale = (np.abs(weight).reshape(6, -1).max(axis=1) / 127).astype(np.float32)  # [N]
        quantized = np.round(weight / scale[:, None, None, None]).astype(np.int8)
        initializers += [numpy_helper.from_array(quantized, "wq"), numpy_helper.from_array(scale, "ws")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0))
    nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 7, 7])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    (site,) = find_sites(model).sites
    assert site.shape == (36, 6) and site.weight.tensor == {"constant_node": "w", "fp16_cast": "w16",
                                                            "dequantize_per_channel": "wq"}[source]
    feeds = {"x": rng.standard_normal((2, 4, 7, 7)).astype(np.float32)}
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, conv="spatial"))
    assert_valid(result.model)
    assert "Conv" in [n.op_type for n in result.model.graph.node] and len(result.report.factorized) == 1
    tolerance = 2e-3 if source == "fp16_cast" else FULL_RANK_TOLERANCE  # fp16 factors of an fp16 weight
    assert relative_error(run(result.model, feeds)[0], run(model, feeds)[0]) < tolerance


def test_auto_factorizes_no_weight_the_channel_form_keeps_dense(rng: np.random.Generator) -> None:
    model, _ = conv_model(rng, channels=16, filters=16)  # ratio 0.5: r = 7, aligned down to 0 (--align 8)
    channel = rewrite(model, RewriteConfig(conv="channel")).report.sites[0]
    auto = rewrite(model, RewriteConfig(conv="auto")).report.sites[0]
    assert channel.action == auto.action == "kept" and auto.conv_form == "channel"
    assert any("the channel form stays dense at ratio 0.5" in note for note in auto.notes)
