"""--keep-dense-if-slower with --quantize: each corrected site timed against its quantized layer alone;
corrections over --max-branch-cost are dropped, the site keeping its quantized base."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.graph import QuantizedGroup, find_sites
from onnxsvd.pipeline import rewrite
from onnxsvd.pipeline.quantized import QuantOutcome
from onnxsvd.pipeline.speed import (
    SiteSpeedCheck,
    SiteTiming,
    SpeedCheckConfig,
    _drop_or_keep_correction,
    quantized_site_models,
)
from onnxsvd.quantize import quantize_weight
from tests.models import assert_valid, matmul_case, op_types, relative_error, run
from tests.test_cli import assert_one_line_error, cli

CHECK = SpeedCheckConfig(iters=3, warmup=1, input_shapes={"X": (4, 64)}, max_branch_cost=100.0)


def config(branch: str = "unfused") -> RewriteConfig:
    return RewriteConfig(policy=RankPolicy("rank", 8, align=1), quantize=QuantizeConfig(branch=branch))


@pytest.mark.parametrize("branch", ["unfused", "fused"])
def test_a_cheap_enough_correction_is_kept_with_its_times(rng: np.random.Generator, branch: str) -> None:
    case = matmul_case(rng, 64, 48, lead=(4,))
    plain = rewrite(case.model, config(branch))
    checked = rewrite(case.model, config(branch), speed_check=SiteSpeedCheck(CHECK))
    site = checked.report.sites[0]
    assert site.rank == 8 and "the correction costs" in site.reason and "int4 layer alone on cpu" in site.reason
    assert site.base_ms > 0 and site.corrected_ms > 0 and site.speed_provider == "cpu"
    assert op_types(checked.model) == op_types(plain.model)
    assert relative_error(run(checked.model, case.feeds)[0], run(plain.model, case.feeds)[0]) == 0.0


def test_a_correction_over_budget_is_dropped_and_the_base_stays(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 64, 48, lead=(4,))
    (site,) = find_sites(case.model).sites
    weight = quantize_weight(case.weights["mm"], np.float32, QuantizeConfig())
    outcome = QuantOutcome(sites=[site], storage=1, reason="int4 base + rank 8", weight=weight,
                           factorization=rewrite_factorization(case), ranks=[8], base_error=0.1, weight_error=0.01)
    timings = [SiteTiming("cpu", dense_ms=1.0, factorized_ms=1.25, activation_shape=(4, 64), iters=3)]
    _drop_or_keep_correction(outcome, timings, 0.10, "int4")
    assert outcome.factorization is None and outcome.ranks == [] and outcome.weight is weight
    assert outcome.weight_error == 0.1 and outcome.base_ms == 1.0 and outcome.corrected_ms == 1.25
    assert outcome.reason == ("quantized base only: the rank 8 correction cost +25% over the int4 layer alone on "
                              "cpu (1.25 ms vs 1 ms), above --max-branch-cost 10%")
    kept = QuantOutcome(sites=[site], storage=1, reason="r", weight=weight, factorization=rewrite_factorization(case))
    _drop_or_keep_correction(kept, [SiteTiming("cpu", 1.0, 1.05, (4, 64), 3)], 0.10, "int4")
    assert kept.factorization is not None and kept.reason.endswith("+5% over the int4 layer alone on cpu (1.05 ms "
                                                                     "vs 1 ms)")


def rewrite_factorization(case):
    from onnxsvd.factorize import Factorization

    return Factorization(stages=((np.ones((64, 8)), np.ones((8, 48))),), kept_energy=0.5)


@pytest.mark.parametrize("branch", ["unfused", "fused"])
def test_the_timed_models_are_what_rewrite_writes(rng: np.random.Generator, branch: str) -> None:
    case = matmul_case(rng, 64, 48, lead=(4,))
    written = rewrite(case.model, config(branch)).model
    (site,) = find_sites(case.model).sites
    from onnxsvd.factorize import identity_metric
    from onnxsvd.pipeline.fused_branch import fuse_branch

    weight = case.weights["mm"].astype(np.float64)
    base = quantize_weight(weight, np.float32, QuantizeConfig())
    factorization = rewrite_factorization(case)
    fused = None
    if branch == "fused":
        fused, factorization = fuse_branch(weight, base, factorization, weight - base.dequantized, identity_metric(),
                                           np.dtype(np.float32), np.dtype(np.float32), QuantizeConfig())
    group = QuantizedGroup([site], base, factorization, 1, fused=fused)
    alone, corrected = quantized_site_models(site, case.model.graph.node[0], None, (4, 64), group)
    assert op_types(alone) == ["MatMulNBits"]
    assert op_types(corrected) == op_types(written)
    assert_valid(alone)
    assert_valid(corrected)


def test_cli_max_branch_cost_needs_quantize_and_the_check(rng: np.random.Generator, tmp_path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    case = matmul_case(rng, 64, 48, lead=(4,))
    source = tmp_path / "m.onnx"
    onnx.save(case.model, source)
    code, out, err = cli(capsys, "rewrite", source, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--rank", "8",
                         "--max-branch-cost", "0.2")
    assert code != 0 and "--max-branch-cost" in err
    assert_one_line_error(err, out)
    with pytest.raises(UsageError, match="--max-branch-cost"):
        SpeedCheckConfig(max_branch_cost=-1.0)
    code, out, err = cli(capsys, "rewrite", source, "-o", tmp_path / "q.onnx", "--quantize", "int4", "--rank", "8",
                         "--align", "1", "--keep-dense-if-slower", "--shape", "X=4,64", "--max-branch-cost", "50",
                         "--speed-iters", "3")
    assert code == 0, err
    assert "MatMulNBits" in op_types(onnx.load(tmp_path / "q.onnx"))
