"""Rank policies and the break-even guard. Pure arithmetic on shapes and spectra.

Legend: K input channels, N output channels, r rank, σ singular values (descending).

A rank-r chain stores ``r·(K+N)`` parameters in place of ``K·N``. The ratio ρ is the kept fraction of
the layer's parameters: ``r = ⌊ρ·K·N/(K+N)⌋``.

The break-even guard counts bytes, not parameters (:class:`ByteCost`): the chain stays only while
``r·(K+N)·b_f < D``, with ``b_f`` the bytes of one factor value in the factors' dtype and ``D`` the bytes
of the weight as stored. For a float weight whose factors keep its dtype this is ``r·(K+N) < K·N``; an
int8 weight behind ``DequantizeLinear`` (``D = K·N`` plus its scale and zero point) breaks even four
times earlier with fp32 factors, and fp16 factors of an fp32 weight twice as late.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxsvd.config import RankPolicy

__all__ = [
    "ByteCost",
    "RankDecision",
    "break_even_rank",
    "guard_rank",
    "energy_rank",
    "ratio_rank",
    "choose_rank",
    "align_rank",
]


@dataclasses.dataclass(frozen=True)
class RankDecision:
    """What a policy chose for one weight.

    Attributes:
        rank: the total rank (0 when the layer stays dense).
        dense: True when the layer stays dense.
        reason: why it stays dense, or how the rank was chosen.
        note: how the policy's own rank was rounded (aligned down or up, left unaligned, raised to the
            floor), also in ``reason``; ``""`` when it was taken as it came.
    """

    rank: int
    dense: bool
    reason: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ByteCost:
    """What one weight costs in bytes: dense as stored, and per value of its factor chain.

    Attributes:
        dense_bytes: ``D``, the weight as stored (an int8 payload with its scale and zero point; two
            bytes a value for fp16 or bf16, four for fp32).
        factor_itemsize: ``b_f``, the bytes of one factor value in the factors' dtype.
        label: what is compared, for the reasons (``"int8 weight, fp32 factors"``).
    """

    dense_bytes: int
    factor_itemsize: int
    label: str = ""

    @classmethod
    def float32(cls, k: int, n: int) -> ByteCost:
        """An fp32 ``[K, N]`` weight with fp32 factors: the bytes guard is then the parameter guard."""
        return cls(4 * k * n, 4, "fp32 weight, fp32 factors")

    def chain_bytes(self, k: int, n: int, rank: int) -> int:
        """``r·(K+N)·b_f``: the bytes of a rank-``r`` factor chain."""
        return rank * (k + n) * self.factor_itemsize


def break_even_rank(k: int, n: int, cost: ByteCost | None = None) -> int:
    """Smallest ``r`` with ``r·(K+N)·b_f ≥ D``: from this rank on, the chain is no smaller than ``W`` in
    bytes. Without ``cost``, factors in the weight's own dtype: ``r·(K+N) ≥ K·N``."""
    if cost is None:
        return math.ceil(k * n / (k + n))
    return max(1, math.ceil(cost.dense_bytes / ((k + n) * cost.factor_itemsize)))


def guard_rank(how: str, rank: int, k: int, n: int, cost: ByteCost | None, allow_growth: bool) -> RankDecision:
    """``rank`` when its chain is smaller in bytes than the dense weight (or growth is allowed); else
    dense, with the reason in bytes. ``how`` says where the rank came from (``"ratio 0.5"``)."""
    cost = cost or ByteCost.float32(k, n)
    chain, dense = cost.chain_bytes(k, n, rank), cost.dense_bytes
    if chain >= dense and not allow_growth:
        label = f" ({cost.label})" if cost.label else ""
        return RankDecision(
            0,
            True,
            f"{how} gives rank {rank} ≥ break-even {break_even_rank(k, n, cost)}: factor chain {chain:,} B ≥ "
            f"dense {dense:,} B{label}; use --allow-growth to force",
        )
    return RankDecision(rank, False, how)


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


def _aligned(rank: int, align: int, limit: int, round_up: bool) -> tuple[int, str]:
    """:func:`align_rank`, and a note saying what it did (``""`` when the rank is left as it came)."""
    if align <= 1:
        return rank, ""
    aligned = align_rank(rank, align, limit, round_up)
    if aligned < rank:
        return aligned, f"rank {rank} aligned down to {aligned} (--align {align})"
    if aligned > rank:
        return aligned, f"rank {rank} aligned up to {aligned} (--align {align})"
    if rank % align == 0:
        return rank, ""
    if rank < align:
        return rank, f"rank {rank} is below --align {align}: not aligned"
    up = math.ceil(rank / align) * align
    return rank, f"rank {rank} not aligned up to {up}: that reaches the break-even rank {limit}"


def choose_rank(
    policy: RankPolicy, k: int, n: int, singular_values: np.ndarray | None, cost: ByteCost | None = None
) -> RankDecision:
    """Apply a rank policy, its alignment and floor, and the break-even guard (in bytes) to one ``[K, N]``
    weight.

    A ratio rank is aligned down (never above the ratio), an energy rank up (never below the energy) unless
    that reaches break-even; either is then held to the floor ``policy.floor``: a ratio rank under it keeps
    the layer dense, an energy rank is raised to it where that is under break-even. A fixed rank is
    clipped to ``min(K, N)``; ``"full"`` is ``min(K, N)``, exact, growth allowed.

    Args:
        policy: the policy (fixed rank, ratio, energy or full, with alignment, floor and growth settings).
        k: input channels.
        n: output channels.
        singular_values: the weight's spectrum in the chosen metric (needed for ``energy``).
        cost: the weight's bytes as stored and its factors' bytes a value; ``None``: an fp32 weight
            with fp32 factors (the guard is then ``r·(K+N) < K·N``).
    """
    full = min(k, n)
    even = break_even_rank(k, n, cost)
    if policy.kind == "full":
        return guard_rank(f"full rank min(K, N) = {full} (exact)", full, k, n, cost, allow_growth=True)
    if policy.kind == "rank":
        rank = int(policy.value)
        how = f"fixed rank {rank}" + (f", clipped to min(K, N) = {full}" if rank > full else "")
        return guard_rank(how, min(rank, full), k, n, cost, policy.allow_growth)
    if policy.kind == "ratio":
        raw = ratio_rank(k, n, policy.value)
        rank, note = _aligned(raw, policy.align, even, round_up=False)
        how = f"ratio {policy.value:g}"
    elif policy.kind == "energy":
        if singular_values is None:
            raise ValueError("the energy policy needs the singular values")
        if float(np.sum(np.asarray(singular_values, dtype=np.float64) ** 2)) <= 0.0:
            return RankDecision(0, True, "weight is all zeros")
        raw = energy_rank(singular_values, policy.value)
        rank, note = _aligned(raw, policy.align, even, round_up=True)
        how = f"energy {policy.value:g}"
    else:  # pragma: no cover - RankPolicy validates kind
        raise ValueError(f"unknown rank policy {policy.kind!r}")
    rank = min(rank, full)
    floor = policy.floor
    if rank < floor:
        if policy.kind == "energy" and floor < even and floor <= full:  # more rank only keeps more energy
            rank, note = floor, f"rank {raw} raised to --min-rank {floor}"
        else:
            return RankDecision(
                0, True,
                f"{how} gives rank {rank} < --min-rank {floor}: kept dense (so low a rank loses much of the "
                f"layer; --min-rank {rank} factorizes it)",
                note,
            )
    decision = guard_rank(f"{how}: {note}" if note else how, rank, k, n, cost, policy.allow_growth)
    return dataclasses.replace(decision, note=note)
