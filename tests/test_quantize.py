"""Quantized base + low-rank correction (issue 12, point 1): ONNX Runtime's MatMulNBits plus X·A·B."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.calibrate import calibrate
from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.pipeline import rewrite, rewrite_quantized, rewrite_sequential
from onnxsvd.quantize import quantize_weight
from tests.conftest import FULL_RANK
from tests.models import (
    BIAS_KINDS,
    assert_valid,
    gemm_case,
    make_model,
    matmul_case,
    op_types,
    relative_error,
    run,
    shared_weight_case,
)
from tests.test_calibrate import _batches, _correlated, _mlp
from tests.test_cli import assert_one_line_error, cli

INT4 = QuantizeConfig()
#: fp32 rounding of a full-rank correction, relative to the output's largest value.
FP32_ROUNDING = 2e-5


def quantized(policy: RankPolicy = FULL_RANK, **options) -> RewriteConfig:
    method = options.pop("method", "svd")
    return RewriteConfig(policy=policy, method=method, quantize=QuantizeConfig(**options))


def assert_quantized_graph(model: onnx.ModelProto) -> None:
    """The full checker with com.microsoft declared, strict shape inference, no weight left unread."""
    assert any(entry.domain == "com.microsoft" for entry in model.opset_import)
    assert "MatMulNBits" in op_types(model)
    assert_valid(model)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_full_correction_rank_reproduces_the_model(rng: np.random.Generator, bits: int, symmetric: bool) -> None:
    case = matmul_case(rng, 64, 48, lead=(2, 3))
    result = rewrite(case.model, quantized(bits=bits, symmetric=symmetric))
    assert_quantized_graph(result.model)
    site = result.report.sites[0]
    assert site.action == "factorized" and site.rank == 48 and site.base.startswith(f"int{bits} b32")
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("weight_as", ["A", "B"])
@pytest.mark.parametrize("bias", BIAS_KINDS)
def test_gemm_sites_at_full_rank(
    rng: np.random.Generator, trans_a: int, trans_b: int, weight_as: str, bias: str
) -> None:
    case = gemm_case(rng, 6, 40, 24, trans_a=trans_a, trans_b=trans_b, alpha=0.7, beta=1.3, bias=bias,
                     weight_as=weight_as)
    result = rewrite(case.model, quantized())
    assert_quantized_graph(result.model)
    assert result.report.sites[0].action == "factorized"
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


@pytest.mark.parametrize("lead", [(5,), (2, 5), (2, 3, 4)])
def test_weight_on_the_left_at_full_rank(rng: np.random.Generator, lead: tuple[int, ...]) -> None:
    case = matmul_case(rng, 40, 24, lead=lead, side="left")
    result = rewrite(case.model, quantized())
    assert_quantized_graph(result.model)
    assert op_types(result.model).count("Transpose") == 2
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_rank_zero_is_the_base_exactly_as_ort_dequantizes_it(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48, lead=(7,))
    result = rewrite(case.model, quantized(RankPolicy(), correction=False))
    assert op_types(result.model) == ["MatMulNBits"]
    site = result.report.sites[0]
    assert site.rank == 0 and site.correction_bytes == 0 and site.factor_bytes == site.base_bytes
    # [48, 2, 16] packed int4 values and [48, 2] fp32 scales (symmetric: no zero points).
    assert site.base_bytes == 48 * 2 * 16 + 48 * 2 * 4
    dequantized = quantize_weight(case.weights["mm"], np.float32, INT4).dequantized  # Ŵ [K, N]
    expected = case.feeds["X"].astype(np.float64) @ dequantized
    assert relative_error(run(result.model, case.feeds)[0], expected) < 1e-6
    assert site.base_error == pytest.approx(
        np.linalg.norm(case.weights["mm"] - dequantized) / np.linalg.norm(case.weights["mm"]), rel=1e-6
    )


@pytest.mark.parametrize("k", [70, 80, 20])
def test_a_block_that_does_not_divide_k_is_padded_by_the_quantizer(rng: np.random.Generator, k: int) -> None:
    case = matmul_case(rng, k, 24)
    result = rewrite(case.model, quantized())
    blocks = -(-k // 32)
    packed = [t for t in result.model.graph.initializer if t.name.endswith("_Q4")]
    assert [list(t.dims) for t in packed] == [[24, blocks, 16]]
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_bad_quantize_options_are_one_line_usage_errors() -> None:
    for options, words in (
        ({"block_size": 24}, "--block must be one of 16, 32, 64, 128, 256"),
        ({"bits": 3}, "--quantize takes int2, int4, int8"),
        ({"accuracy_level": 5}, "--accuracy-level"),
        ({"algorithm": "gptq"}, "Neural Compressor"),
        ({"algorithm": "hqq"}, "--asymmetric"),
    ):
        with pytest.raises(UsageError, match=words):
            QuantizeConfig(**options)


def test_hqq_base_at_full_rank(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    case = matmul_case(rng, 64, 32)
    result = rewrite(case.model, quantized(algorithm="hqq", symmetric=False))
    assert result.report.sites[0].base == "int4 b32 asym hqq"
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_accuracy_level_is_kept_on_the_node(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 32, lead=(16,))
    result = rewrite(case.model, quantized(RankPolicy("rank", 8), accuracy_level=4))
    (node,) = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < 0.2


def test_fp16_model(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 32, dtype=TensorProto.FLOAT16)
    result = rewrite(case.model, quantized())
    scales = [t for t in result.model.graph.initializer if t.name.endswith("_scales")]
    assert [t.data_type for t in scales] == [TensorProto.FLOAT16]
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < 5e-3


def test_shared_weight_shares_its_base_and_correction(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng, k=32, n=16)
    result = rewrite(case.model, quantized())
    assert op_types(result.model).count("MatMulNBits") == 2
    assert len(result.model.graph.initializer) == 4  # packed values, scales, A and B: shared by both sites
    for actual, expected in zip(run(result.model, case.feeds), run(case.model, case.feeds), strict=True):
        assert relative_error(actual, expected) < FP32_ROUNDING


def _data_error(model: onnx.ModelProto, reference: onnx.ModelProto, x: np.ndarray) -> float:
    actual, expected = run(model, {"x": x})[0], run(reference, {"x": x})[0]
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def test_whitened_correction_beats_plain_on_anisotropic_inputs(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(64, 48))
    x = _correlated(rng, 16, 8, 64)
    statistics = calibrate(model, _batches({"x": x}, 8))
    errors = {}
    for method in ("svd", "asvd", "whiten"):
        config = quantized(RankPolicy("rank", 8), method=method)
        errors[method] = _data_error(rewrite(model, config, statistics).model, model, x)
    base = _data_error(rewrite(model, quantized(RankPolicy(), correction=False)).model, model, x)
    assert errors["whiten"] < 0.7 * errors["svd"] < base, errors
    assert errors["whiten"] < errors["asvd"], errors


def test_sequential_fits_the_inputs_the_quantized_model_gives(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(32, 48, 48, 16))
    x = _correlated(rng, 16, 8, 32)
    batches = _batches({"x": x}, 8)
    statistics = calibrate(model, batches)
    config = quantized(RankPolicy("rank", 8), method="whiten", bits=2)
    one_shot = rewrite(model, config, statistics)
    sequential = rewrite_quantized(model, config, batches=batches, sequential=True)
    assert any(note.startswith("sequential: 3 levels") for note in sequential.report.notes)
    assert [s.rank for s in sequential.report.sites] == [8, 8, 8]
    assert _data_error(sequential.model, model, x) < _data_error(one_shot.model, model, x)
    for method in ("svd", "asvd"):  # A from the method, B refitted to the quantized model's inputs
        refitted = rewrite_quantized(model, quantized(RankPolicy("rank", 8), method=method, bits=2),
                                     batches=batches, sequential=True)
        assert_valid(refitted.model)


def test_ratio_energy_and_global_allocation_set_the_correction_ranks(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    x = _correlated(rng, 16, 8, 64)
    statistics = calibrate(model, _batches({"x": x}, 8))
    by_ratio = rewrite(model, quantized(RankPolicy("ratio", 0.25), method="whiten"), statistics).report
    assert [s.rank for s in by_ratio.sites] == [6, 4]  # ⌊0.25·K·N/(K+N)⌋, under --align 8: no default floor
    by_energy = rewrite(model, quantized(RankPolicy("energy", 0.5, align=1), method="whiten"), statistics).report
    assert all(0.5 <= s.kept_energy for s in by_energy.sites)
    policy = RankPolicy("ratio", 0.25, align=1, min_rank=1)  # the tiny layers sit under the default floor
    config = RewriteConfig(policy=policy, method="whiten", allocate="global", quantize=INT4)
    allocated = rewrite(model, config, statistics).report
    budget = 0.25 * (64 * 48 + 48 * 32)
    assert sum(s.rank * sum(s.shape) for s in allocated.sites) <= budget
    assert any(note.startswith("global allocation of the corrections") for note in allocated.notes)


def test_a_correction_has_no_default_floor_but_an_explicit_one_holds(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    statistics = calibrate(model, _batches({"x": _correlated(rng, 16, 8, 64)}, 8))
    default = rewrite(model, quantized(RankPolicy("ratio", 0.25), method="whiten"), statistics).report
    assert [s.action for s in default.sites] == ["factorized", "factorized"]  # quantized + rank 6 / 4
    floored = rewrite(model, quantized(RankPolicy("ratio", 0.25, min_rank=8), method="whiten"), statistics).report
    assert all(s.action == "kept" and "--min-rank 8" in s.reason for s in floored.sites)


def test_the_byte_guard_counts_the_base(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 8)
    result = rewrite(case.model, quantized(RankPolicy("rank", 8)))
    site = result.report.sites[0]
    assert site.action == "kept" and "quantized base" in site.reason and "--allow-growth" in site.reason
    assert op_types(result.model) == ["MatMul"]


def test_a_dtype_ort_cannot_take_keeps_the_site_dense(rng: np.random.Generator, tmp_path: Path) -> None:
    case = matmul_case(rng, 32, 16, dtype=TensorProto.DOUBLE)
    result = rewrite(case.model, quantized())
    site = result.report.sites[0]
    assert site.action == "kept" and "fp32, fp16 or bf16, not float64" in site.reason
    path = tmp_path / "model.onnx"
    onnx.save(case.model, str(path))
    with pytest.raises(UsageError, match="nothing was factorized"):
        rewrite_file(RewriteJob(path, tmp_path / "out.onnx", quantized()))
    assert os.listdir(tmp_path) == ["model.onnx"]


def _qdq_model(rng: np.random.Generator) -> onnx.ModelProto:
    return matmul_case(rng, 32, 16, source="dequant_channel").model


def _matmul_integer_model(rng: np.random.Generator) -> onnx.ModelProto:
    weight = rng.integers(-127, 128, size=(32, 16)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "W", "xz"], ["acc"], name="mmi"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "xs"], ["Y"]),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 16])], [numpy_helper.from_array(weight, "W")],
    )


def _nbits_model(rng: np.random.Generator) -> onnx.ModelProto:
    case = matmul_case(rng, 32, 16)
    return rewrite(case.model, quantized(RankPolicy(), correction=False)).model


@pytest.mark.parametrize("kind", ["qdq", "matmul_integer", "matmul_nbits"])
def test_an_already_quantized_model_is_a_one_line_error(
    rng: np.random.Generator, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    model = {"qdq": _qdq_model, "matmul_integer": _matmul_integer_model, "matmul_nbits": _nbits_model}[kind](rng)
    result = rewrite(model, quantized())
    assert all(site.action == "kept" and "already quantized" in site.reason for site in result.report.sites)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    code, out, err = cli(capsys, "rewrite", path, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--rank", "8")
    assert code == 2
    assert_one_line_error(err, out)
    assert "already quantized" in err and "nothing written" in err
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_cli_quantized_rewrite_with_whitened_correction(
    rng: np.random.Generator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    path, stats = tmp_path / "model.onnx", tmp_path / "s.npz"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=_correlated(rng, 16, 8, 64))
    assert cli(capsys, "calibrate", path, "--data", tmp_path / "calib.npz", "-o", stats)[0] == 0
    code, out, err = cli(
        capsys, "rewrite", path, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--block", "32", "--rank", "8",
        "--method", "whiten", "--stats", stats, "--report", tmp_path / "r.json",
    )
    assert code == 0, err
    assert "quantized: 2 weights" in out
    report = json.loads((tmp_path / "r.json").read_text())
    for site in report["sites"]:
        assert site["base"] == "int4 b32 sym rtn" and site["rank"] == 8
        assert site["correction_bytes"] == 8 * sum(site["shape"]) * 4
        assert site["factor_bytes"] == site["base_bytes"] + site["correction_bytes"] < site["dense_bytes"]
        assert 0 < site["kept_energy"] < 1
    assert_valid(onnx.load(str(tmp_path / "q.onnx")))
    code, out, err = cli(capsys, "rewrite", path, "-o", tmp_path / "q0.onnx", "--quantize", "int8", "--rank", "0")
    assert code == 0, err
    assert op_types(onnx.load(str(tmp_path / "q0.onnx"))).count("MatMul") == 0


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--block", "32"], "only apply with --quantize"),
        (["--factor-dtype", "int8"], "--factor-dtype only apply with --quantize"),
        (["--quantize", "int4", "--dtype", "fp16"], "--factor-dtype"),
        (["--quantize", "int4", "--block", "24"], "--block must be one of"),
        (["--quantize", "int3"], "--quantize"),
        (["--quantize", "int4", "--layout", "stages"], "--layout stages"),
        (["--quantize", "int4", "--quant-algo", "hqq", "--symmetric"], "--asymmetric"),
    ],
)
def test_cli_quantize_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    case = matmul_case(np.random.default_rng(0), 32, 16)
    path = tmp_path / "model.onnx"
    onnx.save(case.model, str(path))
    code, out, err = cli(capsys, "rewrite", path, "-o", tmp_path / "q.onnx", *extra)
    assert code == 2
    assert_one_line_error(err, out)
    assert words in err
    assert os.listdir(tmp_path) == ["model.onnx"]


# ------------------------------------------------------------------ factor storage (issue 12, point 3)


def _output_error(model: onnx.ModelProto, case) -> float:
    expected = run(case.model, case.feeds)[0].astype(np.float64)
    return float(np.linalg.norm(run(model, case.feeds)[0] - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("factor_dtype, itemsize", [("fp32", 4), ("fp16", 2), ("int8", 1)])
def test_factor_dtype_sets_the_correction_storage(rng: np.random.Generator, factor_dtype: str, itemsize: int) -> None:
    case = matmul_case(rng, 96, 64, lead=(32,))
    result = rewrite(case.model, quantized(RankPolicy("rank", 16), factor_dtype=factor_dtype))
    site = result.report.sites[0]
    scales = 2 * 16 * 4 if factor_dtype == "int8" else 0
    assert site.correction_bytes == 16 * (96 + 64) * itemsize + scales
    assert_quantized_graph(result.model)
    ops = op_types(result.model)
    assert ops.count("DequantizeLinear") == (2 if factor_dtype == "int8" else 0)
    assert ops.count("Cast") == (2 if factor_dtype == "fp16" else 0)
    base = _output_error(rewrite(case.model, quantized(RankPolicy(), correction=False)).model, case)
    fp32 = _output_error(rewrite(case.model, quantized(RankPolicy("rank", 16), factor_dtype="fp32")).model, case)
    assert _output_error(result.model, case) < base
    assert _output_error(result.model, case) < 1.05 * fp32  # rounding the factors costs little


def test_int8_factors_compute_what_the_fit_rounded_them_to(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48, lead=(9,))
    config = RewriteConfig(policy=FULL_RANK, stage_ranks=(24, 24), quantize=QuantizeConfig(factor_dtype="int8"))
    result = rewrite(case.model, config)
    site = result.report.sites[0]
    assert site.stage_ranks == [24, 24]
    tensors = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    factors = []
    for node in result.model.graph.node:
        if node.op_type == "DequantizeLinear":
            payload, scale = tensors[node.input[0]], tensors[node.input[1]]
            assert payload.dtype == np.int8 and scale.shape == (48,)
            axis = helper.get_attribute_value(node.attribute[0])
            factors.append(payload.astype(np.float64) * (scale[None, :] if axis == 1 else scale[:, None]))
    a, b = factors  # [K, 48], [48, N]: the values the graph computes
    weight = case.weights["mm"]
    corrected = quantize_weight(weight, np.float32, INT4).dequantized + a @ b  # Ŵ + Â B̂: [K, N]
    # The report's error is that of the factors as the fit rounded them; the graph's factors give the same.
    assert np.linalg.norm(weight - corrected) / np.linalg.norm(weight) == pytest.approx(site.weight_error, rel=1e-3)
    expected = case.feeds["X"].astype(np.float64) @ corrected
    assert relative_error(run(result.model, case.feeds)[0], expected) < 1e-5


def test_a_later_stage_fits_around_the_rounding_of_int8_factors(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48)
    one = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 48, align=1, allow_growth=True),
                                            quantize=QuantizeConfig(factor_dtype="int8")))
    two = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 48, allow_growth=True), stage_ranks=(40, 8),
                                            quantize=QuantizeConfig(factor_dtype="int8")))
    # At full rank one int8 stage leaves all of its rounding; a second stage fits what the first's left.
    assert two.report.sites[0].weight_error < one.report.sites[0].weight_error


def test_dtype_is_refused_with_quantize(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 32, 16)
    with pytest.raises(UsageError, match="--factor-dtype"):
        rewrite(case.model, RewriteConfig(dtype="fp16", quantize=INT4))


def test_external_data_output_streams_the_base_and_factors(rng: np.random.Generator, tmp_path: Path) -> None:
    case = matmul_case(rng, 64, 48, lead=(5,))
    path = tmp_path / "model.onnx"
    onnx.save(case.model, str(path))
    config = quantized(RankPolicy("rank", 8), factor_dtype="int8")
    report = rewrite_file(RewriteJob(path, tmp_path / "q.onnx", config, external_data=True))
    assert report.sites[0].action == "factorized"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "q.onnx", "q.onnx.data"]
    written = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer if t.dims)
    in_memory = rewrite(case.model, config).model
    np.testing.assert_allclose(_ort(tmp_path / "q.onnx", case.feeds), run(in_memory, case.feeds)[0], rtol=1e-6,
                               atol=1e-6)


def _ort(model: onnx.ModelProto | Path, feeds: dict, level: str = "basic", nbits_accuracy: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if nbits_accuracy is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", nbits_accuracy)
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int8_factors_through_ort_full_optimization(rng: np.random.Generator) -> None:
    """ONNX Runtime fuses A's DequantizeLinear and MatMul into a MatMulNBits whose accuracy level defaults to
    4 (int8 activations); with ``session.qdq_matmulnbits_accuracy_level=0`` it computes the fitted branch."""
    case = matmul_case(rng, 64, 48, lead=(5,))
    model = rewrite(case.model, quantized(RankPolicy("rank", 8), factor_dtype="int8")).model
    exact = _ort(model, case.feeds)
    np.testing.assert_array_equal(_ort(model, case.feeds, "all", "0"), exact)
    assert relative_error(_ort(model, case.feeds, "all"), exact) < 0.05


def test_cli_sequential_quantized_rewrite(
    rng: np.random.Generator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _mlp(rng, widths=(32, 48, 16))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=_correlated(rng, 8, 8, 32))
    code, out, err = cli(capsys, "rewrite", path, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--rank", "8",
                         "--method", "whiten", "--data", tmp_path / "calib.npz", "--sequential")
    assert code == 0, err
    assert "sequential: 2 levels" in out
    assert op_types(onnx.load(str(tmp_path / "q.onnx"))).count("MatMulNBits") == 2
    with pytest.raises(UsageError, match="rewrite_quantized"):
        rewrite_sequential(model, quantized(), _batches({"x": _correlated(rng, 8, 8, 32)}, 8))


@pytest.mark.parametrize("branch", ["unfused", "fused"])
def test_validate_flops_count_the_quantized_base(rng: np.random.Generator, branch: str) -> None:
    from onnxsvd.validate.profile import site_flops

    case = matmul_case(rng, 64, 48, lead=(2, 3))
    rank = 8
    result = rewrite(case.model, quantized(RankPolicy("rank", rank, align=1), branch=branch))
    flops = site_flops(case.model, result.model)
    assert [cost.name for cost in flops.sites] == [case.model.graph.node[0].name]
    # the MatMulNBits base (2·K·N, A's columns inside it when fused) and the correction (2·r·(K + N))
    assert flops.per_row_after == 2 * 64 * 48 + 2 * rank * (64 + 48)
    assert flops.per_row_before == 2 * 64 * 48


def test_quantizing_leaves_the_root_logger_as_it_was() -> None:
    """ONNX Runtime's quantizer module calls logging.basicConfig(INFO) on import: a library user's root
    logger must not gain its handler (a fresh interpreter, since the module is imported once)."""
    import subprocess
    import sys

    script = (
        "import logging, numpy as np\n"
        "from onnxsvd.config import QuantizeConfig\n"
        "from onnxsvd.quantize import quantize_weight\n"
        "quantize_weight(np.ones((64, 32), np.float32), np.float32, QuantizeConfig())\n"
        "root = logging.getLogger()\n"
        "print(len(root.handlers), root.level)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", str(logging.WARNING)]
