"""The break-even guard and the reports count bytes in the storage dtype, not parameters (issue 11, §3).

An int8 weight behind ``DequantizeLinear`` costs one byte per value (plus its scale and zero point); its
factors cost four in fp32. Counting parameters let a 256×256 int8 weight at ratio 0.5 grow from 65.5 KB
to 131 KB while the report said it shrank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.cli import main
from onnxsvd.rank import ByteCost, break_even_rank, guard_rank
from tests.models import assert_valid, make_model, matmul_case, relative_error, run

#: Bytes of the 256×256 int8 weight as stored: payload, fp32 scale, int8 zero point.
QDQ_DENSE_BYTES = 256 * 256 + 4 + 1


def qdq_case(rng: np.random.Generator, k: int = 256, n: int = 256) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``Y = X · DequantizeLinear(W_q, scale, zero)`` with an int8 ``[K, N]`` weight, per tensor."""
    quantized = rng.integers(-127, 128, size=(k, n)).astype(np.int8)  # [K, N]
    tensors = [
        numpy_helper.from_array(quantized, "W_q"),
        numpy_helper.from_array(np.array(0.02, dtype=np.float32), "W_scale"),
        numpy_helper.from_array(np.array(3, dtype=np.int8), "W_zero"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W"], name="W_dq"),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, n])],
        tensors,
    )
    return model, {"X": rng.standard_normal((4, k)).astype(np.float32)}


def stored_bytes(model: onnx.ModelProto) -> int:
    """The real bytes of every initializer's values (what the file holds, apart from its framing)."""
    return sum(numpy_helper.to_array(tensor).nbytes for tensor in model.graph.initializer)


def ratio(value: float, **fields: object) -> RewriteConfig:
    return RewriteConfig(policy=RankPolicy("ratio", value, **fields))  # type: ignore[arg-type]


def test_int8_weight_at_half_ratio_stays_dense_in_bytes(rng: np.random.Generator) -> None:
    model, _ = qdq_case(rng)
    result = rewrite(model, ratio(0.5))
    (site,) = result.report.sites
    # Rank 64 in fp32: 64·512·4 = 131,072 B against 65,541 B as stored.
    assert site.action == "kept" and site.rank == 0
    assert "factor chain 131,072 B ≥ dense 65,541 B (int8 weight, fp32 factors)" in site.reason
    assert "--allow-growth" in site.reason
    assert site.dense_bytes == QDQ_DENSE_BYTES and site.factor_bytes == 0
    assert result.report.bytes_before == result.report.bytes_after == stored_bytes(model) == QDQ_DENSE_BYTES
    assert stored_bytes(result.model) <= stored_bytes(model)
    assert_valid(result.model)


def test_int8_weight_grows_only_with_allow_growth(rng: np.random.Generator) -> None:
    model, feeds = qdq_case(rng)
    result = rewrite(model, ratio(0.5, allow_growth=True))
    (site,) = result.report.sites
    assert site.action == "factorized" and site.rank == 64
    assert site.factor_bytes == 64 * 512 * 4 == stored_bytes(result.model) > site.dense_bytes
    assert result.report.bytes_after == stored_bytes(result.model) > result.report.bytes_before


def test_int8_weight_below_byte_break_even_is_factorized_and_the_bytes_are_real(rng: np.random.Generator) -> None:
    model, feeds = qdq_case(rng)
    result = rewrite(model, ratio(0.2))  # ⌊0.2·128⌋ = 25, aligned to 24: 24·512·4 = 49,152 B < 65,541 B
    (site,) = result.report.sites
    assert site.action == "factorized" and site.rank == 24
    assert site.params_before == 256 * 256 and site.params_after == 24 * 512  # parameters stay beside bytes
    assert site.dense_bytes == QDQ_DENSE_BYTES
    assert site.factor_bytes == 24 * 512 * 4 == stored_bytes(result.model)
    assert result.report.bytes_before == stored_bytes(model)
    assert result.report.bytes_after == stored_bytes(result.model) < stored_bytes(model)
    assert_valid(result.model)
    (before,), (after,) = run(model, feeds), run(result.model, feeds)
    assert after.shape == before.shape and np.all(np.isfinite(after))


def test_fp16_factors_of_an_int8_weight_break_even_in_their_own_bytes(rng: np.random.Generator) -> None:
    model, _ = qdq_case(rng)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5), dtype="fp16")
    (site,) = rewrite(model, config).report.sites
    # Rank 64 in fp16: 65,536 B < 65,541 B.
    assert site.action == "factorized" and site.factor_bytes == 64 * 512 * 2 < site.dense_bytes


