"""Rank policies and the break-even guard. Pure arithmetic on shapes and spectra.

Legend: K input channels, N output channels, r rank, σ singular values (descending).

A rank-r chain stores ``r·(K+N)`` parameters in place of ``K·N``; it is smaller and cheaper only while
``r·(K+N) < K·N``. The ratio ρ is the kept fraction of the layer's parameters: ``r = ⌊ρ·K·N/(K+N)⌋``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxsvd.config import RankPolicy

__all__ = ["RankDecision", "break_even_rank", "energy_rank", "ratio_rank", "choose_rank", "align_rank"]


@dataclasses.dataclass(frozen=True)
class RankDecision:
    """What a policy chose for one weight.

    Attributes:
        rank: the total rank (0 when the layer stays dense).
        dense: True when the layer stays dense.
        reason: why it stays dense, or how the rank was chosen.
    """

    rank: int
    dense: bool
    reason: str


def break_even_rank(k: int, n: int) -> int:
    """Smallest ``r`` with ``r·(K+N) ≥ K·N``: from this rank on, the chain is no smaller than ``W``."""
    return math.ceil(k * n / (k + n))


def ratio_rank(k: int, n: int, ratio: float) -> int:
    """``⌊ρ·K·N/(K+N)⌋``, at least 1."""
    return max(1, math.floor(ratio * k * n / (k + n)))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ β·Σ σ_i²`` (at least 1)."""
    squared = np.asarray(singular_values, dtype=np.float64) ** 2  # [m]
    total = float(squared.sum())
    if total <= 0.0:
        return 1
    cumulative = np.cumsum(squared) / total  # [m]
    # A tiny slack so β = 1.0 is reached despite rounding in the cumulative sum.
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, squared.shape[0]))


def align_rank(rank: int, align: int, limit: int, round_up: bool) -> int:
    """Round ``rank`` to a multiple of ``align`` (down, or up for energy targets) when that stays useful.

    Ranks below ``align`` are left alone (a tiny layer would otherwise jump to ``align`` or to 0), and an
    upward rounding that would cross ``limit`` is not taken.
    """
    if align <= 1 or rank < align:
        return rank
    if round_up:
        up = math.ceil(rank / align) * align
        return up if up < limit else rank
    return (rank // align) * align


def choose_rank(policy: RankPolicy, k: int, n: int, singular_values: np.ndarray | None) -> RankDecision:
    """Apply a rank policy and the break-even guard to one ``[K, N]`` weight.

    Args:
        policy: the policy (fixed rank, ratio or energy, with alignment and growth settings).
        k: input channels.
        n: output channels.
        singular_values: the weight's spectrum in the chosen metric (needed for ``energy``).
    """
    full = min(k, n)
    even = break_even_rank(k, n)
    if policy.kind == "rank":
        rank = int(policy.value)
        how = f"fixed rank {rank}"
    elif policy.kind == "ratio":
        rank = align_rank(ratio_rank(k, n, policy.value), policy.align, even, round_up=False)
        how = f"ratio {policy.value:g}"
    elif policy.kind == "energy":
        if singular_values is None:
            raise ValueError("the energy policy needs the singular values")
        if float(np.sum(np.asarray(singular_values, dtype=np.float64) ** 2)) <= 0.0:
            return RankDecision(0, True, "weight is all zeros")
        rank = align_rank(energy_rank(singular_values, policy.value), policy.align, even, round_up=True)
        how = f"energy {policy.value:g}"
    else:  # pragma: no cover - RankPolicy validates kind
        raise ValueError(f"unknown rank policy {policy.kind!r}")
    rank = min(rank, full)
    if rank * (k + n) >= k * n and not policy.allow_growth:
        return RankDecision(
            0,
            True,
            f"{how} gives rank {rank} ≥ break-even {even} (r·(K+N) ≥ K·N); use --allow-growth to force",
        )
    return RankDecision(rank, False, how)
