"""The sequential rewrite: its exact closed form, its speed check, and layers that fail numerically.

Legend: T calibration rows, K input channels, N output channels, r rank; ``X`` the original model's
activation ``[T, K]``, ``X̃`` the partly compressed model's, ``λ`` the ridge (absolute).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import scipy.linalg

from onnxsvd.calibrate.stats import ActivationStats
from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.factorize import SvdOptions, decompose, truncate
from onnxsvd.pipeline import sequential
from onnxsvd.pipeline.group import GroupOutcome
from onnxsvd.pipeline.sequential import CrossStats, rewrite_sequential
from tests.models import assert_valid, run
from tests.test_calibrate import _batches, _correlated, _mlp


def _cross_stats(x: np.ndarray, x_tilde: np.ndarray) -> CrossStats:
    """``X̃ᵀX̃``, ``|x̃|`` sums and ``X̃ᵀX`` of two ``[T, K]`` activations."""
    gram = x_tilde.T @ x_tilde  # [K, K]
    magnitude = np.abs(x_tilde)  # [T, K]
    return CrossStats(
        ActivationStats(gram, magnitude.sum(axis=0), magnitude.max(axis=0), x.shape[0]), x_tilde.T @ x
    )


def _ridge(config: RewriteConfig, x_tilde: np.ndarray) -> float:
    """The absolute λ of the damped problem: ``ridge · mean(diag X̃ᵀX̃)`` (floored as the code floors it)."""
    return max(config.ridge, 1e-10) * float(np.mean(np.sum(x_tilde * x_tilde, axis=0)))


def _damped_error(x, x_tilde, weight, candidate, ridge: float) -> float:
    """``‖X W − X̃ W'‖² + λ ‖W − W'‖²``: the problem the sequential whitening solves."""
    return float(np.sum((x @ weight - x_tilde @ candidate) ** 2) + ridge * np.sum((weight - candidate) ** 2))


def _brute_force(x, x_tilde, weight, rank: int, ridge: float) -> np.ndarray:
    """The rank-r minimiser of the damped problem, written out in numpy: ``G_λ = X̃ᵀX̃ + λI = L Lᵀ``,
    ``W_ls = G_λ⁻¹ (X̃ᵀX W + λ W)``, ``W' = L⁻ᵀ trunc_r(Lᵀ W_ls)``."""
    damped = x_tilde.T @ x_tilde + ridge * np.eye(x.shape[1])  # [K, K]
    lower = np.linalg.cholesky(damped)  # [K, K]
    least_squares = np.linalg.solve(damped, x_tilde.T @ x @ weight + ridge * weight)  # [K, N]
    u, s, vt = np.linalg.svd(lower.T @ least_squares, full_matrices=False)  # [K, m], [m], [m, N]
    return np.linalg.solve(lower.T, (u[:, :rank] * s[:rank]) @ vt[:rank])  # [K, N]


def _sequential_whiten(config: RewriteConfig, x, x_tilde, weight, rank: int) -> np.ndarray:
    """The sequential whitening's rank-r layer, through the calls :func:`factor_group` makes."""
    target, refit = sequential._level_fit(config, _cross_stats(x, x_tilde))
    assert refit is None
    goal, metric = target([], weight)  # [K, N], Lᵀ
    decomposition = decompose(goal, metric, options=SvdOptions(solver="exact", backend="numpy"))
    return truncate(decomposition, [rank], np.float64).product()  # [K, N]


def _activations(rng: np.random.Generator, rows: int = 300, k: int = 12, n: int = 9, decay: float = 3.0):
    mixing = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / decay)[None, :]  # correlated channels
    x = rng.standard_normal((rows, k)) @ mixing.T  # X [T, K]
    x_tilde = x + 0.3 * rng.standard_normal((rows, k)) @ mixing.T  # X̃ [T, K]: upstream compression error
    weight = rng.standard_normal((k, n))  # [K, N]
    return x, x_tilde, weight


def test_sequential_uses_the_outcomes_the_speed_check_returns(rng: np.random.Generator) -> None:
    """A speed check may return new outcome objects instead of mutating its argument."""
    model = _mlp(rng)
    batches = _batches({"x": _correlated(rng, 32, 4, 24)}, 16)
    config = RewriteConfig(policy=RankPolicy("rank", 4, align=1), method="whiten")
    seen: list[list[str]] = []

    def replacing_check(model: onnx.ModelProto, outcomes: list[GroupOutcome], base_dir: str | None):
        seen.append([o.sites[0].name for o in outcomes])
        return [
            dataclasses.replace(o, factorization=None, ranks=[], rank=0, reason="fake check: slower")
            if o.sites[0].name == "fc0"
            else dataclasses.replace(o)
            for o in outcomes
        ]

    result = rewrite_sequential(model, config, batches, speed_check=replacing_check)
    assert seen == [["fc0"], ["fc1"], ["fc2"]]
    sites = {site.name: site for site in result.report.sites}
    assert sites["fc0"].action == "kept" and sites["fc0"].reason == "fake check: slower"
    assert sites["fc1"].action == "factorized" and sites["fc2"].action == "factorized"
    assert_valid(result.model)
    # Later levels were fitted to a model with fc0 dense: the same as never matching fc0.
    without = rewrite_sequential(model, dataclasses.replace(config, exclude="^fc0$"), batches)
    x = _correlated(rng, 8, 4, 24)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(without.model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def _assert_one_kept(result, name: str, reason: str) -> None:
    sites = {site.name: site for site in result.report.sites}
    assert sites[name].action == "kept" and reason in sites[name].reason, sites[name].reason
    assert all(site.action == "factorized" for other, site in sites.items() if other != name), sites
    assert_valid(result.model)
    (output,) = run(result.model, {"x": np.ones((2, 3, 24), dtype=np.float32)})
    assert np.all(np.isfinite(output))


@pytest.mark.parametrize("method", ["whiten", "asvd", "svd"])
def test_a_non_finite_cross_gram_keeps_that_layer_dense(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    collect = sequential._collect_cross

    def poisoned(*args, **kwargs):
        stats = collect(*args, **kwargs)
        if "r0" in stats:  # fc1's input
            stats["r0"].cross[0, 0] = np.nan
        return stats

    monkeypatch.setattr(sequential, "_collect_cross", poisoned)
    config = RewriteConfig(policy=RankPolicy("rank", 4, align=1), method=method)
    result = rewrite_sequential(_mlp(rng), config, _batches({"x": _correlated(rng, 16, 4, 24)}, 8))
    _assert_one_kept(result, "fc1", "NaN or Inf")


def test_a_failed_least_squares_solve_keeps_that_layer_dense(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")

    lstsq = scipy.linalg.lstsq

    def failing_once(*args, **kwargs):
        if len(calls) == 1:
            return failing()
        return lstsq(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "cho_factor", failing)
    monkeypatch.setattr(scipy.linalg, "lstsq", failing_once)
    config = RewriteConfig(policy=RankPolicy("rank", 4, align=1), method="svd")
    result = rewrite_sequential(_mlp(rng), config, _batches({"x": _correlated(rng, 16, 4, 24)}, 8))
    _assert_one_kept(result, "fc0", "least-squares solve failed")
