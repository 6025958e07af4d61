"""Sweep: rewrite a model at several ratios with several methods, validate each, and draw the trade-off.

For every method × ratio the model is rewritten (calibrating once: the statistics are shared by every
activation-aware rewrite), written to ``DIR/models/<method>_<ratio>.onnx``, and validated against the
original on the evaluation data (accuracy per output, latency per provider next to the speedup bound,
size). The results go to ``DIR/sweep.json``, a markdown table ``DIR/sweep.md`` and two plots:
``DIR/fidelity.png`` (cosine per output against kept parameters, a line per method) and
``DIR/speedup.png`` (measured speedup against kept parameters, per provider, with the bound).

"Kept parameters" is the kept fraction of the constant-weight MatMul/Gemm layers' parameters
(``Σ params_after / Σ params_before`` over the sites), the quantity ``--ratio`` sets per layer; "linear
bytes" is the bytes of those layers as stored (every tensor in its own dtype: packed int4 values, scales,
zero points, factors) relative to their bytes in the original.

With ``baselines`` (``--baselines int8,int4``) ONNX Runtime's own quantizers are run on the original
through their API (:mod:`onnxsvd.quantize.baselines`) and validated the same way, into the same table and
two more plots: ``DIR/fidelity_bytes.png`` (cosine against linear bytes) and ``DIR/fidelity_latency.png``
(cosine against the rewritten model's median latency), where every row, rewrite or baseline, is a point.

Library use::

    from onnxsvd.sweep import SweepConfig, sweep
    result = sweep("model.onnx", "calib.npz", "out/", SweepConfig(ratios=(0.5,), methods=("svd", "whiten")))
    print(result.entries[0].outputs[0]["cosine"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxsvd import io
from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate, resolve_mask
from onnxsvd.config import METHODS, Progress, RewriteConfig, ValidateConfig, check_provider_names
from onnxsvd.data import Batches, load_inputs
from onnxsvd.errors import OutputError, UsageError
from onnxsvd.graph import find_sites
from onnxsvd.pipeline import RewriteReport, rewrite, rewrite_sequential
from onnxsvd.pipeline.speed import SiteSpeedCheck, SpeedCheckConfig
from onnxsvd.quantize.baselines import BASELINES, parse_baselines, write_baseline
from onnxsvd.validate.latency import check_providers
from onnxsvd.validate.pipeline import validate
from onnxsvd.validate.profile import ProfileCache

__all__ = [
    "SWEEP_METHODS",
    "SweepConfig",
    "SweepEntry",
    "SweepResult",
    "parse_methods",
    "summary_table",
    "sweep",
]

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Methods a sweep accepts: each rewrite method, alone or with the sequential closed form.
SWEEP_METHODS = (*METHODS, *(f"{method}+sequential" for method in METHODS))

#: The sweep's own files in its folder, by name (``SweepResult.files``), and the folder of the models.
RESULT_FILES = {
    "json": "sweep.json", "markdown": "sweep.md", "fidelity": "fidelity.png", "speedup": "speedup.png",
    "fidelity_bytes": "fidelity_bytes.png", "fidelity_latency": "fidelity_latency.png",
}
MODELS_FOLDER = "models"


def parse_methods(text: str) -> tuple[str, ...]:
    """``"svd,whiten+sequential"`` → ``("svd", "whiten+sequential")``.

    Raises:
        UsageError: empty, unknown or repeated names.
    """
    methods = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not methods:
        raise UsageError(f"--methods takes a comma-separated list of {', '.join(SWEEP_METHODS)}, got {text!r}")
    for method in methods:
        if method not in SWEEP_METHODS:
            raise UsageError(f"unknown method {method!r}; use one of {', '.join(SWEEP_METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods lists a method twice: {text}")
    return methods


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to measure it. Every default is here.

    Attributes:
        ratios: kept fractions of each layer's parameters.
        methods: from :data:`SWEEP_METHODS`.
        rewrite: the other rewrite options (align, layout, dtype, selection, damping…); its policy and
            method are replaced by each ratio and method.
        calibration: how the calibration data is read and run.
        providers: execution providers to time; accuracy runs on the first.
        warmup: untimed runs of each model before timing.
        iters: timed runs of each model.
        threads: onnxruntime ``intra_op_num_threads`` for validation (``None``: onnxruntime's default).
        batch_size: evaluation batch size (``None``: validate's default).
        max_eval_samples: use at most this many evaluation samples.
        speed_check: keep dense the sites whose chain is not faster (``--keep-dense-if-slower``).
        baselines: ONNX Runtime quantizers to run beside the rewrites (keys of
            :data:`onnxsvd.quantize.baselines.BASELINES`, or ``int4`` for both block sizes).
    """

    ratios: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    methods: tuple[str, ...] = ("svd", "whiten")
    rewrite: RewriteConfig = RewriteConfig()
    calibration: CalibrateConfig = CalibrateConfig()
    providers: tuple[str, ...] = ("cpu",)
    warmup: int = 5
    iters: int = 20
    threads: int | None = None
    batch_size: int | None = None
    max_eval_samples: int | None = None
    speed_check: SpeedCheckConfig | None = None
    baselines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "baselines", parse_baselines(",".join(self.baselines)) if self.baselines else ())
        if not self.ratios:
            raise UsageError("--ratios needs at least one ratio, e.g. 0.3,0.5,0.7,0.9")
        for ratio in self.ratios:
            if not 0.0 < ratio <= 1.0:
                raise UsageError(f"--ratios must be in (0, 1] (kept fraction of parameters), got {ratio:g}")
        if len(set(self.ratios)) != len(self.ratios):
            raise UsageError(f"--ratios lists a ratio twice: {','.join(f'{r:g}' for r in self.ratios)}")
        parse_methods(",".join(self.methods))
        check_provider_names(self.providers)
        if self.iters < 1 or self.warmup < 0:
            raise UsageError(f"need --iters ≥ 1 and --warmup ≥ 0, got {self.iters} and {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratios": list(self.ratios),
            "methods": list(self.methods),
            "rewrite": {
                "align": self.rewrite.policy.align,
                "layout": self.rewrite.layout,
                "dtype": self.rewrite.dtype,
                "damping": self.rewrite.damping,
                "alpha": self.rewrite.alpha,
                "include": self.rewrite.include,
                "exclude": self.rewrite.exclude,
                "min_params": self.rewrite.min_params,
                "min_rank": self.rewrite.policy.floor,
                "min_share": self.rewrite.min_share,
            },
            "calibration": {
                "batch_size": self.calibration.batch_size,
                "max_samples": self.calibration.max_samples,
                "providers": list(self.calibration.providers),
            },
            "providers": list(self.providers),
            "warmup": self.warmup,
            "iters": self.iters,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "max_eval_samples": self.max_eval_samples,
            "keep_dense_if_slower": self.speed_check is not None,
            "baselines": list(self.baselines),
        }


