"""Global rank allocation (issue 6): budget, loss estimate against uniform, and the rewrite path."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.pipeline import rewrite
from onnxsvd.rank import (
    AllocationSite,
    allocate_budget,
    allocate_energy,
    allowed_ranks,
    loss_estimate,
    smallest_feasible_ratio,
    uniform_ranks,
)
from tests.models import make_model
from tests.test_calibrate import _batches, _correlated, _mlp


def _sites(seed: int, count: int) -> list[AllocationSite]:
    rng = np.random.default_rng(seed)
    sites = []
    for index in range(count):
        k, n = (int(v) for v in rng.integers(8, 96, size=2))
        decay = float(rng.uniform(1.0, 30.0))
        spectrum = float(rng.uniform(0.1, 10.0)) * np.exp(-np.arange(min(k, n)) / decay)
        sites.append(AllocationSite(f"s{index}", k, n, spectrum, float(rng.uniform(0.1, 5.0))))
    return sites


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000), count=st.integers(1, 8), ratio=st.floats(0.01, 0.9), align=st.sampled_from([1, 4, 8])
)
def test_budget_is_met_and_uniform_is_never_better(seed: int, count: int, ratio: float, align: int) -> None:
    sites = _sites(seed, count)
    budget = int(np.floor(ratio * sum(s.k * s.n for s in sites)))
    minimum_params = sum(allowed_ranks(s, align)[0][0] * (s.k + s.n) for s in sites)
    if minimum_params > budget:  # infeasible: refused, naming a ratio that is feasible
        with pytest.raises(UsageError, match=r"use --ratio [0-9.]+ or more") as refused:
            allocate_budget(sites, ratio, align)
        feasible = smallest_feasible_ratio(sites, align)
        assert f"--ratio {feasible:g} or more" in str(refused.value)
        assert feasible > ratio
        assert allocate_budget(sites, feasible, align).params <= np.floor(feasible * sum(s.params for s in sites))
        return
    allocation = allocate_budget(sites, ratio, align)
    params = sum(allocation.ranks[s.key] * (s.k + s.n) for s in sites)
    assert params == allocation.params
    assert params <= budget
    for site in sites:
        ladder, _ = allowed_ranks(site, align)
        assert allocation.ranks[site.key] in ladder  # aligned where a multiple fits, under break-even
    # Exact use of the budget: no step still open would fit in what is left.
    open_steps = []
    for site in sites:
        ladder, _ = allowed_ranks(site, align)
        position = ladder.index(allocation.ranks[site.key])
        if position + 1 < len(ladder):
            open_steps.append((ladder[position + 1] - ladder[position]) * (site.k + site.n))
    assert not open_steps or budget - params < min(open_steps)
    uniform = uniform_ranks(sites, ratio, align)
    if sum(uniform[s.key] * (s.k + s.n) for s in sites) <= budget:
        uniform_loss = sum(loss_estimate(s, uniform[s.key]) for s in sites)
        assert allocation.loss <= uniform_loss * (1 + 1e-12) + 1e-15


def test_a_budget_below_the_lowest_ranks_is_refused_with_the_smallest_feasible_ratio() -> None:
    # 4 sites of 64×64 at ratio 0.01: a budget of 163 parameters, while rank 1 everywhere needs 512.
    spectrum = np.exp(-np.arange(64) / 10.0)
    sites = [AllocationSite(f"s{i}", 64, 64, spectrum) for i in range(4)]
    with pytest.raises(UsageError, match=r"budget of 163 parameters .* need 512: use --ratio 0\.0313 or more"):
        allocate_budget(sites, 0.01, align=1)
    assert allocate_budget(sites, 0.0313, align=1).params <= 0.0313 * 4 * 4096
    # With the default floor (rank 8), the lowest ranks need 8·128 per site.
    floored = [dataclasses.replace(site, min_rank=8) for site in sites]
    with pytest.raises(UsageError, match=r"need 4,096: use --ratio 0\.25 or more"):
        allocate_budget(floored, 0.01, align=8)


def test_global_ranks_follow_the_alignment_and_say_why_where_they_cannot() -> None:
    rng = np.random.default_rng(0)
    sites = [
        AllocationSite(f"s{i}", k, n, np.sort(rng.uniform(0.1, 5.0, min(k, n)))[::-1])
        for i, (k, n) in enumerate([(64, 64), (64, 128), (128, 64), (96, 64)])
    ]
    # A 4×64 layer breaks even at rank 4 (4·68 ≥ 256): only ranks 1–3 pay, none a multiple of 8.
    small = AllocationSite("small", 4, 64, np.array([3.0, 2.0, 1.0, 0.5]))
    for ratio in (0.25, 0.37, 0.5, 0.71):
        allocation = allocate_budget([*sites, small], ratio, align=8)
        assert all(allocation.ranks[s.key] % 8 == 0 for s in sites), allocation.ranks
        assert allocation.ranks["small"] <= 3
        assert "largest rank under break-even is 3" in allocation.notes["small"]
        assert set(allocation.notes) == {"small"}


def test_a_byte_limit_caps_the_global_rank() -> None:
    # An int8 64×64 weight with fp32 factors breaks even at rank 8 (8·128·4 ≥ 4,096 + 8): limit 7.
    spectrum = np.ones(64)
    capped = AllocationSite("int8", 64, 64, spectrum, rank_limit=7)
    free = AllocationSite("fp32", 64, 64, 0.01 * spectrum)
    allocation = allocate_budget([capped, free], 0.5, align=1)
    assert allocation.ranks["int8"] == 7
    assert allowed_ranks(dataclasses.replace(capped, min_rank=8), 8) == (
        [], "the floor 8 is above the largest rank under break-even, 7"
    )


def test_a_sensitive_layer_gets_more_rank() -> None:
    spectrum = np.exp(-np.arange(64) / 10.0)
    calm = AllocationSite("calm", 64, 64, spectrum, sensitivity=0.1)
    touchy = AllocationSite("touchy", 64, 64, spectrum, sensitivity=10.0)
    allocation = allocate_budget([calm, touchy], 0.4, align=1)
    assert allocation.ranks["touchy"] > allocation.ranks["calm"]


def test_energy_allocation_keeps_the_share() -> None:
    sites = _sites(3, 5)
    allocation = allocate_energy(sites, 0.9, align=1)
    total = sum(float(s.sensitivity * np.sum(s.singular_values**2)) for s in sites)
    kept = total - sum(loss_estimate(s, allocation.ranks[s.key]) for s in sites)
    capped = all(allocation.ranks[s.key] == s.max_rank for s in sites)
    assert kept >= 0.9 * total - 1e-9 or capped


def test_global_rewrite_meets_the_budget_and_beats_uniform(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(24, 48, 48, 16))
    x = _correlated(rng, 32, 6, 24)
    batches = _batches({"x": x}, 16)
    from onnxsvd.calibrate import calibrate
    from tests.models import assert_valid, run

    statistics = calibrate(model, batches)
    uniform = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.4, align=1), method="whiten"), statistics)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.4, align=1), method="whiten", allocate="global")
    result = rewrite(model, config, statistics, batches=batches)
    assert_valid(result.model)
    sites = [site for site in result.report.sites if site.shape]
    budget = int(np.floor(0.4 * sum(site.params_before for site in sites)))
    assert sum(site.params_after for site in sites if site.action == "factorized") <= budget
    assert any("global allocation" in note for note in result.report.notes)
    assert len({site.rank for site in sites}) > 1  # the ranks differ between layers
    (reference,) = run(model, {"x": x})
    (out_uniform,) = run(uniform.model, {"x": x})
    (out_global,) = run(result.model, {"x": x})
    assert np.linalg.norm(out_global - reference) <= np.linalg.norm(out_uniform - reference) * 1.05


def test_global_allocation_refuses_a_fixed_rank(rng: np.random.Generator) -> None:
    with pytest.raises(UsageError, match="allocate global"):
        rewrite(_mlp(rng), RewriteConfig(policy=RankPolicy("rank", 4), allocate="global"))


def _model_with_a_dead_branch(rng: np.random.Generator) -> onnx.ModelProto:
    """x [B, S, 24] → fc0 → Relu → fc1 → y, plus a site ``side`` whose output is multiplied by 0 and added:
    truncating ``side`` alone cannot move the outputs, so its sensitivity cannot be measured."""

    def weight(k: int, n: int) -> np.ndarray:
        u, _ = np.linalg.qr(rng.standard_normal((k, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        return ((u[:, : min(k, n)] * np.exp(-np.arange(min(k, n)) / 6.0)) @ v[: min(k, n), :]).astype(np.float32)

    tensors = [
        numpy_helper.from_array(weight(24, 48), "w0"),
        numpy_helper.from_array(weight(24, 48), "ws"),
        numpy_helper.from_array(weight(48, 32), "w1"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("MatMul", ["x", "ws"], ["s0"], name="side"),
        helper.make_node("Mul", ["s0", "zero"], ["s1"], name="mute"),
        helper.make_node("Add", ["h0", "s1"], ["h1"], name="join"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w1"], ["y"], name="fc1"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 32])],
        tensors,
    )


def test_an_estimated_sensitivity_is_reported_with_its_reason(rng: np.random.Generator) -> None:
    model = _model_with_a_dead_branch(rng)
    batches = _batches({"x": _correlated(rng, 32, 6, 24)}, 16)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5), allocate="global")
    result = rewrite(model, config, batches=batches)
    sites = {site.name: site for site in result.report.sites}
    assert sites["side"].sensitivity_estimated
    assert sites["side"].sensitivity_reason.startswith("truncating it alone to ranks")
    assert "did not change the outputs" in sites["side"].sensitivity_reason
    measured = [sites[name].sensitivity for name in ("fc0", "fc1")]
    assert not sites["fc0"].sensitivity_estimated and not sites["fc1"].sensitivity_estimated
    assert all(value is not None and value > 0 for value in measured)
    assert sites["side"].sensitivity == pytest.approx(float(np.median(measured)))
    (note,) = [note for note in result.report.notes if note.startswith("estimated sensitivities")]
    assert "1 of 3 sites could not be measured" in note and "side: truncating it alone" in note
    report = result.report.to_dict()
    fields = {site["name"]: site for site in report["sites"]}
    assert fields["side"]["sensitivity_estimated"] is True and fields["fc0"]["sensitivity_estimated"] is False
    assert result.report.policy == "ratio 0.5 of all sites' parameters together (global allocation)"


def test_global_allocation_without_batches_is_refused(rng: np.random.Generator) -> None:
    # A statistics file holds no batches: allocating without measured sensitivities was silently worse.
    from onnxsvd.calibrate import calibrate

    model = _mlp(rng, widths=(24, 48, 48, 16))
    statistics = calibrate(model, _batches({"x": _correlated(rng, 32, 6, 24)}, 16))
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5), method="whiten", allocate="global")
    with pytest.raises(UsageError, match=r"pass --data DATA \(not --stats\)"):
        rewrite(model, config, statistics)


def test_global_ranks_are_aligned_floored_and_under_break_even(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(24, 48, 48, 16))
    batches = _batches({"x": _correlated(rng, 32, 6, 24)}, 16)
    for ratio in (0.45, 0.6, 0.8):
        result = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", ratio), allocate="global"), batches=batches)
        for site in result.report.sites:
            if site.action == "factorized":
                assert site.rank % 8 == 0 and site.rank >= 8, (ratio, site.name, site.rank)
                assert site.rank * (site.shape[0] + site.shape[1]) < site.shape[0] * site.shape[1]
        sites = [site for site in result.report.sites if site.action == "factorized"]
        assert sum(site.params_after for site in sites) <= np.floor(ratio * sum(s.params_before for s in sites))


def test_a_global_budget_under_the_floors_is_refused_in_one_line(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxsvd.pipeline import allocation

    def not_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the budget is refused before any SVD or sensitivity run")

    monkeypatch.setattr(allocation, "spectrum", not_reached)
    monkeypatch.setattr(allocation, "measure_sensitivities", not_reached)
    model = _mlp(rng, widths=(24, 48, 48, 16))
    batches = _batches({"x": _correlated(rng, 32, 6, 24)}, 16)
    with pytest.raises(UsageError, match=r"use --ratio 0\.\d+ or more") as refused:
        rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.05), allocate="global"), batches=batches)
    assert "\n" not in str(refused.value)
