"""Global rank allocation: distribute one parameter budget across all sites to minimise the loss.

Legend: s a site (weight group), K_s/N_s its shape, r_s its rank, σ_{s,i} its singular values in the
method's metric (whitened: ``σ²`` is output energy on the calibration data), α_s its sensitivity, a the
alignment (``--align``), f_s the site's rank floor (``--min-rank``), c_s its rank limit (the largest rank
whose chain is still smaller than the weight, in bytes).

The loss estimate of a site truncated to rank r is ``L_s(r) = α_s · Σ_{i>r} σ_{s,i}²``: the discarded
energy in the data metric — absolute, not relative (a relative allocation starves the layers that carry
the most signal) — times how strongly that layer's error reaches the model's outputs (α_s, measured by
truncating the site alone). A site's ranks are the multiples of a in ``[f_s, c_s]`` (every rank in that
range when no multiple lies in it, said in the site's note). Each step from one allowed rank to the next
costs ``Δr·(K_s + N_s)`` parameters and gains ``α_s Σ σ²`` over the ranks it adds; ``L_s`` is convex in r
(σ descending) and the steps of a site are equal, so taking steps in order of gain per parameter is
optimal for the separable problem, up to the last step's granularity.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from onnxsvd.errors import UsageError
from onnxsvd.rank.policy import break_even_rank, ratio_rank

__all__ = [
    "AllocationSite",
    "Allocation",
    "allocate_budget",
    "allocate_bytes",
    "allocate_energy",
    "allowed_ranks",
    "loss_estimate",
    "smallest_feasible_ratio",
    "uniform_ranks",
]


@dataclasses.dataclass(frozen=True)
class AllocationSite:
    """One weight to allocate a rank to.

    Attributes:
        key: identifier (the weight group).
        k: input channels.
        n: output channels.
        singular_values: ``[m]`` descending, in the method's metric.
        sensitivity: α, the scale from this site's discarded energy to the model's loss.
        min_rank: the floor f: no rank below it (``--min-rank``).
        rank_limit: the largest rank allowed, c (under break-even in bytes, or ``min(K, N)`` when growth is
            allowed); ``None``: under the parameter break-even ``r·(K+N) < K·N``.
        rank_bytes: what one unit of rank costs in bytes as stored (:func:`allocate_bytes`); ``None``:
            budgets count parameters, ``K+N`` per unit of rank.
    """

    key: str
    k: int
    n: int
    singular_values: np.ndarray
    sensitivity: float = 1.0
    min_rank: int = 1
    rank_limit: int | None = None
    rank_bytes: int | None = None

    @property
    def params(self) -> int:
        return self.k * self.n

    @property
    def step_cost(self) -> int:
        return self.k + self.n

    @property
    def unit_cost(self) -> int:
        """What one unit of rank costs in the budget's unit: bytes with ``rank_bytes``, else parameters."""
        return self.rank_bytes if self.rank_bytes is not None else self.step_cost

    @property
    def max_rank(self) -> int:
        """The largest rank allowed: ``rank_limit``, or the largest under the parameter break-even."""
        if self.rank_limit is not None:
            return min(self.rank_limit, min(self.k, self.n))
        return max(1, min(min(self.k, self.n), break_even_rank(self.k, self.n) - 1))


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Ranks per site key, the parameters they use, the budget, the loss estimate, and a note per site
    whose rank could not be aligned (why)."""

    ranks: Mapping[str, int]
    params: int
    budget: int
    loss: float
    uniform_loss: float | None = None
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)


def allowed_ranks(site: AllocationSite, align: int) -> tuple[list[int], str]:
    """The ranks a site may take, ascending, and why they are not aligned (``""`` when they are).

    The multiples of ``align`` in ``[min_rank, max_rank]``; when none lies there, every rank in it, with
    the reason. Empty when the floor is above the limit (the site cannot be factorized; the caller keeps
    it dense). A floor of 0 (a correction, which may be left out) puts rank 0 on the ladder.
    """
    low, high = max(0, site.min_rank), site.max_rank
    if low > high:
        return [], f"the floor {low} is above the largest rank under break-even, {high}"
    if align <= 1:
        return list(range(low, high + 1)), ""
    aligned = list(range(math.ceil(low / align) * align, high + 1, align))
    if aligned:
        return aligned, ""
    if high < align:
        why = f"not aligned to --align {align}: the largest rank under break-even is {high}"
    else:
        why = f"not aligned to --align {align}: no multiple of it lies between the floor {low} and {high}"
    return list(range(low, high + 1)), why


def loss_estimate(site: AllocationSite, rank: int) -> float:
    """``α · Σ_{i>r} σ_i²``."""
    squared = np.asarray(site.singular_values, dtype=np.float64) ** 2
    return float(site.sensitivity * squared[rank:].sum())


def _gains(site: AllocationSite, start: int, stop: int) -> float:
    squared = np.asarray(site.singular_values, dtype=np.float64) ** 2
    return float(site.sensitivity * squared[start:stop].sum())


def _ladders(sites: Sequence[AllocationSite], align: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    ladders, notes = {}, {}
    for site in sites:
        ranks, why = allowed_ranks(site, align)
        if not ranks:
            raise ValueError(f"site {site.key!r} has no allowed rank ({why}); keep it dense before allocating")
        ladders[site.key] = ranks
        if why:
            notes[site.key] = why
    return ladders, notes


def _greedy(
    sites: Sequence[AllocationSite],
    ladders: Mapping[str, list[int]],
    start: Mapping[str, int],
    take: Callable[[int], bool],
) -> dict[str, int]:
    """From ``start`` (an index into each site's ladder), climb the ladders one step at a time in order
    of gain per parameter while ``take(cost)`` accepts the step's cost; a refused step closes its site."""
    position = dict(start)
    heap: list[tuple[float, str]] = []
    by_key = {site.key: site for site in sites}

    def push(site: AllocationSite) -> None:
        ladder, index = ladders[site.key], position[site.key]
        if index + 1 < len(ladder):
            current, stop = ladder[index], ladder[index + 1]
            gain = _gains(site, current, stop) / ((stop - current) * site.unit_cost)
            heapq.heappush(heap, (-gain, site.key))

    for site in sites:
        push(site)
    while heap:
        _, key = heapq.heappop(heap)
        site, ladder = by_key[key], ladders[key]
        index = position[key]
        if not take((ladder[index + 1] - ladder[index]) * site.unit_cost):
            continue  # this site's next step does not fit; a cheaper one elsewhere still may
        position[key] = index + 1
        push(site)
    return {key: ladders[key][index] for key, index in position.items()}


def smallest_feasible_ratio(sites: Sequence[AllocationSite], align: int = 8) -> float:
    """The smallest ratio, in steps of 0.0001, whose budget ``⌊ρ·Σ K·N⌋`` holds every site at its lowest
    allowed rank."""
    ladders, _ = _ladders(sites, align)
    minimum = sum(ladders[s.key][0] * s.step_cost for s in sites)
    total = sum(site.params for site in sites)
    ratio = math.ceil(minimum / total * 10_000) / 10_000
    while math.floor(ratio * total) < minimum:  # rounding of ρ·ΣKN in floating point
        ratio = round(ratio + 1e-4, 4)
    return ratio


def allocate_budget(sites: Sequence[AllocationSite], ratio: float, align: int = 8) -> Allocation:
    """Ranks minimising ``Σ L_s(r_s)`` subject to ``Σ r_s (K_s+N_s) ≤ ρ · Σ K_s N_s``.

    Every site gets a rank from :func:`allowed_ranks` (at least its floor, at most its limit, a multiple
    of ``align`` where one fits). The budget is never exceeded, and what is left is smaller than the
    cheapest step still open.

    Raises:
        UsageError: the budget cannot hold every site at its lowest allowed rank; the message names the
            smallest ratio that can.
        ValueError: a site has no allowed rank (its floor is above its limit).
    """
    ladders, notes = _ladders(sites, align)
    total = sum(site.params for site in sites)
    budget = math.floor(ratio * total)
    minimum = sum(ladders[s.key][0] * s.step_cost for s in sites)
    if minimum > budget:
        floors = sorted({ladders[s.key][0] for s in sites})
        lowest = f"rank {floors[0]}" if len(floors) == 1 else f"ranks {floors[0]}–{floors[-1]}"
        raise UsageError(
            f"--ratio {ratio:g} gives a budget of {budget:,} parameters over {len(sites)} sites, but their "
            f"lowest allowed {lowest} (--min-rank, --align) need {minimum:,}: use --ratio "
            f"{smallest_feasible_ratio(sites, align):g} or more (or lower --min-rank)"
        )
    used = [0]

    def take(cost: int) -> bool:
        if used[0] + cost <= budget:
            used[0] += cost
            return True
        return False

    used[0] = minimum
    candidates = [_greedy(sites, ladders, dict.fromkeys(ladders, 0), take)]
    # Also grow from the uniform ranks (each layer at ρ): the result is then never worse than uniform on
    # this loss estimate, whatever the granularity of the greedy steps did.
    uniform = uniform_ranks(sites, ratio, align)
    uniform_cost = sum(uniform[s.key] * s.step_cost for s in sites)
    if uniform_cost <= budget:
        used[0] = uniform_cost
        start = {s.key: ladders[s.key].index(uniform[s.key]) for s in sites}
        candidates.append(_greedy(sites, ladders, start, take))
    ranks = min(candidates, key=lambda chosen: sum(loss_estimate(s, chosen[s.key]) for s in sites))
    params = sum(ranks[s.key] * s.step_cost for s in sites)
    loss = sum(loss_estimate(s, ranks[s.key]) for s in sites)
    uniform_loss = sum(loss_estimate(s, uniform[s.key]) for s in sites)
    return Allocation(ranks, params, budget, loss, uniform_loss, notes)


def allocate_bytes(sites: Sequence[AllocationSite], budget: int, align: int = 8) -> Allocation:
    """Ranks minimising ``Σ L_s(r_s)`` subject to ``Σ r_s·b_s ≤ budget`` bytes, ``b_s = site.rank_bytes``
    (the bytes one unit of rank costs as stored: factor values in their dtype, and their scales).

    Every site gets a rank from :func:`allowed_ranks`; the budget is never exceeded. ``Allocation.params``
    holds the bytes the ranks use and ``Allocation.budget`` the budget, both in bytes.

    Raises:
        UsageError: the budget cannot hold every site at its lowest allowed rank (the message names the
            bytes they need).
        ValueError: a site without ``rank_bytes``, or with no allowed rank.
    """
    if any(site.rank_bytes is None for site in sites):
        raise ValueError("allocate_bytes needs rank_bytes on every site")
    ladders, notes = _ladders(sites, align)
    minimum = sum(ladders[s.key][0] * s.unit_cost for s in sites)
    if minimum > budget:
        raise UsageError(
            f"the correction budget of {budget:,} B cannot hold the {len(sites)} sites at their lowest allowed "
            f"ranks (--min-rank, --align), which need {minimum:,} B: raise the budget or lower --min-rank"
        )
    used = [minimum]

    def take(cost: int) -> bool:
        if used[0] + cost <= budget:
            used[0] += cost
            return True
        return False

    ranks = _greedy(sites, ladders, dict.fromkeys(ladders, 0), take)
    spent = sum(ranks[s.key] * s.unit_cost for s in sites)
    loss = sum(loss_estimate(s, ranks[s.key]) for s in sites)
    return Allocation(ranks, spent, budget, loss, None, notes)


def uniform_ranks(sites: Sequence[AllocationSite], ratio: float, align: int = 8) -> dict[str, int]:
    """Each site at the per-layer ratio: the largest allowed rank up to ``⌊ρ·K·N/(K+N)⌋`` (the lowest
    allowed rank when even that is above it)."""
    ladders, _ = _ladders(sites, align)
    ranks = {}
    for site in sites:
        target = ratio_rank(site.k, site.n, ratio)
        ladder = ladders[site.key]
        ranks[site.key] = max((rank for rank in ladder if rank <= target), default=ladder[0])
    return ranks


def allocate_energy(sites: Sequence[AllocationSite], energy: float, align: int = 8) -> Allocation:
    """The fewest parameters whose ranks keep ``β`` of the total (sensitivity-weighted) energy, each rank
    from :func:`allowed_ranks`."""
    ladders, notes = _ladders(sites, align)
    total = sum(float(s.sensitivity * np.sum(np.asarray(s.singular_values, dtype=np.float64) ** 2)) for s in sites)
    target_loss = (1.0 - energy) * total
    loss = [sum(loss_estimate(s, ladders[s.key][0]) for s in sites)]
    by_key = {site.key: site for site in sites}
    position = dict.fromkeys(ladders, 0)
    heap: list[tuple[float, str]] = []

    def push(site: AllocationSite) -> None:
        ladder, index = ladders[site.key], position[site.key]
        if index + 1 < len(ladder):
            current, stop = ladder[index], ladder[index + 1]
            heapq.heappush(heap, (-_gains(site, current, stop) / ((stop - current) * site.unit_cost), site.key))

    for site in sites:
        push(site)
    # Take steps in order of gain per parameter until the loss is under the target.
    while heap and loss[0] > target_loss:
        _, key = heapq.heappop(heap)
        site, ladder = by_key[key], ladders[key]
        index = position[key]
        loss[0] -= _gains(site, ladder[index], ladder[index + 1])
        position[key] = index + 1
        push(site)
    ranks = {key: ladders[key][index] for key, index in position.items()}
    params = sum(ranks[s.key] * s.step_cost for s in sites)
    return Allocation(ranks=ranks, params=params, budget=params, loss=max(loss[0], 0.0), notes=notes)
