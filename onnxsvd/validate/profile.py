"""The speedup bound of a rewrite: how much of the original's time the rewritten sites take, and how
many of their FLOPs the rewrite keeps. Also FLOPs, parameters and file sizes of both models.

Legend: M rows of a site's activation (all leading axes of one batch), K input and N output channels
of a site (``Y [M, N] = X [M, K] · W [K, N]``), r the rank of its factor chain.

Amdahl's law: if a share ``s`` of the original's node time is in the rewritten sites and the rewrite
keeps a fraction ``ρ = FLOPs_after / FLOPs_before`` of their FLOPs, then at best (time ∝ FLOPs in those
sites, nothing else changes)

    speedup ≤ 1 / ((1 − s) + s·ρ)

FLOPs of a site: ``2·M·K·N`` dense, ``2·M·r·(K + N)`` as a chain ``X·A [K, r]·B [r, N]``. The share
``s`` comes from an onnxruntime profile of the original (its JSON trace); ``M`` comes from the same trace
(output shape of each site). Without a profile, FLOPs are counted per row (``M = 1``).

The original is profiled once per provider and input shapes (:class:`ProfileCache`): every rewrite of one
model compared on one batch reads its share from the same trace, so the bounds of a sweep's entries differ
only by their ρ. The share of each profiled run is kept, and its min–max says how stable ``s`` is.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.config import PROFILE_RUNS
from onnxsvd.errors import UsageError
from onnxsvd.graph import GraphIndex, Site, find_sites
from onnxsvd.validate.latency import make_runner, open_session

__all__ = [
    "SiteCost",
    "SiteFlops",
    "TimeShare",
    "OriginalProfile",
    "ProfileCache",
    "PROFILE_RUNS",
    "SizeSummary",
    "speedup_bound",
    "factorized_sites",
    "site_flops",
    "conv_kernel_aliases",
    "parse_trace",
    "profile_original",
    "profile_time_share",
    "run_shares",
    "size_summary",
]

log = logging.getLogger(__name__)

_KERNEL_SUFFIX = "_kernel_time"
#: onnxruntime renames nodes it fuses: ``fused <name>`` (FusedGemm) or ``<name>/<Fusion>/`` (FusedMatMul).
_FUSED_PREFIX = "fused "


def speedup_bound(share: float, kept_fraction: float) -> float:
    """``1 / ((1 − s) + s·ρ)``: Amdahl's bound for a share ``s`` of time running at ``ρ`` of its FLOPs."""
    denominator = (1.0 - share) + share * kept_fraction
    return 1.0 / denominator if denominator > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class SiteCost:
    """FLOPs of one rewritten site before and after.

    Attributes:
        name: node name in the original.
        op_type: ``"MatMul"`` or ``"Gemm"``.
        k: input channels ``K``.
        n: output channels ``N``.
        flops_per_row_before: ``2·K·N``.
        flops_per_row_after: ``Σ 2·K_i·N_i`` over the chain's MatMul/Gemm/Conv nodes (``2·r·(K+N)``) and
            its MatMulNBits base (``2·K·N``) when quantized, or
            ``None`` when the chain cannot be found by name in the rewritten model.
        rows: ``M`` in the profiled batch, or ``None`` without a profile.
    """

    name: str
    op_type: str
    k: int
    n: int
    flops_per_row_before: int
    flops_per_row_after: int | None
    rows: int | None = None


@dataclasses.dataclass(frozen=True)
class SiteFlops:
    """FLOPs of the rewritten sites in both models.

    Attributes:
        sites: one entry per rewritten site.
        source: ``"given"`` (names passed in, e.g. from the rewrite report) or ``"inferred"`` (original
            sites whose node is gone from the rewritten model).
        per_row_before: ``Σ 2·K·N`` over the sites.
        per_row_after: the same sites' FLOPs per row in the rewritten model.
        flops_before: ``Σ 2·M·K·N`` on the profiled batch (``None`` without rows for every site).
        flops_after: ``Σ 2·M·r·(K+N)`` on the profiled batch.
    """

    sites: tuple[SiteCost, ...]
    source: str
    per_row_before: int
    per_row_after: int
    flops_before: int | None = None
    flops_after: int | None = None

    @property
    def kept_fraction(self) -> float:
        """``ρ = FLOPs_after / FLOPs_before`` (on the batch when rows are known, else per row); 1 when empty."""
        if self.flops_before and self.flops_after is not None:
            return self.flops_after / self.flops_before
        return self.per_row_after / self.per_row_before if self.per_row_before else 1.0

    def with_rows(self, rows: Mapping[str, int]) -> SiteFlops:
        """The same sites with ``M`` from a profile; batch FLOPs when every site has rows and a chain."""
        sites = tuple(dataclasses.replace(site, rows=rows.get(site.name)) for site in self.sites)
        complete = all(site.rows is not None and site.flops_per_row_after is not None for site in sites)
        if not sites or not complete:
            return dataclasses.replace(self, sites=sites)
        before = sum(site.rows * site.flops_per_row_before for site in sites)  # type: ignore[operator]
        after = sum(site.rows * site.flops_per_row_after for site in sites)  # type: ignore[operator]
        return dataclasses.replace(self, sites=sites, flops_before=before, flops_after=after)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kept_fraction"] = self.kept_fraction
        return data