@dataclasses.dataclass
class SweepEntry:
    """One method at one ratio, rewritten and validated.

    Attributes:
        method: e.g. ``"whiten"`` or ``"whiten+sequential"``; ``"ort-int8"``… for a baseline.
        ratio: the kept fraction each layer was asked for (``None`` for a baseline).
        model: path of the rewritten model.
        kept_params: kept fraction of the MatMul/Gemm layers' parameters.
        params: parameters of the whole rewritten model.
        params_kept_model: kept fraction of the whole model's parameters.
        file_size: bytes on disk (external data included).
        linear_bytes: bytes of the MatMul/Gemm layers as stored, relative to the original's.
        sites_factorized: sites replaced by a chain (by a quantized node for a baseline).
        sites_kept: sites left dense (skips and the break-even guard included).
        outputs: per output: ``name``, ``cosine``, ``sqnr_db``, ``relative``, ``top1_agreement``, and
            ``accuracy_original``/``accuracy_rewritten`` against labels (``None`` without labels).
        speed: per provider: ``provider``, ``speedup`` (ratio of medians) and ``speedup_range`` (p10–p90
            of the paired ratios), ``bound``, ``share`` and ``share_range`` (min–max over the profiled
            runs; one profile of the original serves every entry), ``exceeds_bound``, ``original_ms``,
            ``rewritten_ms`` (medians) and their ``…_range`` (p10–p90); ``bound_note`` says why a speedup
            beat its bound (``None`` when it did not).
        rewrite_seconds: time to rewrite.
        validate_seconds: time to validate.
        notes: the validation's notes.
    """

    method: str
    ratio: float | None
    model: str
    kept_params: float
    params: int
    params_kept_model: float
    file_size: int
    linear_bytes: float
    sites_factorized: int
    sites_kept: int
    outputs: list[dict[str, Any]]
    speed: list[dict[str, Any]]
    rewrite_seconds: float
    validate_seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SweepResult:
    """Every entry, and where the files went."""

    model: str
    data: str
    eval_data: str
    output: str
    config: SweepConfig
    params: int
    file_size: int
    entries: list[SweepEntry]
    calibrate_seconds: float = 0.0
    seconds: float = 0.0
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "eval_data": self.eval_data,
            "output": self.output,
            "config": self.config.to_dict(),
            "machine": _machine(),
            "original": {"params": self.params, "file_size": self.file_size},
            "entries": [dataclasses.asdict(entry) for entry in self.entries],
            "calibrate_seconds": self.calibrate_seconds,
            "seconds": self.seconds,
            "files": self.files,
        }


