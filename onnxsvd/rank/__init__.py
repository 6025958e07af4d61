"""Ranks: pure arithmetic on shapes and spectra. Per-layer policies and the break-even guard
(:mod:`onnxsvd.rank.policy`), and one budget spread over many layers (:mod:`onnxsvd.rank.allocate`)."""

from __future__ import annotations

from onnxsvd.rank.allocate import (
    Allocation,
    AllocationSite,
    allocate_budget,
    allocate_bytes,
    allocate_energy,
    allowed_ranks,
    loss_estimate,
    smallest_feasible_ratio,
    uniform_ranks,
)
from onnxsvd.rank.policy import (
    ByteCost,
    RankDecision,
    align_rank,
    break_even_rank,
    choose_rank,
    energy_rank,
    guard_rank,
    ratio_rank,
)

__all__ = [
    "Allocation",
    "AllocationSite",
    "ByteCost",
    "RankDecision",
    "align_rank",
    "allocate_budget",
    "allocate_bytes",
    "allocate_energy",
    "allowed_ranks",
    "break_even_rank",
    "choose_rank",
    "energy_rank",
    "guard_rank",
    "loss_estimate",
    "ratio_rank",
    "smallest_feasible_ratio",
    "uniform_ranks",
]