@dataclasses.dataclass(frozen=True)
class TimeShare:
    """Where the original's node time goes, from one onnxruntime profile.

    Attributes:
        provider: ``"cpu"`` or ``"cuda"``.
        runs: profiled runs counted (a first run is made and left out).
        site_us: kernel time of the rewritten sites (µs, all counted runs).
        total_us: kernel time of every node.
        missing: sites with no kernel in the trace (onnxruntime fused them into another kernel).
        rows: ``M`` of each site found, from its output shape in the trace.
        run_shares: the share of each profiled run alone (their spread says how stable ``s`` is).
    """

    provider: str
    runs: int
    site_us: float
    total_us: float
    missing: tuple[str, ...] = ()
    rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    run_shares: tuple[float, ...] = ()

    @property
    def share(self) -> float:
        """``s``: the rewritten sites' share of all node time."""
        return self.site_us / self.total_us if self.total_us > 0 else 0.0

    @property
    def share_range(self) -> tuple[float, float]:
        """(min, max) of the per-run shares; ``(s, s)`` when the runs could not be told apart."""
        if not self.run_shares:
            return self.share, self.share
        return min(self.run_shares), max(self.run_shares)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rows"] = dict(self.rows)
        data["run_shares"] = list(self.run_shares)
        data["share"] = self.share
        data["share_range"] = list(self.share_range)
        return data


@dataclasses.dataclass(frozen=True)
class SizeSummary:
    """Parameters (initializer and Constant elements) and bytes on disk (with external data) of both, and
    the bytes of their tensors as stored (each in its own dtype: packed int4 values, scales, zero points,
    factors), of the whole model and of the original's constant-weight MatMul/Gemm layers.

    The linear layers' bytes in the rewritten model are its tensor bytes less the original's other
    tensors (embeddings, norms, biases), which a rewrite or a quantizer leaves as they are.
    """

    params_original: int
    params_rewritten: int
    bytes_original: int
    bytes_rewritten: int
    tensor_bytes_original: int = 0
    tensor_bytes_rewritten: int = 0
    linear_bytes_original: int = 0
    linear_bytes_rewritten: int = 0

    @property
    def linear_bytes_kept(self) -> float:
        """The linear layers' bytes as stored, rewritten over original."""
        if not self.linear_bytes_original:
            return 1.0
        return self.linear_bytes_rewritten / self.linear_bytes_original

    @property
    def params_kept(self) -> float:
        return self.params_rewritten / self.params_original if self.params_original else 1.0

    @property
    def bytes_kept(self) -> float:
        return self.bytes_rewritten / self.bytes_original if self.bytes_original else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["params_kept"] = self.params_kept
        data["bytes_kept"] = self.bytes_kept
        data["linear_bytes_kept"] = self.linear_bytes_kept
        return data


def size_summary(
    original_path: str | os.PathLike[str],
    rewritten_path: str | os.PathLike[str],
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
) -> SizeSummary:
    """Parameters, file sizes and tensor bytes as stored of both models (see :class:`SizeSummary`)."""
    tensors_original, tensors_rewritten = io.count_bytes(original), io.count_bytes(rewritten)
    linear = sum(site.dense_bytes for site in find_sites(original).sites)
    return SizeSummary(
        params_original=io.count_parameters(original),
        params_rewritten=io.count_parameters(rewritten),
        bytes_original=io.file_size(original_path),
        bytes_rewritten=io.file_size(rewritten_path),
        tensor_bytes_original=tensors_original,
        tensor_bytes_rewritten=tensors_rewritten,
        linear_bytes_original=linear,
        linear_bytes_rewritten=tensors_rewritten - (tensors_original - linear),
    )