def _machine() -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_1min": load,
    }


def _linear_kept(report: RewriteReport) -> float:
    before = sum(site.params_before for site in report.sites if site.shape)
    after = sum(site.params_after for site in report.sites if site.shape)
    return after / before if before else 1.0


def _file_name(method: str, ratio: float | None) -> str:
    return f"{method}.onnx" if ratio is None else f"{method}_{ratio:g}.onnx"


@dataclasses.dataclass(frozen=True)
class _LinearBytes:
    """The bytes of a model that are not its linear layers, to tell the linear layers' bytes of any model
    of the same graph: every tensor but the MatMul/Gemm weights is left as it is by a rewrite or quantizer."""

    other: int
    linear: int

    def share(self, model: onnx.ModelProto) -> float:
        return (io.count_bytes(model) - self.other) / self.linear if self.linear else 1.0


def sweep(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    config: SweepConfig | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Rewrite ``model_path`` at every ratio with every method, validate each, write JSON, markdown, plots.

    Args:
        model_path: the model.
        data_path: calibration data (``.npz`` or folder).
        output_dir: folder for ``sweep.json``, ``sweep.md``, the plots and ``models/`` (created).
        config: ratios, methods, providers, timing.
        eval_data: evaluation data (default: ``data_path``).
        progress: callback per step (calibration, then each rewrite + validation).

    Returns:
        The result (also written to ``output_dir/sweep.json``).

    Raises:
        ProviderError: a provider is not available (checked before any work).
        OutputError: ``output_dir`` is a file or cannot be created, is or lies inside an input folder, or
            holds an input (checked before any work). A failed sweep removes the folders it created
            when they are empty.
        ModelError, DataError: as ``rewrite`` and ``validate``.
    """
    config = config or SweepConfig()
    started = time.perf_counter()
    check_providers(config.providers)
    check_providers(config.calibration.providers)
    if config.speed_check is not None:
        check_providers(config.speed_check.providers)
    model_path, data_path = Path(model_path), Path(data_path)
    eval_path = Path(eval_data) if eval_data is not None else data_path
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} is a file; give a folder for the sweep's results")
    io.check_output_folder(
        "-o", output, result_files(output, config).values(),
        {"model": model_path, "--data": data_path, "--eval-data": eval_data},
    )
    _check_plotting()

    model = io.load_model(model_path)
    load_inputs(eval_path, model, config.max_eval_samples)  # the evaluation data fits, before any work
    batches, count = batch_source(data_path, model, config.calibration)
    created = _make_folders(output / MODELS_FOLDER)
    try:
        result = _run(model, model_path, data_path, eval_path, output, config, batches, count, progress)
    except BaseException:
        _remove_empty(created)  # a failed sweep leaves no empty folder behind (folders that existed stay)
        raise
    result.seconds = time.perf_counter() - started
    return result


def _run(
    model: onnx.ModelProto,
    model_path: Path,
    data_path: Path,
    eval_path: Path,
    output: Path,
    config: SweepConfig,
    batches: Batches,
    count: int,
    progress: Progress | None,
) -> SweepResult:
    """The work of :func:`sweep` once every input is checked and the folders exist."""
    models_dir = output / MODELS_FOLDER
    total = len(config.methods) * len(config.ratios) + len(config.baselines)
    linear = sum(site.dense_bytes for site in find_sites(model, config.rewrite).sites)
    bytes_of = _LinearBytes(io.count_bytes(model) - linear, linear)
    plain = {method.partition("+")[0] for method in config.methods if not method.endswith("+sequential")}
    statistics = None
    calibrate_seconds = 0.0
    if plain & {"asvd", "whiten"}:
        tick = time.perf_counter()
        statistics = calibrate(model, batches, config.calibration, total_batches=count, base_dir=model_path.parent)
        calibrate_seconds = time.perf_counter() - tick
        log.info("calibrated once in %.1f s; the statistics serve every activation-aware rewrite", calibrate_seconds)
    check = None
    if config.speed_check is not None:
        batch = None if config.speed_check.input_shapes else next(iter(batches()), None)
        check = SiteSpeedCheck(config.speed_check, batch=batch, layout=config.rewrite.layout)
    mask_input = resolve_mask(model, config.calibration)
    entries: list[SweepEntry] = []
    profiles = ProfileCache()  # the original is profiled once per provider: every entry's bound reads it
    done = 0
    for method in config.methods:
        base, _, variant = method.partition("+")
        for ratio in config.ratios:
            if progress is not None:
                progress(done, total, f"{method} {ratio:g}")
            rewrite_config = dataclasses.replace(
                config.rewrite, policy=dataclasses.replace(config.rewrite.policy, kind="ratio", value=ratio),
                method=base,
            )
            tick = time.perf_counter()
            if variant == "sequential":
                result = rewrite_sequential(
                    model, rewrite_config, batches, providers=config.calibration.providers, mask_input=mask_input,
                    base_dir=str(model_path.parent), speed_check=check,
                )
            else:
                result = rewrite(
                    model, rewrite_config, statistics if base != "svd" else None, base_dir=model_path.parent,
                    speed_check=check,
                )
            rewrite_seconds = time.perf_counter() - tick
            path = models_dir / _file_name(method, ratio)
            io.save_model(result.model, path, base_dir=model_path.parent)
            report = result.report
            report.input, report.output = str(model_path), str(path)
            report.write_json(path.with_suffix(".report.json"))
            tick = time.perf_counter()
            validation = validate(
                model_path, path, eval_path,
                ValidateConfig(
                    providers=config.providers, warmup=config.warmup, iters=config.iters, threads=config.threads,
                    batch_size=config.batch_size, max_samples=config.max_eval_samples,
                    factorized_sites=tuple(site.name for site in report.factorized),
                ),
                enforce_gate=False,
                profiles=profiles,
            )
            entries.append(_entry(method, ratio, path, report, validation, rewrite_seconds,
                                  time.perf_counter() - tick, bytes_of.share(result.model)))
            done += 1
            log.info("%s at %g: %s", method, ratio, entries[-1].outputs)
    for name in config.baselines:
        baseline = BASELINES[name]
        if progress is not None:
            progress(done, total, baseline.name)
        path = models_dir / _file_name(baseline.name, None)
        tick = time.perf_counter()
        write_baseline(name, model_path, path)
        rewrite_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        validation = validate(
            model_path, path, eval_path,
            ValidateConfig(
                providers=config.providers, warmup=config.warmup, iters=config.iters, threads=config.threads,
                batch_size=config.batch_size, max_samples=config.max_eval_samples, profile=False,
            ),
            enforce_gate=False,
        )
        entries.append(_baseline_entry(baseline.name, path, model, validation, rewrite_seconds,
                                       time.perf_counter() - tick, bytes_of))
        done += 1
        log.info("%s: %s", baseline.name, entries[-1].outputs)
    if progress is not None:
        progress(total, total, "writing results")
    result = SweepResult(
        model=str(model_path), data=str(data_path), eval_data=str(eval_path), output=str(output), config=config,
        params=io.count_parameters(model), file_size=io.file_size(model_path), entries=entries,
        calibrate_seconds=calibrate_seconds,
    )
    write_results(result)
    return result


def result_files(output: Path, config: SweepConfig) -> dict[str, Path]:
    """Every file a sweep with ``config`` writes into ``output``: name → path.

    The results (``json``, ``markdown``, ``fidelity``, ``speedup``) and, per method and ratio, the model,
    its external data (when written) and its report, under ``models/``.
    """
    files = {name: output / file for name, file in RESULT_FILES.items()}
    for method in config.methods:
        for ratio in config.ratios:
            path = output / MODELS_FOLDER / _file_name(method, ratio)
            files[path.stem] = path
            files[f"{path.stem} data"] = path.with_name(f"{path.name}.data")
            files[f"{path.stem} report"] = path.with_suffix(".report.json")
    for name in config.baselines:
        path = output / MODELS_FOLDER / _file_name(BASELINES[name].name, None)
        files[path.stem] = path
    return files


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first.

    Raises:
        OutputError: a folder cannot be created (whatever was created is removed).
    """
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.insert(0, path)
    except OSError as error:
        _remove_empty(created)
        raise OutputError(f"cannot create {folder}: {error.strerror or error}; choose another -o folder") from error
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; one holding files stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            log.info("kept %s after the failed sweep: it is not empty", folder)


def _outputs_and_speed(validation: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    outputs = [
        {
            "name": output.name,
            "cosine": output.cosine,
            "sqnr_db": output.sqnr_db,
            "relative": output.relative,
            "top1_agreement": output.top1_agreement,
            "accuracy_original": output.accuracy_original,
            "accuracy_rewritten": output.accuracy_rewritten,
        }
        for output in validation.outputs
    ]
    speed = [
        {
            "provider": item.provider,
            "speedup": item.timing.speedup,
            "bound": item.bound,
            "share": item.time_share.share if item.time_share is not None else None,
            "share_range": list(item.time_share.share_range) if item.time_share is not None else None,
            "exceeds_bound": item.exceeds_bound,
            "bound_note": item.bound_note(),
            "speedup_range": [item.timing.speedup_p10, item.timing.speedup_p90],
            "original_ms": item.timing.original.p50_ms,
            "original_ms_range": [item.timing.original.p10_ms, item.timing.original.p90_ms],
            "rewritten_ms": item.timing.rewritten.p50_ms,
            "rewritten_ms_range": [item.timing.rewritten.p10_ms, item.timing.rewritten.p90_ms],
            "batch_size": item.timing.batch_size,
        }
        for item in validation.speed
    ]
    return outputs, speed


def _entry(
    method: str, ratio: float, path: Path, report: RewriteReport, validation: Any, rewrite_seconds: float,
    validate_seconds: float, linear_bytes: float,
) -> SweepEntry:
    outputs, speed = _outputs_and_speed(validation)
    return SweepEntry(
        method=method,
        ratio=ratio,
        model=str(path),
        kept_params=_linear_kept(report),
        params=report.params_after,
        params_kept_model=report.params_after / report.params_before if report.params_before else 1.0,
        file_size=validation.size.bytes_rewritten,
        linear_bytes=linear_bytes,
        sites_factorized=len(report.factorized),
        sites_kept=len([site for site in report.kept if site.shape]),
        outputs=outputs,
        speed=speed,
        rewrite_seconds=rewrite_seconds,
        validate_seconds=validate_seconds,
        notes=list(validation.notes),
    )


def _baseline_entry(
    method: str, path: Path, original: onnx.ModelProto, validation: Any, rewrite_seconds: float,
    validate_seconds: float, bytes_of: _LinearBytes,
) -> SweepEntry:
    """A baseline's row: its parameters and bytes counted from the model it wrote (no rewrite report);
    its sites are the original's MatMul/Gemm nodes that are gone from it (replaced by quantized nodes). Its
    kept parameters are 1 (every weight value is kept, quantized); ``params`` counts the stored elements
    (packed int4 bytes count once), as :func:`onnxsvd.io.count_parameters` does for every row."""
    quantized = io.load_model(path)
    before = {node.name for node in original.graph.node if node.op_type in ("MatMul", "Gemm")}
    after = {node.name for node in quantized.graph.node if node.op_type in ("MatMul", "Gemm")}
    params_before, params_after = io.count_parameters(original), io.count_parameters(quantized)
    outputs, speed = _outputs_and_speed(validation)
    notes = list(validation.notes)
    if before & after:
        ops = sorted({node.op_type for node in quantized.graph.node if node.name in before & after})
        notes.insert(0, f"{len(before & after)} of {len(before)} {'/'.join(ops)} nodes left in float by ONNX "
                        f"Runtime's quantizer (MatMulNBitsQuantizer takes MatMul only)")
    return SweepEntry(
        method=method,
        ratio=None,
        model=str(path),
        kept_params=1.0,  # every weight value is kept, quantized: bytes, not parameters, tell it apart
        params=params_after,
        params_kept_model=params_after / params_before if params_before else 1.0,
        file_size=validation.size.bytes_rewritten,
        linear_bytes=bytes_of.share(quantized),
        sites_factorized=len(before - after),
        sites_kept=len(before & after),
        outputs=outputs,
        speed=speed,
        rewrite_seconds=rewrite_seconds,
        validate_seconds=validate_seconds,
        notes=notes,
    )


# ---------------------------------------------------------------- results: JSON, markdown, plots


def _check_plotting() -> None:
    try:  # matplotlib is optional (onnxsvd[plot]) and slow to import: loaded only to draw
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UsageError("sweep draws PNG plots and needs matplotlib: pip install 'onnxsvd[plot]'") from error


def write_results(result: SweepResult) -> dict[str, str]:
    """Write ``sweep.json``, ``sweep.md`` and the plots (:data:`RESULT_FILES`) into ``result.output``."""
    output = Path(result.output)
    files = {name: str(output / file) for name, file in RESULT_FILES.items()}
    result.files = files
    rewrites = [entry for entry in result.entries if entry.ratio is not None]  # kept parameters: rewrites only
    plot_fidelity(rewrites, files["fidelity"])
    plot_speedup(rewrites, files["speedup"])
    plot_fidelity_against(result.entries, files["fidelity_bytes"], "bytes")
    plot_fidelity_against(result.entries, files["fidelity_latency"], "latency")
    with io.atomic_path(files["markdown"], suffix=".md") as temporary:
        temporary.write_text(markdown_table(result), encoding="utf-8")
    with io.atomic_path(files["json"], suffix=".json") as temporary:
        temporary.write_text(json.dumps(result.to_dict(), indent=2, default=_json_number) + "\n", encoding="utf-8")
    return files


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _cell(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN"
    return f"{value:.{digits}f}"


def _range(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    return f"{low:.{digits}f}–{high:.{digits}f}{unit}"


def summary_table(result: SweepResult) -> tuple[list[str], list[list[str]], list[str]]:
    """The sweep as one table for ``sweep.md`` and the terminal alike: header, rows, and notes.

    Columns: method, ratio, kept parameters, file size, cosine per output, top-1 agreement per
    class-score output, per provider the speedup (ratio of medians) with its bound, the paired speedups'
    p10–p90 and the profiled share ``s`` (min–max over the profiled runs), and accuracy against labels
    when the evaluation data has them. A speedup above its bound is marked ``*`` and explained in a note.
    """
    entries = result.entries
    outputs = [output["name"] for output in entries[0].outputs] if entries else []

    def having(key: str) -> list[str]:
        return [name for name in outputs if any(
            output["name"] == name and output.get(key) is not None for entry in entries for output in entry.outputs
        )]

    scored, labelled = having("top1_agreement"), having("accuracy_original")
    providers = [item["provider"] for item in entries[0].speed] if entries else []
    header = ["method", "ratio", "kept params", "bytes", "file size"]
    header += [f"cos {name}" for name in outputs] + [f"top-1 agree {name}" for name in scored]
    for provider in providers:
        header += [f"{provider} speedup (bound)", f"{provider} p10–p90", f"{provider} share s"]
    header += [f"accuracy {name}" for name in labelled]
    rows: list[list[str]] = []
    notes: list[str] = []
    for entry in entries:
        by_name = {output["name"]: output for output in entry.outputs}
        ratio = f"{entry.ratio:g}" if entry.ratio is not None else "-"
        kept = f"{entry.kept_params:.1%}" if entry.ratio is not None else "-"
        row = [entry.method, ratio, kept, f"{entry.linear_bytes:.3f}", io.human_bytes(entry.file_size)]
        row += [_cell(by_name[name]["cosine"]) for name in outputs]
        row += [_cell(by_name[name]["top1_agreement"]) for name in scored]
        for item in entry.speed:
            bound = f" (≤ {item['bound']:.2f}×)" if item["bound"] is not None else ""
            mark = " *" if item.get("exceeds_bound") else ""
            row.append(f"{item['speedup']:.2f}×{bound}{mark}")
            row.append(_range(*item["speedup_range"], unit="×") if item.get("speedup_range") else "-")
            share = item.get("share_range")
            row.append(f"{item['share']:.2f} ({_range(*share)})" if item["share"] is not None and share else "-")
        for name in labelled:
            before, after = by_name[name]["accuracy_original"], by_name[name]["accuracy_rewritten"]
            row.append(f"{before:.4f} → {after:.4f}" if before is not None and after is not None else "-")
        rows.append(row)
        where = entry.method if entry.ratio is None else f"{entry.method} {entry.ratio:g}"
        notes += [f"* {where}: {item['bound_note']}" for item in entry.speed if item.get("bound_note")]
    return header, rows, notes


def markdown_table(result: SweepResult) -> str:
    """The sweep as a markdown table: one row per method and ratio (see :func:`summary_table`)."""
    header, rows, notes = summary_table(result)
    lines = [
        f"# Sweep of {result.model}",
        "",
        f"Calibration data {result.data}; evaluation data {result.eval_data}. \"kept params\" is the kept fraction of "
        "the MatMul/Gemm layers' parameters; cosine is the mean per-sample cosine to the original's output; "
        "speedup is the original's median latency over the rewritten one's, measured alternately, next to the "
        "bound 1/((1−s)+s·ρ) from one profile of the original; p10–p90 is the spread of the paired speedups of "
        "the alternating runs, and s is the rewritten sites' share of the original's node time (min–max over "
        "the profiled runs). \"bytes\" is the MatMul/Gemm layers' bytes as stored (each tensor in its "
        "dtype) over the original's; ort-* rows are ONNX Runtime's own quantizers (no ratio, no bound).",
        "",
        f"Original: {result.params:,} parameters, {io.human_bytes(result.file_size)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += ["", *notes]
    machine = _machine()
    lines += ["", f"Machine: {machine['processor']}, {machine['cpus']} CPUs ({machine['platform']})."]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str) -> None:
    plt = _pyplot()
    figure.tight_layout()
    with io.atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def _by_method(entries: Sequence[SweepEntry]) -> dict[str, list[SweepEntry]]:
    lines: dict[str, list[SweepEntry]] = {}
    for entry in entries:
        lines.setdefault(entry.method, []).append(entry)
    return {method: sorted(points, key=lambda e: e.kept_params) for method, points in lines.items()}


def plot_fidelity(entries: Sequence[SweepEntry], path: str | os.PathLike[str]) -> Path:
    """Cosine to the original against kept parameters: one panel per output, one line per method."""
    plt = _pyplot()
    outputs = [output["name"] for output in entries[0].outputs] if entries else []
    figure, axes = plt.subplots(1, max(1, len(outputs)), figsize=(5.5 * max(1, len(outputs)), 4.2), squeeze=False)
    for axis, name in zip(axes[0], outputs or [""], strict=False):
        for method, points in _by_method(entries).items():
            cosines = [next(o["cosine"] for o in e.outputs if o["name"] == name) for e in points]
            axis.plot([e.kept_params for e in points], cosines, marker="o", label=method)
        axis.set_xlabel("kept parameters of the MatMul/Gemm layers")
        axis.set_ylabel("mean cosine to the original")
        axis.set_title(f"fidelity: {name}" if name else "fidelity")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(figure, str(path))
    return Path(path)


def plot_fidelity_against(entries: Sequence[SweepEntry], path: str | os.PathLike[str], axis_kind: str) -> Path:
    """Cosine to the original (first output) against the linear layers' bytes (``axis_kind="bytes"``) or
    the rewritten model's median latency on the first provider (``"latency"``): a line per rewrite method,
    a square per ONNX Runtime baseline."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    name = entries[0].outputs[0]["name"] if entries and entries[0].outputs else None

    def x_of(entry: SweepEntry) -> float:
        if axis_kind == "bytes":
            return entry.linear_bytes
        return float(entry.speed[0]["rewritten_ms"]) if entry.speed else math.nan

    for method, points in _by_method(entries).items():
        points = sorted(points, key=x_of)
        cosines = [next(o["cosine"] for o in e.outputs if o["name"] == name) for e in points]
        baseline = points[0].ratio is None
        axis.plot([x_of(e) for e in points], cosines, marker="s" if baseline else "o",
                  linestyle="none" if baseline else "-", label=method)
    if axis_kind == "bytes":
        axis.set_xlabel("bytes of the MatMul/Gemm layers / the original's")
    else:
        provider = entries[0].speed[0]["provider"] if entries and entries[0].speed else "-"
        axis.set_xlabel(f"median latency on {provider} (ms)")
        original = [float(e.speed[0]["original_ms"]) for e in entries if e.speed]
        if original:
            axis.axvline(float(np.median(original)), color="grey", linewidth=0.8, linestyle=":", label="original")
    axis.set_ylabel("mean cosine to the original")
    axis.set_title(f"fidelity against {axis_kind}: {name}" if name else f"fidelity against {axis_kind}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, str(path))
    return Path(path)


def plot_speedup(entries: Sequence[SweepEntry], path: str | os.PathLike[str]) -> Path:
    """Measured speedup against kept parameters, per provider and method, with the bound dashed."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    providers = list(dict.fromkeys(item["provider"] for entry in entries for item in entry.speed))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for position, provider in enumerate(providers):
        bounds: dict[float, float] = {}
        for offset, (method, points) in enumerate(_by_method(entries).items()):
            series = [(e.kept_params, item) for e in points for item in e.speed if item["provider"] == provider]
            colour = colours[(position * 4 + offset) % len(colours)]
            axis.plot([x for x, _ in series], [item["speedup"] for _, item in series], marker="o", color=colour,
                      label=f"{provider}: {method}")
            for x, item in series:
                if item["bound"] is not None:
                    bounds.setdefault(round(x, 4), item["bound"])
        if bounds:
            xs = sorted(bounds)
            axis.plot(xs, [bounds[x] for x in xs], linestyle="--", color="black" if position == 0 else "grey",
                      label=f"{provider}: bound 1/((1−s)+s·ρ)")
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("kept parameters of the MatMul/Gemm layers")
    axis.set_ylabel("speedup (original / rewritten median latency)")
    axis.set_title("speedup")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, str(path))
    return Path(path)
