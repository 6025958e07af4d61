"""SVD factorization: Eckart–Young errors, residual stages, metrics. ndarrays only, checked against numpy.

Legend: K input channels (rows of W), N output channels, r rank, σ singular values of W.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxsvd.errors import FactorizationError
from onnxsvd.factorize import (
    decompose,
    diagonal_metric,
    factorize,
    identity_metric,
    split_rank,
    truncate,
    whitening_metric,
)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


def _spectrum(weight: np.ndarray) -> np.ndarray:
    return np.linalg.svd(weight, compute_uv=False)  # [min(K, N)], descending


def wide_range_weight(rng: np.random.Generator, k: int, n: int, high: float = 3.0, low: float = -7.0) -> np.ndarray:
    """``U diag(σ) Vᵀ`` with σ spread log-uniformly over ``[10^low, 10^high]``: ``[K, N]``."""
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))  # [K, K]
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))  # [N, N]
    m = min(k, n)
    return (u[:, :m] * np.logspace(high, low, m)[None, :]) @ v[:, :m].T  # [K, N]


@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_reduced_rank_error_is_the_discarded_energy(shape: tuple[int, int], seed: int, data: st.DataObject) -> None:
    k, n = shape
    rank = data.draw(st.integers(1, min(k, n)), label="rank")
    weight = np.random.default_rng(seed).standard_normal((k, n))  # [K, N]
    sigma = _spectrum(weight)
    discarded = float(np.sqrt(np.sum(sigma[rank:] ** 2)))
    norm = float(np.linalg.norm(weight))
    exact = factorize(weight, [rank], storage_dtype=np.float64)
    ((a, b),) = exact.stages
    assert a.shape == (k, rank) and b.shape == (rank, n)
    assert a.dtype == np.float64 and b.dtype == np.float64
    assert abs(np.linalg.norm(weight - a @ b) - discarded) <= 1e-10 * norm
    assert exact.kept_energy == pytest.approx(float(np.sum(sigma[:rank] ** 2) / np.sum(sigma**2)), rel=1e-12)
    # Stored in float32 the error grows only by the rounding of the factors.
    stored = factorize(weight, [rank])
    assert stored.stages[0][0].dtype == np.float32 and stored.stages[0][1].dtype == np.float32
    assert abs(np.linalg.norm(weight - stored.product()) - discarded) <= 1e-6 * norm


def test_singular_values_are_split_evenly_across_the_factors(rng: np.random.Generator) -> None:
    weight = rng.standard_normal((30, 20)) * 100.0  # [K, N]
    ((a, b),) = factorize(weight, [12], storage_dtype=np.float64).stages
    root = np.sqrt(_spectrum(weight)[:12])
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), root, rtol=1e-10)  # columns of A
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), root, rtol=1e-10)  # rows of B


@given(k=st.integers(4, 48), n=st.integers(4, 48), seed=st.integers(0, 2**16), data=st.data())
def test_fp32_residual_stages_equal_one_svd_of_the_summed_rank(k: int, n: int, seed: int, data: st.DataObject) -> None:
    total = data.draw(st.integers(2, min(k, n)), label="total")
    stages = data.draw(st.integers(2, min(total, 4)), label="stages")
    ranks = split_rank(total, stages)
    rng = np.random.default_rng(seed)
    # A spectrum with clear gaps, so the rank-R subspace is well defined and rounding cannot rotate it.
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    m = min(k, n)
    sigma = 10.0 * 0.8 ** np.arange(m)
    weight = (u[:, :m] * sigma) @ v[:, :m].T  # [K, N]
    staged = factorize(weight, ranks, storage_dtype=np.float32)
    single = factorize(weight, [total], storage_dtype=np.float32)
    assert [a.shape[1] for a, _ in staged.stages] == ranks
    assert staged.rank == single.rank == total
    difference = np.linalg.norm(staged.product() - single.product())
    assert difference <= 1e-5 * np.linalg.norm(single.product())
    assert staged.kept_energy == pytest.approx(single.kept_energy, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ranks", [(16, 8), (8, 8)])
def test_fp16_residual_stages_beat_one_fp16_svd_of_the_same_rank(seed: int, ranks: tuple[int, int]) -> None:
    weight = wide_range_weight(np.random.default_rng(seed), 64, 48)  # [K, N]
    staged = factorize(weight, list(ranks), storage_dtype=np.float16)
    single = factorize(weight, [sum(ranks)], storage_dtype=np.float16)
    assert all(a.dtype == np.float16 and b.dtype == np.float16 for a, b in staged.stages)
    staged_error = np.linalg.norm(weight - staged.product())
    single_error = np.linalg.norm(weight - single.product())
    # Both carry the same truncation error; stage 2 also corrects stage 1's fp16 rounding, which has
    # rank ≤ 2·r₁ (δA·B + A·δB) and so is mostly captured.
    discarded = np.sqrt(np.sum(_spectrum(weight)[sum(ranks) :] ** 2))
    assert discarded < single_error
    assert staged_error < single_error


def test_later_stages_factor_the_rounded_residual(rng: np.random.Generator) -> None:
    weight = wide_range_weight(rng, 40, 32)
    staged = factorize(weight, [6, 5], storage_dtype=np.float16)
    (a1, b1), (a2, b2) = staged.stages
    residual = weight - a1.astype(np.float64) @ b1.astype(np.float64)  # what the stored stage 1 leaves
    best = factorize(residual, [5], storage_dtype=np.float64).product()
    second = a2.astype(np.float64) @ b2.astype(np.float64)
    assert np.linalg.norm(second - best) <= 1e-2 * np.linalg.norm(best)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weight_is_a_factorization_error(bad: float) -> None:
    weight = np.ones((4, 5))
    weight[1, 2] = bad
    with pytest.raises(FactorizationError, match="NaN or Inf"):
        factorize(weight, [2])


def test_ranks_out_of_range_are_factorization_errors(rng: np.random.Generator) -> None:
    decomposition = decompose(rng.standard_normal((6, 4)))
    with pytest.raises(FactorizationError, match="exceeds min"):
        truncate(decomposition, [3, 2], np.float32)
    with pytest.raises(FactorizationError, match="at least 1"):
        truncate(decomposition, [0], np.float32)


def test_all_zero_weight_keeps_all_energy_and_factors_to_zero() -> None:
    factorization = factorize(np.zeros((5, 7)), [2])
    assert factorization.kept_energy == 1.0
    assert np.all(factorization.product() == 0.0)


@given(total=st.integers(1, 500), stages=st.integers(1, 12))
def test_split_rank(total: int, stages: int) -> None:
    ranks = split_rank(total, stages)
    assert len(ranks) == stages and sum(ranks) == total
    assert ranks == sorted(ranks, reverse=True) and ranks[0] - ranks[-1] <= 1


def test_split_rank_examples() -> None:
    assert split_rank(10, 3) == [4, 3, 3]
    assert split_rank(8, 1) == [8]
    with pytest.raises(ValueError):
        split_rank(8, 0)


def test_whitened_factorization_is_optimal_in_the_data_metric(rng: np.random.Generator) -> None:
    k, n, rows, rank = 24, 16, 200, 6
    activations = rng.standard_normal((rows, k)) * np.linspace(0.1, 3.0, k)  # [T, K], uneven channels
    weight = rng.standard_normal((k, n))  # [K, N]
    gram = activations.T @ activations  # [K, K]
    metric = whitening_metric(gram, damping=0.0)
    assert metric.kind == "cholesky"
    factorization = factorize(weight, [rank], metric=metric, storage_dtype=np.float64)
    # ‖X W − X A B‖_F = ‖Lᵀ (W − A B)‖_F: the discarded singular values of Lᵀ W.
    lower = np.linalg.cholesky(gram)  # [K, K]
    discarded = np.sqrt(np.sum(_spectrum(lower.T @ weight)[rank:] ** 2))
    data_error = np.linalg.norm(activations @ (weight - factorization.product()))
    assert data_error == pytest.approx(discarded, rel=1e-6)
    plain = factorize(weight, [rank], storage_dtype=np.float64)
    assert data_error < np.linalg.norm(activations @ (weight - plain.product()))


def test_whitening_a_singular_gram_stays_finite(rng: np.random.Generator) -> None:
    activations = rng.standard_normal((5, 20))  # [T, K] with T < K: G has rank 5
    activations[:, 3] = 0.0  # a dead channel
    metric = whitening_metric(activations.T @ activations, damping=0.0)
    factorization = factorize(rng.standard_normal((20, 12)), [4], metric=metric)
    assert all(np.all(np.isfinite(a)) and np.all(np.isfinite(b)) for a, b in factorization.stages)


def test_diagonal_metric_scales_rows(rng: np.random.Generator) -> None:
    mean_abs = rng.uniform(0.1, 4.0, 10)  # [K]
    metric = diagonal_metric(mean_abs, alpha=0.5)
    weight = rng.standard_normal((10, 8))
    np.testing.assert_allclose(metric.apply(weight), np.sqrt(mean_abs)[:, None] * weight)
    np.testing.assert_allclose(metric.unapply(metric.apply(weight)), weight)
    with pytest.raises(FactorizationError, match="degenerate"):
        diagonal_metric(np.zeros(10))


def test_identity_metric_is_plain_svd(rng: np.random.Generator) -> None:
    weight = rng.standard_normal((9, 7))
    plain = factorize(weight, [3], storage_dtype=np.float64).product()
    through_metric = factorize(weight, [3], metric=identity_metric(), storage_dtype=np.float64).product()
    np.testing.assert_array_equal(plain, through_metric)
    np.testing.assert_allclose(decompose(weight).s, _spectrum(weight), rtol=1e-12)