def test_fp16_weight_counts_two_bytes_and_keeps_the_parameter_break_even(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48, dtype=TensorProto.FLOAT16)
    result = rewrite(case.model, ratio(0.5))
    (site,) = result.report.sites
    rank = 8 * ((64 * 48 // (2 * 112)) // 8)  # ⌊0.5·K·N/(K+N)⌋ aligned down to 8
    assert site.action == "factorized" and site.rank == rank
    assert site.dense_bytes == 64 * 48 * 2 and site.factor_bytes == rank * 112 * 2 == stored_bytes(result.model)
    # The same weight, at break-even in parameters: dense, in bytes too (fp16 factors).
    even = -(-64 * 48 // 112)
    kept = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", even))).report.sites[0]
    assert kept.action == "kept" and f"factor chain {even * 112 * 2:,} B ≥ dense {64 * 48 * 2:,} B" in kept.reason
    assert "(fp16 weight, fp16 factors)" in kept.reason
    # fp32 factors of an fp16 weight take twice the bytes: break-even at ⌈6,144 / (112·4)⌉ = 14, not 28.
    wide = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 14), dtype="fp32")).report.sites[0]
    assert wide.action == "kept" and "break-even 14: factor chain 6,272 B ≥ dense 6,144 B" in wide.reason
    assert "(fp16 weight, fp32 factors)" in wide.reason
    narrow = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 13), dtype="fp32")).report.sites[0]
    assert narrow.action == "factorized" and narrow.factor_bytes == 13 * 112 * 4


def test_fp16_factors_of_an_fp32_weight_break_even_later(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 64)
    # Rank 40: 40·128 = 5,120 parameters ≥ 4,096, but 10,240 B in fp16 < 16,384 B in fp32.
    config = RewriteConfig(policy=RankPolicy("rank", 40), dtype="fp16")
    result = rewrite(case.model, config)
    (site,) = result.report.sites
    assert site.action == "factorized" and site.rank == 40
    assert site.factor_bytes == 40 * 128 * 2 == stored_bytes(result.model) < site.dense_bytes == 64 * 64 * 4
    (before,), (after,) = run(case.model, case.feeds), run(result.model, case.feeds)
    assert relative_error(after, before) < 1.0
    # Beyond the byte break-even (64·64·4 / (128·2) = 64) it stays dense.
    config = RewriteConfig(policy=RankPolicy("rank", 64), dtype="fp16")
    kept = rewrite(case.model, config).report.sites[0]
    assert kept.action == "kept" and "(fp32 weight, fp16 factors)" in kept.reason


def test_stage_ranks_are_guarded_in_bytes(rng: np.random.Generator) -> None:
    model, _ = qdq_case(rng)
    (site,) = rewrite(model, RewriteConfig(stage_ranks=(32, 8), stages=2)).report.sites
    assert site.action == "kept" and "factor chain 81,920 B ≥ dense 65,541 B" in site.reason


def _thin_model(rng: np.random.Generator) -> onnx.ModelProto:
    """``X [4, 16] → W1 [16, 16] → W2 [16, 1] (N = 1)``, and ``S [4, 1] → W3 [1, 16] (K = 1)``."""
    tensors = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((16, 1)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((1, 16)).astype(np.float32), "W3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"], name="wide"),
        helper.make_node("MatMul", ["H", "W2"], ["Y"], name="to_one"),
        helper.make_node("MatMul", ["S", "W3"], ["Z"], name="from_one"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 16]),
         helper.make_tensor_value_info("S", TensorProto.FLOAT, [4, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 1]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [4, 16])],
        tensors,
    )


