"""``extract``: low-rank deltas between a base model and its fine-tunes, as ONNX Runtime adapters.

Dimension legend:
    K  input channels of a site, N output channels, r the rank of a delta's factors, T calibration rows

For every site matched in the base (the same sites in each tuned model, whose graph must be the base's
with other weights) the delta ``ΔW = W_tuned − W_base`` (``[K, N]``, normal form) is factorized like a
weight in :mod:`onnxsvd.factorize.lowrank`: plainly (``‖ΔW − A·B‖_F``), or with ``--data`` in the tuned
model's own activation metric (``‖X_tuned (ΔW − A·B)‖_F``, whitening by ``G = XᵀX`` collected on the tuned
model: a delta matters where the tuned model's data is). Ranks come from the rank policy
(:func:`onnxsvd.rank.choose_rank`) or one budget over all sites (``--allocate global``). A delta of zero, or
one whose ``‖ΔW‖_F / ‖W_base‖_F`` is at most ``--tolerance``, is reported and left out. There is no byte
guard: an adapter keeps no dense weight, so every other delta is carried (at most at its full rank, exact).

Written into the output folder, all or nothing: ``base_lora.onnx`` (the base with a branch per adapted
site whose factors are graph inputs with rank-0 defaults), ``<tuned>.onnx_adapter`` per tuned model (every
slot: its factors, or rank-0 ones where it did not adapt the site), with ``merge`` ``<tuned>_merged.onnx``
(the dense base plus the branch with constant factors: ``X·W_base + (X·A)·B``, not a refolded dense
weight), and ``extract.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.adapter import write_adapter
from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate
from onnxsvd.calibrate.stats import Statistics
from onnxsvd.config import ALLOCATIONS, METHODS, Progress, RankPolicy, RewriteConfig
from onnxsvd.errors import FactorizationError, OutputError, UsageError
from onnxsvd.factorize import Decomposition, decompose, truncate
from onnxsvd.graph import GraphIndex, Site, find_sites, load_weight
from onnxsvd.graph.lora import LoraSlot, adapter_values, check_same_graph, emit_lora, plan_slots
from onnxsvd.pipeline.group import _stage_ranks, group_statistics, metric_for, svd_options, weight_groups
from onnxsvd.rank import ByteCost, choose_rank
from onnxsvd.rank.allocate import AllocationSite, allocate_budget, allocate_energy

__all__ = ["ADAPTER_FACTOR_DTYPES", "BASE_LORA_NAME", "ExtractConfig", "DeltaReport", "AdapterReport",
           "ExtractReport", "extract"]

log = logging.getLogger(__name__)

#: ``--factor-dtype`` of adapter factors (``auto``: the site's own dtype). int8 factors would need a
#: dequantization per run of every adapter input, which ONNX Runtime's adapters do not express.
ADAPTER_FACTOR_DTYPES = ("auto", "fp32", "fp16")
#: The adapter model's file name in the output folder.
BASE_LORA_NAME = "base_lora.onnx"
#: ``--tolerance``'s default: a delta with ``‖ΔW‖_F ≤ 1e-6·‖W_base‖_F`` is float noise, not a fine-tune.
DEFAULT_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """How deltas are extracted. Every default is here.

    Attributes:
        policy: the rank policy of each delta (``--rank``, ``--ratio``, ``--energy``); a fixed rank 16 by
            default, not aligned. Its ``allow_growth`` is always on: an adapter has no dense weight to keep,
            so a delta left out for its bytes would be lost; a delta whose factors are no smaller than the
            dense delta (a narrow head at rank ≥ its outputs) is carried, capped at its full rank
            ``min(K, N)``, and its reason says so.
        stages: residual stages per delta (each fitted to what the earlier, rounded stages left).
        method: ``"svd"`` (plain), ``"whiten"`` or ``"asvd"`` (need ``data``: the tuned model's activations).
        damping: whitening's damping, relative to the mean of ``diag(XᵀX)``.
        alpha: ASVD's exponent.
        factor_dtype: ``auto`` (the site's dtype), ``fp32`` or ``fp16`` (cast to the site's dtype in the graph).
        tolerance: deltas with ``‖ΔW‖_F / ‖W_base‖_F`` at or below this are left out (reported).
        allocate: ``"uniform"`` (each delta by the policy) or ``"global"`` (one budget per tuned model:
            ``--ratio`` of the adapted sites' parameters, or ``--energy`` of their deltas' energy together).
        merge: also write a standalone model per tuned model with the low-rank delta as a constant branch.
        include: regular expression; only sites whose node name matches.
        exclude: regular expression; sites whose node name matches are left out.
        min_params: sites with fewer weight parameters are left out.
        svd: ``"exact"``, ``"randomized"`` or ``"auto"``.
        calibration: how the data is read and run (batch size, samples, providers).
    """

    policy: RankPolicy = RankPolicy(kind="rank", value=16, align=1)
    stages: int = 1
    method: str = "svd"
    damping: float = 1e-2
    alpha: float = 0.5
    factor_dtype: str = "auto"
    tolerance: float = DEFAULT_TOLERANCE
    allocate: str = "uniform"
    merge: bool = False
    include: str | None = None
    exclude: str | None = None
    min_params: int = 0
    svd: str = "auto"
    calibration: CalibrateConfig = CalibrateConfig()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.factor_dtype not in ADAPTER_FACTOR_DTYPES:
            raise UsageError(
                f"--factor-dtype {self.factor_dtype!r} is not offered for adapters; use one of "
                f"{', '.join(ADAPTER_FACTOR_DTYPES)}"
            )
        if not 0.0 <= self.tolerance < 1.0:
            raise UsageError(f"--tolerance must be in [0, 1) (relative to ‖W_base‖), got {self.tolerance:g}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown --allocate {self.allocate!r}; use one of {', '.join(ALLOCATIONS)}")
        self.rewrite_config()  # validates the rest (stages, damping, patterns, global with a fixed rank…)

    def rewrite_config(self) -> RewriteConfig:
        """The factorization settings as the rewrite's configuration (every check of it applies)."""
        return RewriteConfig(
            policy=self.policy, stages=self.stages, method=self.method, alpha=self.alpha, damping=self.damping,
            include=self.include, exclude=self.exclude, min_params=self.min_params, min_share=0.0,
            dtype="auto" if self.factor_dtype == "auto" else self.factor_dtype, svd=self.svd,
            allocate=self.allocate,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["calibration"]["providers"] = list(self.calibration.providers)
        return data


@dataclasses.dataclass
class DeltaReport:
    """One weight group's delta in one tuned model.

    Attributes:
        name: the group's first site; ``sites`` every site reading it.
        action: ``"adapted"``, ``"unchanged"`` (zero delta), ``"below tolerance"`` or ``"kept out"``.
        reason: how the rank was chosen, or why it was left out.
        delta_norm: ``‖ΔW‖_F / ‖W_base‖_F``.
        rank: the factors' rank (0 when not adapted).
        kept_energy: share of the delta's ``Σσ²`` (in the metric) the rank keeps.
        delta_error: ``‖ΔW − A·B‖_F / ‖ΔW‖_F`` (plain Frobenius, whatever the metric).
        adapter_bytes: bytes of ``A`` and ``B`` in the adapter.
    """

    name: str
    sites: list[str]
    k: int
    n: int
    action: str
    reason: str
    delta_norm: float = 0.0
    rank: int = 0
    kept_energy: float | None = None
    delta_error: float | None = None
    adapter_bytes: int = 0


@dataclasses.dataclass
class AdapterReport:
    """What was extracted from one tuned model.

    Attributes:
        changed_elsewhere: initializers whose values differ from the base's but that are no site's weight
            (biases, norms, embeddings…): the adapter does not carry these changes.
    """

    tuned: str
    adapter: str
    merged: str | None
    deltas: list[DeltaReport]
    adapter_bytes: int = 0
    merged_bytes: int | None = None
    calibrated: bool = False
    changed_elsewhere: list[str] = dataclasses.field(default_factory=list)

    @property
    def adapted(self) -> list[DeltaReport]:
        return [delta for delta in self.deltas if delta.action == "adapted"]


@dataclasses.dataclass
class ExtractReport:
    """Everything ``extract`` wrote and decided.

    Attributes:
        base: the base model's path; ``base_bytes`` its file size.
        base_lora: the adapter model's path; ``base_lora_bytes`` its file size.
        model_version: the version every adapter of ``base_lora`` carries.
        slots: the adapter inputs of ``base_lora``.
        adapters: one per tuned model.
        skips: nodes of the base that are not sites, with the reason.
    """

    base: str
    base_lora: str
    model_version: int
    slots: list[LoraSlot]
    adapters: list[AdapterReport]
    skips: list[dict[str, Any]]
    config: ExtractConfig
    base_bytes: int = 0
    base_lora_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "base_lora": self.base_lora, "model_version": self.model_version,
            "base_bytes": self.base_bytes, "base_lora_bytes": self.base_lora_bytes,
            "slots": [slot.to_dict() for slot in self.slots],
            "adapters": [dataclasses.asdict(adapter) for adapter in self.adapters],
            "skips": self.skips, "config": self.config.to_dict(), "seconds": self.seconds,
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with io.atomic_path(path) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")


def _stem(path: Path) -> str:
    return path.name.removesuffix(".onnx") if path.name.endswith(".onnx") else path.stem


def _output_paths(base: Path, tuned: list[Path], folder: Path, merge: bool) -> dict[str, Path]:
    """Every file extract writes, by role (``base_lora``, ``report``, ``adapter:<stem>``, ``merged:<stem>``).

    Raises:
        UsageError: two tuned models have one file name, or a tuned model is the base.
        OutputError: an output would be an input, or the folder cannot hold the results.
    """
    stems = [_stem(path) for path in tuned]
    if len(set(stems)) != len(stems):
        raise UsageError(f"two tuned models have one file name ({stems}); their adapters would collide: rename one")
    for path in tuned:
        if path.exists() and base.exists() and os.path.samefile(path, base):
            raise UsageError(f"tuned model {path} is the base model; give a fine-tune of it")
    paths = {"base_lora": folder / BASE_LORA_NAME, "report": folder / "extract.json"}
    for stem in stems:
        paths[f"adapter:{stem}"] = folder / f"{stem}.onnx_adapter"
        if merge:
            paths[f"merged:{stem}"] = folder / f"{stem}_merged.onnx"
    if len({p.name for p in paths.values()}) != len(paths):
        raise UsageError("a tuned model's name collides with base_lora.onnx or extract.json: rename it")
    inputs: dict[str, Path | None] = {"base": base} | {f"tuned {p}": p for p in tuned}
    io.check_output_folder("-o", folder, list(paths.values()), inputs)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"-o {folder} is a file; give a folder")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not folder.exists() and not parent.is_dir():
        raise OutputError(f"the parent of -o {folder} does not exist; create it first")
    return paths


def _metric_statistics(
    tuned: onnx.ModelProto, tuned_path: Path, data_path: Path | None, config: ExtractConfig,
    progress: Progress | None,
) -> Statistics | None:
    if config.method == "svd":
        return None
    if data_path is None:
        raise UsageError(f"--method {config.method} factorizes in the tuned model's activations: give --data")
    batches, count = batch_source(data_path, tuned, config.calibration)
    return calibrate(tuned, batches, config.calibration, progress=progress, total_batches=count,
                     base_dir=tuned_path.parent)


def _data_paths(
    data_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None, count: int
) -> list[Path | None]:
    """One calibration data path (or ``None``) per tuned model.

    Raises:
        UsageError: a list whose length is neither 1 nor the number of tuned models.
    """
    if data_path is None:
        return [None] * count
    if isinstance(data_path, str | os.PathLike):
        return [Path(data_path)] * count
    given = [Path(path) for path in data_path]
    if len(given) == 1:
        return given * count
    if len(given) != count:
        raise UsageError(f"give one --data for all tuned models or one per tuned model ({count}), got {len(given)}")
    return list(given)


def _changed_elsewhere(
    base: onnx.ModelProto, tuned: onnx.ModelProto, sites: Sequence[Site], base_path: Path, tuned_path: Path
) -> list[str]:
    """Initializers that differ in value between the models and hold no site's weight."""
    weights = {site.weight.tensor for site in sites}
    theirs = {tensor.name: tensor for tensor in tuned.graph.initializer}
    changed = []
    for tensor in base.graph.initializer:
        if tensor.name in weights:
            continue
        ours = io.tensor_array(tensor, base_path.parent)
        other = io.tensor_array(theirs[tensor.name], tuned_path.parent)
        if not np.array_equal(ours, other):
            changed.append(tensor.name)
    return changed


def _factor_dtype(site: Site, config: ExtractConfig) -> int:
    if config.factor_dtype == "fp16":
        return onnx.TensorProto.FLOAT16
    if config.factor_dtype == "fp32":
        return onnx.TensorProto.FLOAT
    return site.weight.compute_dtype


@dataclasses.dataclass
class _Delta:
    """A group's delta being extracted: its report, its decomposition and, once truncated, its factors."""

    report: DeltaReport
    delta: np.ndarray | None = None  # [K, N]
    decomposition: Decomposition | None = None
    factors: tuple[np.ndarray, np.ndarray] | None = None  # A [K, r], B [r, N]


def _deltas(
    groups: OrderedDict[str, list[Site]],
    base_index: GraphIndex,
    tuned_index: GraphIndex,
    base_dir: str,
    tuned_dir: str,
    statistics: Statistics | None,
    config: ExtractConfig,
) -> OrderedDict[str, _Delta]:
    """Every group's delta, decomposed in its metric (left out: zero, below tolerance, or failing)."""
    rewrite = config.rewrite_config()
    fixed_rank = int(config.policy.value) if config.policy.kind == "rank" else None
    results: OrderedDict[str, _Delta] = OrderedDict()
    for key, sites in groups.items():
        site = sites[0]
        report = DeltaReport(site.name, [s.name for s in sites], site.k, site.n, "kept out", "")
        entry = results[key] = _Delta(report)
        try:
            base_weight = load_weight(base_index, site, base_dir)  # [K, N]
            tuned_weight = load_weight(tuned_index, site, tuned_dir)  # [K, N]
            delta = tuned_weight - base_weight  # [K, N]
            if not np.all(np.isfinite(delta)):
                raise FactorizationError("the delta holds NaN or Inf")
            norm, base_norm = float(np.linalg.norm(delta)), float(np.linalg.norm(base_weight))
            report.delta_norm = norm / base_norm if base_norm > 0 else (0.0 if norm == 0 else float("inf"))
            if norm == 0.0:
                report.action, report.reason = "unchanged", "the weight did not change"
                continue
            if report.delta_norm <= config.tolerance:
                report.action = "below tolerance"
                report.reason = (f"‖ΔW‖/‖W‖ = {report.delta_norm:.2e} ≤ --tolerance {config.tolerance:g}: left out")
                continue
            metric = metric_for(rewrite, group_statistics(sites, statistics))  # Lᵀ
            planned = min(fixed_rank, site.k, site.n) if fixed_rank and config.allocate == "uniform" else None
            entry.delta = delta
            entry.decomposition = decompose(delta, metric, rank=planned, options=svd_options(rewrite))
        except FactorizationError as error:
            report.reason = str(error)
    return results


def _cost(site: Site, config: ExtractConfig) -> ByteCost:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(_factor_dtype(site, config)).itemsize
    return ByteCost(site.dense_bytes, itemsize, "dense delta against its factors")


def _choose_ranks(
    groups: OrderedDict[str, list[Site]], deltas: OrderedDict[str, _Delta], config: ExtractConfig
) -> dict[str, int]:
    """The total rank of each decomposed delta (absent: left out, with the reason in its report)."""
    live = {key: entry for key, entry in deltas.items() if entry.decomposition is not None}
    ranks: dict[str, int] = {}
    policy = dataclasses.replace(config.policy, allow_growth=True)  # no dense weight to keep in an adapter
    if config.allocate == "uniform":
        for key, entry in live.items():
            site = groups[key][0]
            cost = _cost(site, config)
            decision = choose_rank(policy, site.k, site.n, entry.decomposition.s, cost)
            entry.report.reason = decision.reason
            if not decision.dense:
                ranks[key] = decision.rank
                chain = cost.chain_bytes(site.k, site.n, decision.rank)
                if chain >= cost.dense_bytes:
                    entry.report.reason += (
                        f"; factors {chain:,} B ≥ the dense delta's {cost.dense_bytes:,} B: carried anyway "
                        f"(an adapter keeps no dense weight: left out, the delta would be lost)"
                    )
        return ranks
    candidates = [
        AllocationSite(key, groups[key][0].k, groups[key][0].n, entry.decomposition.s, 1.0, policy.floor,
                       min(groups[key][0].k, groups[key][0].n))
        for key, entry in live.items()
    ]
    if not candidates:
        return ranks
    if config.policy.kind == "ratio":
        allocation = allocate_budget(candidates, config.policy.value, config.policy.align)
        how = f"global allocation: --ratio {config.policy.value:g} of the adapted sites' parameters"
    else:
        allocation = allocate_energy(candidates, config.policy.value, config.policy.align)
        how = f"global allocation: --energy {config.policy.value:g} of the deltas' energy together"
    for key, rank in allocation.ranks.items():
        ranks[key] = rank
        note = allocation.notes.get(key)
        live[key].report.reason = f"{how}: rank {rank}" + (f" ({note})" if note else "")
    return ranks


def _truncate(groups: OrderedDict[str, list[Site]], deltas: OrderedDict[str, _Delta], ranks: dict[str, int],
              config: ExtractConfig) -> None:
    rewrite = config.rewrite_config()
    for key, rank in ranks.items():
        entry, site = deltas[key], groups[key][0]
        storage = onnx.helper.tensor_dtype_to_np_dtype(_factor_dtype(site, config))
        try:
            factorization = truncate(entry.decomposition, _stage_ranks(rewrite, rank), storage)
        except FactorizationError as error:
            entry.report.reason = str(error)
            continue
        a, b = factorization.fused()  # [K, R], [R, N]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            entry.report.reason = "factors overflow the factor dtype (NaN/Inf)"
            continue
        entry.factors = (a, b)
        report = entry.report
        report.action, report.rank = "adapted", factorization.rank
        report.kept_energy = factorization.kept_energy
        report.delta_error = float(np.linalg.norm(entry.delta - factorization.product()) / np.linalg.norm(entry.delta))
        report.adapter_bytes = int(a.nbytes + b.nbytes)


def _model_version(base: onnx.ModelProto, base_dir: Path, slots: list[LoraSlot]) -> int:
    """A 28-bit number from the base's fingerprint and the slot names: what ties an adapter to its model."""
    text = io.fingerprint(base, base_dir) + "|" + "|".join(f"{s.a_name},{s.b_name},{s.k},{s.n}" for s in slots)
    return int(hashlib.sha256(text.encode()).hexdigest()[:7], 16)


def _serialized(model: onnx.ModelProto, where: str) -> bytes:
    io.check_model(model, full_check=True)
    if model.ByteSize() >= io.PROTOBUF_LIMIT:
        raise OutputError(f"{where} would be over 2 GB; extract does not write external data yet")
    return model.SerializeToString()


def extract(
    base_path: str | os.PathLike[str],
    tuned_paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
    output_dir: str | os.PathLike[str],
    config: ExtractConfig | None = None,
    data_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    progress: Progress | None = None,
) -> ExtractReport:
    """Extract each tuned model's delta from the base as an ONNX Runtime adapter of one adapter model.

    Args:
        base_path: the base model.
        tuned_paths: one or more fine-tunes of it (the same graph with other weights).
        output_dir: the folder to write into (made if missing; removed again if extract fails there).
        config: ranks, method, factor dtype, tolerance, merge (defaults: rank 16, plain SVD).
        data_path: calibration data for ``method`` ``whiten``/``asvd``, run through each tuned model: one
            path for all, or one per tuned model (each task's own data), in order.
        progress: optional callback ``(done, total, item)``.

    Returns:
        The report (also written as ``extract.json``).

    Raises:
        ModelError: a model cannot be loaded, or a tuned graph differs from the base beyond weights.
        UsageError: an impossible option, no tuned model, two tuned models of one name.
        DataError: the data does not fit the tuned model.
        OutputError: the outputs cannot be written (nothing is left behind).
    """
    started = time.perf_counter()
    config = config or ExtractConfig()
    base_path, folder = Path(base_path), Path(output_dir)
    tuned = [Path(path) for path in tuned_paths]
    if not tuned:
        raise UsageError("give at least one tuned model to extract from")
    if config.method != "svd" and not data_path:
        raise UsageError(f"--method {config.method} factorizes in the tuned model's activations: give --data")
    data_paths = _data_paths(data_path, len(tuned))
    paths = _output_paths(base_path, tuned, folder, config.merge)
    base = io.load_model(base_path)
    tuned_models = []
    for path in tuned:
        model = io.load_model(path)
        check_same_graph(base, model, str(path))
        tuned_models.append(model)
    match = find_sites(base, config.rewrite_config())
    groups = weight_groups(match.sites)
    base_index = GraphIndex(base.graph)

    per_tuned: list[tuple[AdapterReport, OrderedDict[str, _Delta]]] = []
    for done, (path, model) in enumerate(zip(tuned, tuned_models, strict=True), start=1):
        statistics = _metric_statistics(model, path, data_paths[done - 1], config, None)
        deltas = _deltas(groups, base_index, GraphIndex(model.graph), str(base_path.parent), str(path.parent),
                         statistics, config)
        _truncate(groups, deltas, _choose_ranks(groups, deltas, config), config)
        stem = _stem(path)
        merged = paths.get(f"merged:{stem}")
        report = AdapterReport(str(path), str(paths[f"adapter:{stem}"]), str(merged) if merged else None,
                               [entry.report for entry in deltas.values()], calibrated=statistics is not None,
                               changed_elsewhere=_changed_elsewhere(base, model, match.sites, base_path, path))
        if report.changed_elsewhere:
            log.warning(
                "%s: %d weights that are no site's changed and are not in the adapter: %s", path,
                len(report.changed_elsewhere), ", ".join(report.changed_elsewhere[:5]),
            )
        per_tuned.append((report, deltas))
        log.info("%s: %d of %d weight groups adapted", path, len(report.adapted), len(groups))
        if progress is not None:
            progress(done, len(tuned), str(path))

    adapted = [key for key in groups if any(deltas[key].factors is not None for _, deltas in per_tuned)]
    if not adapted:
        reasons = {entry.report.reason for _, deltas in per_tuned for entry in deltas.values()}
        raise UsageError(
            "no delta to extract: every site's weight is unchanged, below --tolerance or kept out "
            f"({'; '.join(sorted(reasons))[:300] or 'no MatMul/Gemm site with a constant weight'})"
        )
    adapted_groups = OrderedDict((key, groups[key]) for key in adapted)
    slots = plan_slots(base, adapted_groups, {key: _factor_dtype(groups[key][0], config) for key in adapted})
    version = _model_version(base, base_path.parent, slots)
    files: dict[Path, Any] = {paths["base_lora"]: _serialized(emit_lora(base, adapted_groups, slots, None, version),
                                                                str(paths["base_lora"]))}
    for report, deltas in per_tuned:
        factors = {key: entry.factors for key, entry in deltas.items() if entry.factors is not None}
        files[Path(report.adapter)] = adapter_values(slots, factors)
        if report.merged is not None:
            merged = emit_lora(base, adapted_groups, slots, factors)
            files[Path(report.merged)] = _serialized(merged, report.merged)
    result = ExtractReport(
        base=str(base_path), base_lora=str(paths["base_lora"]), model_version=version, slots=slots,
        adapters=[report for report, _ in per_tuned],
        skips=[dataclasses.asdict(skip) for skip in match.skips], config=config,
    )
    _write_all(folder, files, result, paths["report"], version)
    result.base_bytes = io.file_size(base_path)
    result.base_lora_bytes = io.file_size(paths["base_lora"])
    for report in result.adapters:
        report.adapter_bytes = io.file_size(report.adapter)
        report.merged_bytes = io.file_size(report.merged) if report.merged else None
    result.seconds = time.perf_counter() - started
    result.write_json(paths["report"])  # again, with the file sizes
    return result


def _write_all(folder: Path, files: dict[Path, Any], report: ExtractReport, report_path: Path, version: int) -> None:
    """Write every output to a temporary file beside it, then move them all into place; on any failure
    nothing is left (a folder made here is removed again)."""
    made = not folder.exists()
    try:
        folder.mkdir(parents=False, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for path, content in files.items():
                temporary = stack.enter_context(io.atomic_path(path))
                if isinstance(content, bytes):
                    temporary.write_bytes(content)
                else:
                    write_adapter(temporary, content, version, adapter_version=1)
            report_temporary = stack.enter_context(io.atomic_path(report_path))
            report_temporary.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    except OSError as error:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise OutputError(f"cannot write into {folder}: {error.strerror or error}; check the folder") from error
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
