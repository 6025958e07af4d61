"""Rank policies and the break-even guard: pure arithmetic, checked against the definitions."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxsvd import RankPolicy, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.rank import align_rank, break_even_rank, choose_rank, energy_rank, ratio_rank

channels = st.integers(min_value=1, max_value=4096)
ratios = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
energies = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
spectra = st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=64).map(
    lambda values: np.sort(np.asarray(values, dtype=np.float64))[::-1]
)


@settings(max_examples=300)
@given(k=channels, n=channels)
def test_break_even_rank_is_the_smallest_rank_that_does_not_shrink(k: int, n: int) -> None:
    even = break_even_rank(k, n)
    assert even * (k + n) >= k * n
    assert (even - 1) * (k + n) < k * n


@pytest.mark.parametrize(
    ("k", "n", "expected"), [(1, 1, 1), (4, 4, 2), (64, 256, 52), (256, 256, 128), (768, 3072, 615)]
)
def test_break_even_rank_examples(k: int, n: int, expected: int) -> None:
    assert break_even_rank(k, n) == expected


def _floor_candidates(k: int, n: int, ratio: float) -> set[int]:
    """``max(1, ⌊ρ·K·N/(K+N)⌋)`` in exact arithmetic; a value within 1e-9 under an integer may round up
    in floating point (``--ratio 0.3333333333333333`` on 99×198 means 22, not 21.999…), so both count."""
    exact = Fraction(ratio) * k * n / (k + n)
    return {max(1, math.floor(exact)), max(1, math.floor(exact + Fraction(1, 10**9)))}


def _aligned(raw: int) -> int:
    return raw - raw % 8 if raw >= 8 else raw


@settings(max_examples=300)
@given(k=channels, n=channels, ratio=ratios)
def test_ratio_policy_follows_the_formula_with_alignment_and_break_even(k: int, n: int, ratio: float) -> None:
    decision = choose_rank(RankPolicy("ratio", ratio, min_rank=1), k, n, None)
    expectations = set()
    for raw in _floor_candidates(k, n, ratio):
        rank = min(_aligned(raw), k, n)
        expectations.add((0, True) if rank * (k + n) >= k * n else (rank, False))
    assert (decision.rank, decision.dense) in expectations
    if decision.dense:
        assert "break-even" in decision.reason and "--allow-growth" in decision.reason
    else:
        assert decision.rank * (k + n) < k * n
        if decision.rank >= 8:
            assert decision.rank % 8 == 0


@settings(max_examples=300)
@given(k=channels, n=channels, ratio=ratios)
def test_ratio_rank_without_alignment(k: int, n: int, ratio: float) -> None:
    assert ratio_rank(k, n, ratio) in _floor_candidates(k, n, ratio)
    decision = choose_rank(RankPolicy("ratio", ratio, align=1, allow_growth=True), k, n, None)
    assert decision.rank == min(ratio_rank(k, n, ratio), k, n)


def test_ratio_examples() -> None:
    # 256×256 at ρ = 0.5: ⌊0.5·65536/512⌋ = 64, already a multiple of 8.
    assert choose_rank(RankPolicy("ratio", 0.5), 256, 256, None).rank == 64
    # 64×256 at ρ = 0.5: ⌊0.5·16384/320⌋ = 25 → 24 (aligned down).
    assert choose_rank(RankPolicy("ratio", 0.5), 64, 256, None).rank == 24
    # 4×64 at ρ = 0.5: ⌊0.5·256/68⌋ = 1, below the alignment: left alone (with the floor lowered to 1).
    assert choose_rank(RankPolicy("ratio", 0.5, min_rank=1), 4, 64, None).rank == 1
    # ρ = 1 on 8×8: ⌊64/16⌋ = 4 = break-even: dense.
    assert choose_rank(RankPolicy("ratio", 1.0), 8, 8, None).dense


def _energy_share(spectrum: np.ndarray, rank: int) -> tuple[float, float]:
    squared = [float(v) ** 2 for v in spectrum]
    return math.fsum(squared[:rank]), math.fsum(squared)


@settings(max_examples=300)
@given(spectrum=spectra, energy=energies)
def test_energy_rank_is_the_smallest_rank_keeping_the_share(spectrum: np.ndarray, energy: float) -> None:
    rank = energy_rank(spectrum, energy)
    assert 1 <= rank <= spectrum.size
    kept, total = _energy_share(spectrum, rank)
    if total == 0.0:
        assert rank == 1
        return
    tolerance = 1e-9 * total
    assert kept >= energy * total - tolerance
    if rank > 1:
        kept_one_less, _ = _energy_share(spectrum, rank - 1)
        assert kept_one_less < energy * total + tolerance


def test_energy_rank_examples() -> None:
    spectrum = np.array([3.0, 2.0, 1.0, 0.0])  # σ² = 9, 4, 1, 0 of 14
    assert energy_rank(spectrum, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(spectrum, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(spectrum, 0.95) == 3
    assert energy_rank(spectrum, 1.0) == 3  # the zero tail adds nothing


@settings(max_examples=300)
@given(k=st.integers(8, 300), n=st.integers(8, 300), energy=energies, seed=st.integers(0, 2**16))
def test_energy_policy_rounds_up_to_the_alignment(k: int, n: int, energy: float, seed: int) -> None:
    spectrum = np.sort(np.random.default_rng(seed).gamma(0.5, size=min(k, n)))[::-1]
    smallest = energy_rank(spectrum, energy)
    unaligned = choose_rank(RankPolicy("energy", energy, align=1, allow_growth=True), k, n, spectrum)
    assert unaligned.rank == smallest
    aligned = choose_rank(RankPolicy("energy", energy, align=8, allow_growth=True, min_rank=1), k, n, spectrum)
    assert aligned.rank >= smallest
    up = math.ceil(smallest / 8) * 8
    if smallest >= 8 and up < break_even_rank(k, n):
        assert aligned.rank == min(up, k, n)
    else:
        assert aligned.rank == smallest


@pytest.mark.parametrize(("k", "n", "rank"), [(4, 64, 1), (64, 10, 4), (256, 10, 4)])
def test_a_ratio_rank_under_the_floor_keeps_the_layer_dense(k: int, n: int, rank: int) -> None:
    # The digits ViT's 4×64 patch embedding and 64×10 head, the MLP's 256×10 head, at ratio 0.5.
    decision = choose_rank(RankPolicy("ratio", 0.5), k, n, None)
    assert decision.dense and decision.rank == 0
    assert f"ratio 0.5 gives rank {rank} < --min-rank 8: kept dense" in decision.reason
    assert f"--min-rank {rank} factorizes it" in decision.reason
    assert choose_rank(RankPolicy("ratio", 0.5, min_rank=rank), k, n, None).rank == rank
    assert choose_rank(RankPolicy("ratio", 0.5, align=4), k, n, None).dense == (rank < 4)  # floor = align


def test_alignment_is_noted_where_it_rounds_a_rank() -> None:
    # 64×64: ratio 0.7 gives ⌊0.7·4096/128⌋ = 22, aligned down to 16, the rank ratio 0.5 gives exactly.
    seven, half = (choose_rank(RankPolicy("ratio", r), 64, 64, None) for r in (0.7, 0.5))
    assert seven.rank == half.rank == 16
    assert seven.note == "rank 22 aligned down to 16 (--align 8)" and seven.reason == f"ratio 0.7: {seven.note}"
    assert half.note == "" and half.reason == "ratio 0.5"
    assert choose_rank(RankPolicy("ratio", 0.7, align=1), 64, 64, None).rank == 22
    # Below the alignment, with the floor lowered: left unaligned, and said.
    low = choose_rank(RankPolicy("ratio", 0.5, min_rank=1), 4, 64, None)
    assert low.note == "rank 1 is below --align 8: not aligned"
    # Energy rounds up unless that reaches break-even: 24×24 breaks even at 12, so rank 9 stays 9.
    spectrum = np.linspace(2.0, 1.0, 24)
    kept = choose_rank(RankPolicy("energy", 0.5), 24, 24, spectrum)
    assert kept.rank == 9 and kept.note == "rank 9 not aligned up to 16: that reaches the break-even rank 12"
    up = choose_rank(RankPolicy("energy", 0.25), 64, 64, np.linspace(2.0, 1.0, 64))
    assert up.rank == 16 and up.note == "rank 11 aligned up to 16 (--align 8)"


def test_an_energy_rank_under_the_floor_is_raised_to_it_where_that_pays() -> None:
    spectrum = np.array([10.0, 1.0] + [0.01] * 62)  # energy 0.9 needs rank 1
    raised = choose_rank(RankPolicy("energy", 0.9), 64, 64, spectrum)
    assert raised.rank == 8 and not raised.dense and raised.note == "rank 1 raised to --min-rank 8"
    # A 4×64 layer breaks even at 4: the floor 8 does not pay, so it stays dense.
    small = choose_rank(RankPolicy("energy", 0.9), 4, 64, np.array([10.0, 1.0, 0.1, 0.1]))
    assert small.dense and "< --min-rank 8" in small.reason


@pytest.mark.parametrize(("k", "n"), [(4, 64), (64, 64), (1, 10), (300, 7)])
def test_full_rank_is_exact_and_allowed_to_grow(k: int, n: int) -> None:
    decision = choose_rank(RankPolicy("full"), k, n, None)
    assert decision.rank == min(k, n) and not decision.dense
    assert decision.reason.startswith(f"full rank min(K, N) = {min(k, n)} (exact)")
    assert RankPolicy("full").allow_growth and RankPolicy("full").describe() == "full rank min(K, N) (exact)"


def test_a_fixed_rank_is_not_floored() -> None:
    assert choose_rank(RankPolicy("rank", 2), 64, 64, None).rank == 2


def test_energy_policy_on_an_all_zero_weight_stays_dense() -> None:
    decision = choose_rank(RankPolicy("energy", 0.9), 16, 16, np.zeros(16))
    assert decision.dense and "all zeros" in decision.reason


def test_energy_policy_needs_the_spectrum() -> None:
    with pytest.raises(ValueError, match="singular values"):
        choose_rank(RankPolicy("energy", 0.9), 16, 16, None)


@settings(max_examples=300)
@given(k=channels, n=channels, rank=st.integers(1, 5000))
def test_fixed_rank_is_clipped_and_guarded(k: int, n: int, rank: int) -> None:
    guarded = choose_rank(RankPolicy("rank", rank), k, n, None)
    grown = choose_rank(RankPolicy("rank", rank, allow_growth=True), k, n, None)
    clipped = min(rank, k, n)
    assert grown.rank == clipped and not grown.dense
    if clipped * (k + n) >= k * n:
        assert guarded.dense and "break-even" in guarded.reason and "--allow-growth" in guarded.reason
    else:
        assert guarded.rank == clipped and not guarded.dense


@settings(max_examples=300)
@given(rank=st.integers(0, 10_000), align=st.integers(1, 64), limit=st.integers(1, 10_000))
def test_align_rank(rank: int, align: int, limit: int) -> None:
    down = align_rank(rank, align, limit, round_up=False)
    up = align_rank(rank, align, limit, round_up=True)
    if align == 1 or rank < align:
        assert down == up == rank
        return
    assert down % align == 0 and rank - align < down <= rank
    if math.ceil(rank / align) * align < limit:
        assert up % align == 0 and rank <= up < rank + align
    else:
        assert up == rank


@pytest.mark.parametrize(
    ("kind", "value", "flag"),
    [
        ("ratio", 0.0, "--ratio"),
        ("ratio", -0.1, "--ratio"),
        ("ratio", 1.5, "--ratio"),
        ("energy", 0.0, "--energy"),
        ("energy", 1.01, "--energy"),
        ("rank", 0, "--rank"),
        ("rank", -3, "--rank"),
        ("rank", 2.5, "--rank"),
    ],
)
def test_policy_rejects_values_out_of_range(kind: str, value: float, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        RankPolicy(kind, value)


def test_policy_rejects_unknown_kind_and_bad_alignment() -> None:
    with pytest.raises(UsageError, match="unknown rank policy"):
        RankPolicy("budget", 0.5)
    with pytest.raises(UsageError, match="--align"):
        RankPolicy("ratio", 0.5, align=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stages": 0}, "--stages"),
        ({"stage_ranks": (4, 0)}, "--stage-ranks"),
        ({"layout": "diagonal"}, "unknown layout"),
        ({"method": "pca"}, "unknown method"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"min_params": -1}, "--min-params"),
        ({"include": "("}, "--include"),
        ({"exclude": "[a"}, "--exclude"),
    ],
)
def test_rewrite_config_rejects_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        RewriteConfig(**fields)


def test_stage_ranks_set_the_number_of_stages() -> None:
    assert RewriteConfig(stage_ranks=(8, 4, 2)).stages == 3