def factorized_sites(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, names: Sequence[str] | None = None
) -> tuple[tuple[Site, ...], str]:
    """The original's sites that were rewritten, and how they were found (``"given"``/``"inferred"``).

    With ``names`` (the sites a rewrite report marks ``factorized``) those; without, every constant-weight
    MatMul/Gemm of the original whose node is gone from the rewritten model (all of them when the
    rewritten model renamed every node).

    Raises:
        UsageError: a given name is not a constant-weight MatMul/Gemm of the original.
    """
    sites = {site.name: site for site in find_sites(original).sites}
    if names is not None:
        unknown = [name for name in names if name not in sites]
        if unknown:
            raise UsageError(
                f"site {unknown[0]!r} is not a constant-weight MatMul/Gemm of the original model; "
                "pass the rewrite report of this model"
            )
        return tuple(sites[name] for name in names), "given"
    scopes = GraphIndex(rewritten.graph).scopes  # a site inside a body is named with its scope's path
    remaining = {scopes.display_name(key) for key, node in enumerate(scopes.nodes) if node.name}
    return tuple(site for name, site in sites.items() if name not in remaining), "inferred"


def site_flops(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, names: Sequence[str] | None = None
) -> SiteFlops:
    """FLOPs per row of the rewritten sites before (``2·K·N``) and after (their chain in ``rewritten``).

    The chain of site ``s`` is every constant-weight MatMul/Gemm/Conv and every MatMulNBits of the
    rewritten model named ``s/…`` (how the emitters name them). When some chain cannot be found, the total
    after is every rewritten one of those nodes that is not an unchanged original site (per row only).
    """
    chosen, source = factorized_sites(original, rewritten, names)
    # (node name, FLOPs per row): the rewritten model's constant-weight MatMul/Gemm/Conv nodes and its
    # MatMulNBits nodes (a quantized site's base, no site itself: 2·K·N of its own attributes).
    new_nodes = [(node.name, 2 * node.k * node.n) for node in find_sites(rewritten).sites]
    new_nodes += _nbits_flops(rewritten.graph)
    costs: list[SiteCost] = []
    for site in chosen:
        prefix = f"{site.name}/"
        chain = [flops for name, flops in new_nodes if name.startswith(prefix)]
        after = sum(chain) if chain else None
        costs.append(SiteCost(site.name, site.op_type, site.k, site.n, 2 * site.k * site.n, after))
    before = sum(cost.flops_per_row_before for cost in costs)
    if all(cost.flops_per_row_after is not None for cost in costs):
        after_total = sum(cost.flops_per_row_after or 0 for cost in costs)
    else:
        unchanged = {site.name for site in find_sites(original).sites} - {site.name for site in chosen}
        after_total = sum(flops for name, flops in new_nodes if name not in unchanged)
        log.info("factor chains not found by name; FLOPs after counted as every new MatMul/Gemm")
    return SiteFlops(tuple(costs), source, before, after_total)


def _nbits_flops(graph: onnx.GraphProto) -> list[tuple[str, int]]:
    """``(name, 2·K·N)`` of every ``MatMulNBits`` node in ``graph`` and the subgraphs of its nodes."""
    found: list[tuple[str, int]] = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {attribute.name: attribute.i for attribute in node.attribute if attribute.name in ("K", "N")}
            found.append((node.name, 2 * attributes.get("K", 0) * attributes.get("N", 0)))
        for attribute in node.attribute:
            for body in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                found += _nbits_flops(body)
    return found


def _matches(kernel: str, sites: Iterable[str]) -> str | None:
    """The site a kernel event belongs to (``name``, ``fused name``, or ``name/Fusion/``), if any."""
    if kernel.startswith(_FUSED_PREFIX):
        kernel = kernel[len(_FUSED_PREFIX) :]
    for site in sites:
        if kernel == site or kernel.startswith(f"{site}/"):
            return site
    return None


