"""Global rank allocation: distribute one parameter budget across all sites to minimise the loss.

Legend: s a site (weight group), K_s/N_s its shape, r_s its rank, σ_{s,i} its singular values in the
method's metric (whitened: ``σ²`` is output energy on the calibration data), α_s its sensitivity.

The loss estimate of a site truncated to rank r is ``L_s(r) = α_s · Σ_{i>r} σ_{s,i}²``: the discarded
energy in the data metric — absolute, not relative (a relative allocation starves the layers that carry
the most signal) — times how strongly that layer's error reaches the model's outputs (α_s, measured by
truncating the site alone; 1 without a measurement). Each rank step of site s costs ``K_s + N_s``
parameters and gains ``α_s σ_{s,r+1}²``; ``L_s`` is convex in r (σ descending), so taking steps in order
of gain per parameter is optimal for the separable problem, up to the last step's granularity.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence

import numpy as np

from onnxsvd.rank.policy import align_rank, break_even_rank, ratio_rank

__all__ = ["AllocationSite", "Allocation", "allocate_budget", "allocate_energy", "loss_estimate", "uniform_ranks"]


@dataclasses.dataclass(frozen=True)
class AllocationSite:
    """One weight to allocate a rank to.

    Attributes:
        key: identifier (the weight group).
        k: input channels.
        n: output channels.
        singular_values: ``[m]`` descending, in the method's metric.
        sensitivity: α, the scale from this site's discarded energy to the model's loss.
    """

    key: str
    k: int
    n: int
    singular_values: np.ndarray
    sensitivity: float = 1.0

    @property
    def params(self) -> int:
        return self.k * self.n

    @property
    def step_cost(self) -> int:
        return self.k + self.n

    @property
    def max_rank(self) -> int:
        """Largest rank still under break-even (``r·(K+N) < K·N``)."""
        return max(1, min(min(self.k, self.n), break_even_rank(self.k, self.n) - 1))


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Ranks per site key, the parameters they use, the budget, and the loss estimate."""

    ranks: Mapping[str, int]
    params: int
    budget: int
    loss: float
    uniform_loss: float | None = None


def loss_estimate(site: AllocationSite, rank: int) -> float:
    """``α · Σ_{i>r} σ_i²``."""
    squared = np.asarray(site.singular_values, dtype=np.float64) ** 2
    return float(site.sensitivity * squared[rank:].sum())


def _gains(site: AllocationSite, start: int, stop: int) -> float:
    squared = np.asarray(site.singular_values, dtype=np.float64) ** 2
    return float(site.sensitivity * squared[start:stop].sum())


def _greedy(
    sites: Sequence[AllocationSite], minimum: Mapping[str, int], fits: callable, align: int  # type: ignore[valid-type]
) -> dict[str, int]:
    """Raise ranks from ``minimum`` in steps of ``align`` by gain per parameter while ``fits(cost)``;
    then single steps, so the last ``align``-sized gap of the budget is used too."""
    ranks = dict(minimum)
    for step in dict.fromkeys((max(align, 1), 1)):
        heap: list[tuple[float, str]] = []
        by_key = {site.key: site for site in sites}

        def push(site: AllocationSite, step: int = step, heap: list[tuple[float, str]] = heap) -> None:
            current = ranks[site.key]
            stop = min(current + step, site.max_rank)
            if stop > current:
                gain = _gains(site, current, stop) / ((stop - current) * site.step_cost)
                heapq.heappush(heap, (-gain, site.key))

        for site in sites:
            push(site)
        while heap:
            _, key = heapq.heappop(heap)
            site = by_key[key]
            current = ranks[key]
            stop = min(current + step, site.max_rank)
            if not fits((stop - current) * site.step_cost):
                continue  # this step does not fit; a smaller or cheaper one still may
            ranks[key] = stop
            push(site)
    return ranks


def allocate_budget(sites: Sequence[AllocationSite], ratio: float, align: int = 8) -> Allocation:
    """Ranks minimising ``Σ L_s(r_s)`` subject to ``Σ r_s (K_s+N_s) ≤ ρ · Σ K_s N_s``.

    Every site gets at least rank ``min(align, max_rank)``; the budget is never exceeded, and what is
    left is smaller than the cheapest single rank step still open.
    """
    budget = math.floor(ratio * sum(site.params for site in sites))
    minimum = {site.key: min(max(align, 1), site.max_rank) for site in sites}
    used = [sum(minimum[s.key] * s.step_cost for s in sites)]
    if used[0] > budget:  # even the minimum does not fit: fall back to rank 1 everywhere
        minimum = {site.key: 1 for site in sites}
        used = [sum(site.step_cost for site in sites)]

    def fits(cost: int) -> bool:
        if used[0] + cost <= budget:
            used[0] += cost
            return True
        return False

    greedy = _greedy(sites, minimum, fits, align)
    # Also grow from the uniform ranks (each layer at ρ): the result is then never worse than uniform on
    # this loss estimate, whatever the granularity of the greedy steps did.
    uniform = uniform_ranks(sites, ratio, align)
    used[0] = sum(uniform[s.key] * s.step_cost for s in sites)
    candidates = [greedy]
    if used[0] <= budget:
        candidates.append(_greedy(sites, uniform, fits, align))
    ranks = min(candidates, key=lambda chosen: sum(loss_estimate(s, chosen[s.key]) for s in sites))
    params = sum(ranks[s.key] * s.step_cost for s in sites)
    loss = sum(loss_estimate(s, ranks[s.key]) for s in sites)
    uniform_loss = sum(loss_estimate(s, uniform[s.key]) for s in sites)
    return Allocation(ranks=ranks, params=params, budget=budget, loss=loss, uniform_loss=uniform_loss)


def uniform_ranks(sites: Sequence[AllocationSite], ratio: float, align: int = 8) -> dict[str, int]:
    """Each site at the per-layer ratio, ``⌊ρ·K·N/(K+N)⌋`` aligned down, under break-even."""
    return {
        site.key: max(1, min(align_rank(ratio_rank(site.k, site.n, ratio), align, site.max_rank, False), site.max_rank))
        for site in sites
    }


def allocate_energy(sites: Sequence[AllocationSite], energy: float, align: int = 8) -> Allocation:
    """The fewest parameters whose ranks keep ``β`` of the total (sensitivity-weighted) energy."""
    total = sum(float(s.sensitivity * np.sum(np.asarray(s.singular_values, dtype=np.float64) ** 2)) for s in sites)
    target_loss = (1.0 - energy) * total
    minimum = {site.key: min(max(align, 1), site.max_rank) for site in sites}
    loss = [sum(loss_estimate(s, minimum[s.key]) for s in sites)]
    by_key = {site.key: site for site in sites}
    ranks = dict(minimum)

    # Take steps in order of gain per parameter until the loss is under the target.
    heap: list[tuple[float, str]] = []

    def push(site: AllocationSite) -> None:
        current = ranks[site.key]
        stop = min(current + max(align, 1), site.max_rank)
        if stop > current:
            heapq.heappush(heap, (-_gains(site, current, stop) / ((stop - current) * site.step_cost), site.key))

    for site in sites:
        push(site)
    while heap and loss[0] > target_loss:
        _, key = heapq.heappop(heap)
        site = by_key[key]
        current = ranks[key]
        stop = min(current + max(align, 1), site.max_rank)
        loss[0] -= _gains(site, current, stop)
        ranks[key] = stop
        push(site)
    params = sum(ranks[s.key] * s.step_cost for s in sites)
    return Allocation(ranks=ranks, params=params, budget=params, loss=max(loss[0], 0.0))
