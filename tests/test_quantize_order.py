"""Issue 12, points 2 and 4: ``--order lowrank-first`` (preserve, then quantize) and ``--bits-per-weight``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxsvd.calibrate import calibrate
from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.pipeline import rewrite, rewrite_quantized
from onnxsvd.rank import AllocationSite, allocate_bytes
from tests.conftest import FULL_RANK
from tests.models import matmul_case, op_types, relative_error, run
from tests.test_calibrate import _batches, _correlated, _mlp
from tests.test_cli import assert_one_line_error, cli
from tests.test_quantize import FP32_ROUNDING, _data_error, assert_quantized_graph


def lowrank_first(policy: RankPolicy = FULL_RANK, preserve: int = 4, **options) -> RewriteConfig:
    method = options.pop("method", "svd")
    quantize = QuantizeConfig(order="lowrank-first", preserve_rank=preserve, **options)
    return RewriteConfig(policy=policy, method=method, quantize=quantize)


# ------------------------------------------------------------------ --order lowrank-first


def _branch_widths(model: onnx.ModelProto, activation: str = "X") -> list[int]:
    """The rank of every correction branch reading ``activation``: the columns of its first factor."""
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    return [shapes[node.input[1]][1] for node in model.graph.node
            if node.op_type == "MatMul" and node.input[0] == activation and node.input[1] in shapes]


@pytest.mark.parametrize("preserve", [4, 48])
def test_lowrank_first_at_full_ranks_reproduces_the_model(rng: np.random.Generator, preserve: int) -> None:
    case = matmul_case(rng, 64, 48, lead=(2, 3))
    result = rewrite(case.model, lowrank_first(preserve=preserve))
    assert_quantized_graph(result.model)
    site = result.report.sites[0]
    assert site.action == "factorized" and site.stage_ranks == [preserve, 48] and site.rank == preserve + 48
    assert site.reason.startswith(f"lowrank-first: preserved rank {preserve}")
    # One MatMulNBits of Q(W − A₁B₁) and one fused branch X·[A₁ A₂]·[B₁; B₂].
    assert op_types(result.model).count("MatMulNBits") == 1 and _branch_widths(result.model) == [preserve + 48]
    assert relative_error(run(result.model, case.feeds)[0], run(case.model, case.feeds)[0]) < FP32_ROUNDING


def test_lowrank_first_quantizes_the_residual(rng: np.random.Generator) -> None:
    # A weight with a few dominant directions: keeping them before quantizing shrinks the residual's range,
    # so the base error (stage 1 included) is far below quantizing W itself.
    k, n = 96, 64
    spiky = rng.standard_normal((k, 3)) @ rng.standard_normal((3, n)) * 4 + 0.05 * rng.standard_normal((k, n))
    case = matmul_case(rng, k, n, lead=(16,))
    (initializer,) = case.model.graph.initializer
    initializer.CopyFrom(numpy_helper.from_array(spiky.astype(np.float32), initializer.name))
    quant_first = rewrite(case.model, RewriteConfig(policy=RankPolicy("rank", 3), quantize=QuantizeConfig()))
    preserve = rewrite(case.model, lowrank_first(RankPolicy("rank", 3), preserve=3))
    first, second = quant_first.report.sites[0], preserve.report.sites[0]
    assert second.base_error < 0.5 * first.base_error
    assert _branch_widths(preserve.model) == [6] and second.stage_ranks == [3, 3]
    assert second.correction_bytes == 6 * (k + n) * 4
    assert relative_error(run(preserve.model, case.feeds)[0], run(case.model, case.feeds)[0]) < relative_error(
        run(quant_first.model, case.feeds)[0], run(case.model, case.feeds)[0])


@pytest.mark.parametrize("factor_dtype", ["fp16", "int8"])
def test_lowrank_first_with_factor_dtype_and_whitening(rng: np.random.Generator, factor_dtype: str) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    x = _correlated(rng, 16, 8, 64)
    statistics = calibrate(model, _batches({"x": x}, 8))
    config = lowrank_first(RankPolicy("rank", 8), preserve=8, method="whiten", factor_dtype=factor_dtype)
    result = rewrite(model, config, statistics)
    assert_quantized_graph(result.model)
    itemsize = 2 if factor_dtype == "fp16" else 1
    for site in result.report.sites:
        assert site.action == "factorized" and site.rank == 16
        assert site.correction_bytes >= 16 * sum(site.shape) * itemsize
    base = rewrite(model, RewriteConfig(policy=RankPolicy(), quantize=QuantizeConfig(correction=False)))
    assert _data_error(result.model, model, x) < 0.5 * _data_error(base.model, model, x)


def test_lowrank_first_sequential(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(32, 48, 48, 16))
    x = _correlated(rng, 16, 8, 32)
    batches = _batches({"x": x}, 8)
    config = lowrank_first(RankPolicy("rank", 4), preserve=2, method="whiten", bits=2)
    result = rewrite_quantized(model, config, batches=batches, sequential=True)
    assert_quantized_graph(result.model)
    assert [s.stage_ranks for s in result.report.sites] == [[2, 4]] * 3
    one_shot = rewrite(model, config, calibrate(model, batches))
    base = rewrite(model, RewriteConfig(policy=RankPolicy(), quantize=QuantizeConfig(bits=2, correction=False)))
    error = _data_error(result.model, model, x)
    # Sequential fitting is not always better on 128 calibration rows; it is never far off, and far below the base.
    assert error < 1.1 * _data_error(one_shot.model, model, x) and error < 0.5 * _data_error(base.model, model, x)


def test_lowrank_first_options_are_checked() -> None:
    with pytest.raises(UsageError, match="--preserve-rank"):
        QuantizeConfig(order="lowrank-first")
    with pytest.raises(UsageError, match="--order lowrank-first"):
        QuantizeConfig(preserve_rank=8)
    with pytest.raises(UsageError, match="unknown --order 'sideways'; use one of quant-first, lowrank-first"):
        QuantizeConfig(order="sideways")


# ------------------------------------------------------------------ --bits-per-weight


def test_allocate_bytes_stays_within_the_budget_and_favours_sensitive_sites() -> None:
    spectrum = np.linspace(3.0, 0.1, 32)
    sites = [
        AllocationSite("a", 64, 32, spectrum, sensitivity=10.0, min_rank=0, rank_limit=32, rank_bytes=96 * 4),
        AllocationSite("b", 64, 32, spectrum, sensitivity=0.1, min_rank=0, rank_limit=32, rank_bytes=96 * 4),
    ]
    allocation = allocate_bytes(sites, 16 * 96 * 4, align=4)
    assert allocation.params <= 16 * 96 * 4
    assert allocation.ranks["a"] > allocation.ranks["b"] and allocation.ranks["a"] % 4 == 0
    with pytest.raises(UsageError, match="need 768 B"):
        allocate_bytes([dataclasses_replace(site, min_rank=1) for site in sites], 100, align=1)


def dataclasses_replace(site: AllocationSite, **changes) -> AllocationSite:
    import dataclasses

    return dataclasses.replace(site, **changes)


def _budget_config(bits: float, **options) -> RewriteConfig:
    policy = RankPolicy(align=options.pop("align", 4))
    return RewriteConfig(policy=policy, method="whiten", quantize=QuantizeConfig(bits_per_weight=bits, **options))


@pytest.mark.parametrize("factor_dtype", ["auto", "int8"])
def test_bits_per_weight_meets_the_budget_in_bytes(rng: np.random.Generator, factor_dtype: str) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    x = _correlated(rng, 16, 8, 64)
    batches = _batches({"x": x}, 8)
    statistics = calibrate(model, batches)
    params = 64 * 48 + 48 * 32
    for bits in (7.0, 10.0):
        config = _budget_config(bits, factor_dtype=factor_dtype, align=1)
        result = rewrite(model, config, statistics, batches=batches)
        report = result.report
        assert all(site.action == "factorized" for site in report.sites)
        spent = sum(site.factor_bytes for site in report.sites)
        assert spent <= bits * params / 8
        assert spent == sum(site.base_bytes + site.correction_bytes for site in report.sites)
        assert any(note.startswith(f"--bits-per-weight {bits:g}: a budget of") for note in report.notes)
        assert sum(site.rank for site in report.sites) > 0
        assert_quantized_graph(result.model)
    small = rewrite(model, _budget_config(7.0, align=1), statistics, batches=batches)
    large = rewrite(model, _budget_config(10.0, align=1), statistics, batches=batches)
    assert _data_error(large.model, model, x) < _data_error(small.model, model, x)


def test_a_budget_below_the_bases_is_an_error_naming_the_minimum(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    batches = _batches({"x": _correlated(rng, 16, 8, 64)}, 8)
    statistics = calibrate(model, batches)
    words = r"below their int4 b32 sym rtn bases' [\d,]+ B: use --bits-per-weight 5"
    with pytest.raises(UsageError, match=words) as raised:
        rewrite(model, _budget_config(4.0), statistics, batches=batches)
    minimum = float(str(raised.value).split("--bits-per-weight ")[-1].split()[0])
    rewrite(model, _budget_config(minimum), statistics, batches=batches)  # the named minimum holds
    with pytest.raises(UsageError, match="pass --data DATA"):
        rewrite(model, _budget_config(6.0), statistics)
    with pytest.raises(UsageError, match="drop --rank"):
        rewrite(model, RewriteConfig(policy=RankPolicy("rank", 8), method="whiten",
                                     quantize=QuantizeConfig(bits_per_weight=6.0)), statistics, batches=batches)


def test_cli_bits_per_weight_and_lowrank_first(
    rng: np.random.Generator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _mlp(rng, widths=(64, 48, 32))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=_correlated(rng, 16, 8, 64))
    code, out, err = cli(
        capsys, "rewrite", path, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--bits-per-weight", "7",
        "--align", "4", "--method", "whiten", "--data", tmp_path / "calib.npz", "--report", tmp_path / "r.json",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert sum(site["factor_bytes"] for site in report["sites"]) <= 7 * (64 * 48 + 48 * 32) / 8
    code, out, err = cli(
        capsys, "rewrite", path, "-o", tmp_path / "p.onnx", "--quantize", "int4", "--order", "lowrank-first",
        "--preserve-rank", "4", "--rank", "8", "--method", "whiten", "--data", tmp_path / "calib.npz",
        "--report", tmp_path / "p.json",
    )
    assert code == 0, err
    assert [site["stage_ranks"] for site in json.loads((tmp_path / "p.json").read_text())["sites"]] == [[4, 8]] * 2
    written = sorted(os.listdir(tmp_path))
    for extra, words in [
        (["--bits-per-weight", "3", "--data", tmp_path / "calib.npz"], "use --bits-per-weight"),
        (["--bits-per-weight", "6", "--rank", "8", "--data", tmp_path / "calib.npz"], "drop --rank"),
        (["--bits-per-weight", "6"], "pass --data DATA"),
        (["--order", "lowrank-first"], "--preserve-rank"),
        (["--preserve-rank", "4"], "--order lowrank-first"),
    ]:
        code, out, err = cli(capsys, "rewrite", path, "-o", tmp_path / "bad.onnx", "--quantize", "int4", *extra)
        assert code == 2, (extra, err)
        assert_one_line_error(err, out)
        assert words in err, (extra, err)
    assert sorted(os.listdir(tmp_path)) == written


def test_validate_counts_the_linear_bytes_of_a_quantized_model(rng: np.random.Generator, tmp_path: Path) -> None:
    from onnxsvd.config import ValidateConfig
    from onnxsvd.validate import validate

    model = _mlp(rng, widths=(64, 48, 32))
    original, rewritten, data = tmp_path / "model.onnx", tmp_path / "q.onnx", tmp_path / "x.npz"
    onnx.save(model, str(original))
    np.savez(data, x=_correlated(rng, 16, 8, 64))
    result = rewrite(model, lowrank_first(RankPolicy("rank", 4), preserve=4, factor_dtype="int8"))
    onnx.save(result.model, str(rewritten))
    size = validate(original, rewritten, data, ValidateConfig(warmup=0, iters=1, profile=False),
                    enforce_gate=False).size
    assert size.linear_bytes_original == (64 * 48 + 48 * 32) * 4
    assert size.linear_bytes_rewritten == sum(site.factor_bytes for site in result.report.sites)
    assert size.linear_bytes_kept == pytest.approx(size.linear_bytes_rewritten / size.linear_bytes_original)
    assert size.to_dict()["linear_bytes_kept"] < 0.3