def _run_bounds(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of every ``model_run`` event, in time order."""
    return sorted(
        (event["ts"], event["ts"] + event.get("dur", 0))
        for event in events
        if event.get("cat") == "Session" and event.get("name") == "model_run"
    )


#: Element-wise ops ONNX Runtime's CPU layout pass fuses into a Conv (NCHWc: activation, residual sum); the
#: fused kernel is then named after the last fused node's output, with ``_nchwc``.
_CONV_FUSED_OPS = ("Relu", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "Tanh", "Add", "Sum")
_NCHWC_SUFFIX = "_nchwc"


def conv_kernel_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """``tensor → Conv node``: the names an NCHWc kernel of each main-graph Conv may carry in a profile.

    ONNX Runtime's CPU layout pass renames a Conv kernel after its output tensor (``<output>_nchwc``), and
    after the output of the element-wise nodes it fuses behind it (a Relu, a residual Add then a Relu), so
    a Conv's own name never appears; this follows each Conv through single-consumer element-wise nodes.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    aliases: dict[str, str] = {}
    for position, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or not node.output:
            continue
        site = node.name or f"{node.op_type}_{position}"
        tensor = node.output[0]
        while True:
            aliases.setdefault(tensor, site)
            readers = consumers.get(tensor, [])
            if len(readers) != 1 or readers[0].op_type not in _CONV_FUSED_OPS or not readers[0].output:
                break
            tensor = readers[0].output[0]
    return aliases


def _kernels(events: Sequence[Mapping[str, Any]], start: float) -> Iterable[tuple[Mapping[str, Any], str]]:
    """Every node kernel event from ``start`` on, with its node name (``_kernel_time`` cut off)."""
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX) or event.get("ts", 0) < start:
            continue
        yield event, name[: -len(_KERNEL_SUFFIX)]


def _site_of(
    event: Mapping[str, Any], kernel: str, sites: Sequence[str], aliases: Mapping[str, str] | None = None
) -> str | None:
    """The rewritten site a MatMul/Gemm/Conv kernel event belongs to, if any (``aliases``: see
    :func:`conv_kernel_aliases`)."""
    operator = str(event.get("args", {}).get("op_name", ""))
    if not any(op in operator for op in ("MatMul", "Gemm", "Conv")):  # FusedConv, FusedMatMul, FusedGemm too
        return None
    found = _matches(kernel, sites)
    if found is None and aliases and kernel.endswith(_NCHWC_SUFFIX):
        owner = aliases.get(kernel[: -len(_NCHWC_SUFFIX)])
        found = owner if owner in sites else None
    return found


def parse_trace(
    events: Sequence[Mapping[str, Any]], site_names: Iterable[str], outputs: Mapping[str, int] | None = None,
    skip_runs: int = 1, aliases: Mapping[str, str] | None = None,
) -> tuple[float, float, dict[str, float], dict[str, int]]:
    """Sum kernel durations of an onnxruntime trace.

    Args:
        events: the JSON trace (a list of Chrome-trace events).
        site_names: node names of the rewritten sites.
        outputs: ``N`` per site, to turn output shapes into rows ``M``.
        skip_runs: leave out node events of the first ``skip_runs`` ``model_run`` events (warm-up).
        aliases: tensor → Conv node, the names of NCHWc kernels (:func:`conv_kernel_aliases`).

    Returns:
        (site µs, all-node µs, µs per site found, M per site found).
    """
    names = list(site_names)
    runs = _run_bounds(events)
    # Node events of run i+1 start after run i ends; keep all events when there is nothing to skip.
    start = runs[skip_runs - 1][1] if 0 < skip_runs < len(runs) else -math.inf
    site_us = total_us = 0.0
    per_site: dict[str, float] = {}
    rows: dict[str, int] = {}
    for event, kernel in _kernels(events, start):
        duration = float(event.get("dur", 0))
        total_us += duration
        site = _site_of(event, kernel, names, aliases)
        if site is None:
            continue
        site_us += duration
        per_site[site] = per_site.get(site, 0.0) + duration
        shapes = event.get("args", {}).get("output_type_shape") or []
        if outputs and site in outputs and shapes and site not in rows:
            dims = next(iter(shapes[0].values()), [])
            if dims and outputs[site]:
                rows[site] = int(np.prod(dims)) // outputs[site]
    return site_us, total_us, per_site, rows


def run_shares(
    events: Sequence[Mapping[str, Any]], site_names: Iterable[str], skip_runs: int = 1,
    aliases: Mapping[str, str] | None = None,
) -> list[float]:
    """The sites' share of node time in each ``model_run`` after the first ``skip_runs``, in time order.

    A node event belongs to the last run that started at or before it. Empty without ``model_run`` events.
    """
    names = list(site_names)
    runs = _run_bounds(events)
    if not 0 <= skip_runs < len(runs):
        return []
    starts = [begin for begin, _ in runs]
    site_us = [0.0] * len(runs)
    total_us = [0.0] * len(runs)
    start = runs[skip_runs - 1][1] if skip_runs > 0 else -math.inf
    for event, kernel in _kernels(events, start):
        run = max(0, bisect.bisect_right(starts, event.get("ts", 0)) - 1)
        duration = float(event.get("dur", 0))
        total_us[run] += duration
        if _site_of(event, kernel, names, aliases) is not None:
            site_us[run] += duration
    return [site / total for site, total in zip(site_us[skip_runs:], total_us[skip_runs:], strict=True) if total > 0]


