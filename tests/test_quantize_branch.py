"""The fused correction branch (issue 12, point 6): ``A`` as extra output columns of the quantized weight,
one MatMulNBits computing ``[X·Ŵ | X·Â]``, a Split, and ``B`` refitted to ``Â`` as ONNX Runtime
dequantizes it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.graph.records import read_record
from onnxsvd.pipeline import rewrite
from onnxsvd.quantize import dequantized_weight, quantize_weight
from tests.conftest import FULL_RANK
from tests.models import (
    BIAS_KINDS,
    assert_valid,
    gemm_case,
    matmul_case,
    op_types,
    relative_error,
    run,
    shared_weight_case,
)
from tests.test_calibrate import _correlated, _mlp
from tests.test_cli import assert_one_line_error, cli
from tests.test_quantize import FP32_ROUNDING

FUSED_OPS = ["MatMulNBits", "Split", "MatMul", "Add"]


def fused(policy: RankPolicy = FULL_RANK, **options) -> RewriteConfig:
    method = options.pop("method", "svd")
    return RewriteConfig(policy=policy, method=method, quantize=QuantizeConfig(branch="fused", **options))


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n"), [(48, 64), (64, 64)])
def test_full_rank_fused_branch_reproduces_the_model(
    rng: np.random.Generator, bits: int, symmetric: bool, k: int, n: int
) -> None:
    case = matmul_case(rng, k, n, lead=(2, 3))
    result = rewrite(case.model, fused(bits=bits, symmetric=symmetric))
    assert_valid(result.model)
    assert op_types(result.model) == FUSED_OPS
    (node,) = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    assert attributes(node)["N"] == n + k and attributes(node)["K"] == k  # [W | A], r = K extra columns
    site = result.report.sites[0]
    assert site.rank == k and "fused branch" in site.reason
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_the_fused_weight_holds_the_base_and_the_quantized_a(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48)
    result = rewrite(case.model, fused(RankPolicy("rank", 8, align=1)))
    initializers = {t.name: t for t in result.model.graph.initializer}
    (node,) = [n for n in result.model.graph.node if n.op_type == "MatMulNBits"]
    both = dequantized_weight(node, initializers)  # [K, N + r] as ORT's kernel reads it
    base = quantize_weight(case.weights["mm"], np.float32, QuantizeConfig()).dequantized  # Ŵ [K, N]
    np.testing.assert_array_equal(both[:, :48], base)
    assert both.shape == (64, 56)
    # The branch fits E = W − Ŵ with Â as stored: B is the least-squares optimum given Â.
    b = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                        if t.name not in node.input and t.dims == [8, 48]))
    a_hat = both[:, 48:]
    error = case.weights["mm"].astype(np.float64) - base
    optimum, *_ = np.linalg.lstsq(a_hat, error, rcond=None)
    np.testing.assert_allclose(b, optimum, rtol=1e-4, atol=1e-6)


def test_k_above_n_at_full_rank_is_bounded_by_the_rounding_of_a(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48, lead=(2, 3))
    expected = run(case.model, case.feeds)[0]
    alone = rewrite(case.model, fused(RankPolicy(), correction=False)).model
    corrected = rewrite(case.model, fused()).model
    assert relative_error(run(corrected, case.feeds)[0], expected) < 0.1 * relative_error(
        run(alone, case.feeds)[0], expected)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", BIAS_KINDS)
def test_gemm_sites_fused(rng: np.random.Generator, trans_b: int, bias: str) -> None:
    case = gemm_case(rng, 6, 32, 40, trans_b=trans_b, alpha=0.7, beta=1.3, bias=bias)
    result = rewrite(case.model, fused())
    assert_valid(result.model)
    assert "Split" in op_types(result.model)
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_weight_on_the_left_fused(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 32, 40, lead=(2, 5), side="left")
    result = rewrite(case.model, fused())
    assert_valid(result.model)
    assert op_types(result.model).count("Transpose") == 2 and "Split" in op_types(result.model)
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_shared_weight_shares_its_fused_base_and_b(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng, k=32, n=48)
    result = rewrite(case.model, fused())
    assert op_types(result.model).count("MatMulNBits") == 2
    # packed values, scales, B, and the Split sizes of each site
    assert len({t.name for t in result.model.graph.initializer if t.data_type != onnx.TensorProto.INT64}) == 3
    for actual, expected in zip(run(result.model, case.feeds), run(case.model, case.feeds), strict=True):
        assert relative_error(actual, expected) < FP32_ROUNDING


def test_fused_records_read_back(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    from onnxsvd.finetune.sites import find_factor_pairs
    from onnxsvd.finetune.torch_graph import TorchGraph

    model = _mlp(rng, (64, 48, 32))
    result = rewrite(model, fused(RankPolicy("rank", 4, align=1)))
    roles: dict[str, list[tuple[str, str]]] = {}
    packed = {}
    for node in result.model.graph.node:
        record = read_record(node)
        if record is not None:
            roles.setdefault(record.site, []).append((node.op_type, record.role))
            packed[record.site] = record.factor_a
            assert record.rank == 4
    assert roles == {site: [("MatMulNBits", "base"), ("Split", "split"), ("MatMul", "second"), ("Add", "sum")]
                     for site in ("fc0", "fc1")}
    nbits = {n.name.split("/")[0]: n.input[1] for n in result.model.graph.node if n.op_type == "MatMulNBits"}
    assert packed == nbits  # factor_a names the fused packed weight that holds Â
    pairs, skips = find_factor_pairs(result.model)
    assert not pairs and [skip.site for skip in skips] == ["fc0", "fc1"]
    assert all("--branch unfused" in skip.reason for skip in skips)
    # The torch evaluator runs the fused graph as ONNX Runtime does (validate and finetune read it).
    feeds = {"x": _correlated(rng, 3, 5, 64)}
    import torch

    with torch.no_grad():
        values = TorchGraph(result.model)({"x": torch.from_numpy(feeds["x"])})
    assert relative_error(values["y"].numpy(), run(result.model, feeds)[0]) < 1e-5


def test_fused_branch_with_int8_factors_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--branch fused"):
        QuantizeConfig(branch="fused", factor_dtype="int8")
    with pytest.raises(UsageError, match="unknown --branch"):
        QuantizeConfig(branch="merged")


def test_cli_branch_option(rng: np.random.Generator, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    case = matmul_case(rng, 64, 48, lead=(4,))
    source = tmp_path / "m.onnx"
    onnx.save(case.model, source)
    out = tmp_path / "q.onnx"
    code, stdout, stderr = cli(capsys, "rewrite", source, "-o", out, "--quantize", "int4", "--rank", "8",
                               "--align", "1", "--branch", "fused")
    assert code == 0, stderr
    assert op_types(onnx.load(out)) == FUSED_OPS
    code, stdout, stderr = cli(capsys, "rewrite", source, "-o", tmp_path / "other.onnx", "--branch", "fused",
                               "--rank", "8")
    assert code != 0 and "--branch" in stderr
    assert_one_line_error(stderr, stdout)