@pytest.mark.parametrize("policy", [RankPolicy("ratio", 0.5, align=1), RankPolicy("energy", 0.9, align=1)])
def test_global_allocation_keeps_dense_the_layers_a_chain_cannot_shrink(
    rng: np.random.Generator, policy: RankPolicy
) -> None:
    model = _thin_model(rng)
    feeds = {"X": rng.standard_normal((4, 16)).astype(np.float32), "S": rng.standard_normal((4, 1)).astype(np.float32)}
    result = rewrite(model, RewriteConfig(policy=policy, allocate="global"), batches=lambda: iter([feeds]))
    sites = {site.name: site for site in result.report.sites}
    for name in ("to_one", "from_one"):  # rank 1 stores 17 values in place of 16
        assert sites[name].action == "kept" and sites[name].rank == 0, sites[name].reason
        assert "factor chain 68 B ≥ dense 64 B (fp32 weight, fp32 factors)" in sites[name].reason
        assert sites[name].factor_bytes == 0 and sites[name].dense_bytes == 64
    assert sites["wide"].action == "factorized"
    assert result.report.bytes_after == stored_bytes(result.model) < stored_bytes(model)
    (note,) = [note for note in result.report.notes if note.startswith("global allocation")]
    spent = sites["wide"].rank * 32
    assert f" {spent:,} " in note  # the dense layers are outside the budget: nothing is spent on them
    assert "2 kept dense outside the budget" in note
    assert_valid(result.model)


def test_cli_prints_and_reports_bytes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model, _ = qdq_case(np.random.default_rng(3))
    source, output, report_path = tmp_path / "qdq.onnx", tmp_path / "small.onnx", tmp_path / "report.json"
    onnx.save(model, str(source))
    code = main(["rewrite", str(source), "-o", str(output), "--ratio", "0.5", "--report", str(report_path),
                 "--allow-unchanged"])  # the int8 weight stays dense: nothing is factorized
    out = capsys.readouterr().out
    assert code == 0
    assert output.stat().st_size <= source.stat().st_size
    report = json.loads(report_path.read_text())
    (site,) = report["sites"]
    assert site["action"] == "kept" and site["dense_bytes"] == QDQ_DENSE_BYTES and site["factor_bytes"] == 0
    assert report["bytes_before"] == report["bytes_after"] == QDQ_DENSE_BYTES
    assert f"weight bytes: {QDQ_DENSE_BYTES:,} → {QDQ_DENSE_BYTES:,}" in out


def test_inspect_gives_the_break_even_rank_in_bytes(rng: np.random.Generator) -> None:
    from onnxsvd.pipeline import inspect_model

    model, _ = qdq_case(rng)
    (site,) = inspect_model(model).sites
    # fp32 factors of the int8 weight: ⌈65,541 / (512·4)⌉ = 33, not ⌈65,536 / 512⌉ = 128.
    assert site.break_even_rank == 33 and site.dense_bytes == QDQ_DENSE_BYTES and site.dtype == "INT8"
    (fp16,) = inspect_model(model, RewriteConfig(dtype="fp16")).sites
    assert fp16.break_even_rank == 65


@given(k=st.integers(1, 300), n=st.integers(1, 300), extra=st.integers(0, 64),
       weight_itemsize=st.sampled_from([1, 2, 4]), factor_itemsize=st.sampled_from([2, 4]))
def test_byte_break_even_is_the_smallest_rank_that_does_not_shrink(
    k: int, n: int, extra: int, weight_itemsize: int, factor_itemsize: int
) -> None:
    cost = ByteCost(k * n * weight_itemsize + extra, factor_itemsize)
    even = break_even_rank(k, n, cost)
    assert cost.chain_bytes(k, n, even) >= cost.dense_bytes
    assert even == 1 or cost.chain_bytes(k, n, even - 1) < cost.dense_bytes
    for rank in (max(1, even - 1), even):
        decision = guard_rank("rank", rank, k, n, cost, allow_growth=False)
        assert decision.dense == (cost.chain_bytes(k, n, rank) >= cost.dense_bytes)
        assert not guard_rank("rank", rank, k, n, cost, allow_growth=True).dense
    if weight_itemsize == factor_itemsize and extra == 0:  # the parameter rule, unchanged
        assert even == break_even_rank(k, n)