@dataclasses.dataclass(frozen=True)
class OriginalProfile:
    """One onnxruntime profile of the original: ``runs`` profiled runs after ``warmup`` left out.

    The share of any set of rewritten sites is read from it (:meth:`time_share`), so every rewrite of
    one model compared on one batch shape gets its bound from the same measurement.
    """

    provider: str
    runs: int
    warmup: int
    events: tuple[Mapping[str, Any], ...]
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def time_share(self, sites: Sequence[SiteCost]) -> TimeShare:
        """The sites' share of the original's node time, over all runs and run by run."""
        names = [site.name for site in sites]
        site_us, total_us, per_site, rows = parse_trace(
            self.events, names, {site.name: site.n for site in sites}, skip_runs=self.warmup, aliases=self.aliases
        )
        missing = tuple(name for name in names if name not in per_site)
        if missing:
            log.info("%d rewritten sites have no kernel of their own in the profile: %s", len(missing), missing)
        shares = tuple(run_shares(self.events, names, skip_runs=self.warmup, aliases=self.aliases))
        share = TimeShare(self.provider, self.runs, site_us, total_us, missing, rows, shares)
        low, high = share.share_range
        log.info(
            "%s: rewritten sites take %.1f%% of the original's node time (%.1f–%.1f%% over %d runs)",
            self.provider, 100 * share.share, 100 * low, 100 * high, self.runs,
        )
        return share


def profile_original(
    path: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    provider: str = "cpu",
    threads: int | None = None,
    runs: int = PROFILE_RUNS,
    warmup: int = 1,
) -> OriginalProfile:
    """Profile ``path`` on ``feeds``: ``warmup`` runs (at least one) left out, then ``runs`` profiled.

    Raises:
        UsageError: ``runs < 1``.
        ProviderError, ModelError, DataError: as :func:`open_session` and :func:`make_runner`.
    """
    if runs < 1:
        raise UsageError(f"profile runs must be at least 1, got {runs}")
    warmup = max(1, warmup)
    folder = tempfile.mkdtemp(prefix="onnxsvd-profile-")
    try:
        session, _ = open_session(path, provider, threads, profile_prefix=str(Path(folder) / "profile"))
        run = make_runner(session, feeds, provider)  # the first warm-up run
        for _ in range(warmup - 1 + runs):
            run()
        trace = session.end_profiling()
        with open(trace, encoding="utf-8") as handle:
            events = json.load(handle)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
    kept = tuple(event for event in events if event.get("cat") in ("Node", "Session"))
    aliases = conv_kernel_aliases(onnx.load(os.fspath(path), load_external_data=False))
    return OriginalProfile(provider, runs, warmup, kept, aliases)


def profile_time_share(
    path: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    sites: Sequence[SiteCost],
    provider: str = "cpu",
    threads: int | None = None,
    runs: int = PROFILE_RUNS,
) -> TimeShare:
    """Profile ``path`` on ``feeds`` (one warm-up run, then ``runs`` profiled) and measure the sites' share.

    Raises:
        ProviderError, ModelError, DataError: as :func:`open_session` and :func:`make_runner`.
    """
    return profile_original(path, feeds, provider, threads, runs).time_share(sites)


class ProfileCache:
    """Profiles of originals, one per model file, provider, threads, runs and input shapes.

    A sweep validates many rewrites against one original on one batch: with one cache they all read
    their share from one profile, instead of each measuring its own (noise made those disagree).
    """

    def __init__(self) -> None:
        self._profiles: dict[tuple[Any, ...], OriginalProfile] = {}

    def get(self, path: str | os.PathLike[str], feeds: Mapping[str, np.ndarray], provider: str = "cpu",
            threads: int | None = None, runs: int = PROFILE_RUNS, warmup: int = 1) -> OriginalProfile:
        """The profile :func:`profile_original` takes with these arguments, measured on the first call."""
        resolved = Path(path).resolve()
        stat = resolved.stat()  # the file's identity: a rewritten file at the same path is another model
        shapes = tuple(sorted((name, tuple(array.shape), str(array.dtype)) for name, array in feeds.items()))
        key = (str(resolved), stat.st_size, stat.st_mtime_ns, provider, threads, runs, max(1, warmup), shapes)
        if key not in self._profiles:
            self._profiles[key] = profile_original(path, feeds, provider, threads, runs, warmup)
        else:
            log.debug("%s: reusing the profile of %s on %s", provider, path, shapes)
        return self._profiles[key]

    def __len__(self) -> int:
        return len(self._profiles)
