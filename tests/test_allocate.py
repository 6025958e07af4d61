"""Global rank allocation (issue 6): budget, loss estimate against uniform, and the rewrite path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.pipeline import rewrite
from onnxsvd.rank import AllocationSite, allocate_budget, allocate_energy, loss_estimate, uniform_ranks
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
    seed=st.integers(0, 10_000), count=st.integers(1, 8), ratio=st.floats(0.1, 0.9), align=st.sampled_from([1, 4, 8])
)
def test_budget_is_met_and_uniform_is_never_better(seed: int, count: int, ratio: float, align: int) -> None:
    sites = _sites(seed, count)
    allocation = allocate_budget(sites, ratio, align)
    budget = int(np.floor(ratio * sum(s.k * s.n for s in sites)))
    params = sum(allocation.ranks[s.key] * (s.k + s.n) for s in sites)
    assert params == allocation.params
    minimum_params = sum(min(max(align, 1), s.max_rank) * (s.k + s.n) for s in sites)
    if minimum_params <= budget:
        assert params <= budget
        # Exact use of the budget: no single rank step that is still open would fit in what is left.
        open_steps = [s.k + s.n for s in sites if allocation.ranks[s.key] < s.max_rank]
        assert not open_steps or budget - params < min(open_steps)
    uniform = uniform_ranks(sites, ratio, align)
    if sum(uniform[s.key] * (s.k + s.n) for s in sites) <= budget:
        uniform_loss = sum(loss_estimate(s, uniform[s.key]) for s in sites)
        assert allocation.loss <= uniform_loss * (1 + 1e-12) + 1e-15
    for site in sites:
        assert 1 <= allocation.ranks[site.key] <= site.max_rank


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
