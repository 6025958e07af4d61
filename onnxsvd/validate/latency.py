"""ONNX Runtime sessions per provider and latency of two models measured side by side.

Both models are timed in one process, alternately (A B A B …) on one fixed batch, so that clock
boosts, other tenants of the machine and cache state hit both alike; each first gets ``warmup`` runs.
On CUDA the inputs are copied to the device once (``OrtValue``) and outputs stay there (IO binding),
so the numbers are compute, not host transfers. Sessions are opened from the file path, so models
with external data work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxsvd.config import PROVIDERS
from onnxsvd.errors import DataError, ModelError, ProviderError, UsageError

__all__ = [
    "check_providers",
    "LatencyStats",
    "ProviderTiming",
    "execution_provider",
    "open_session",
    "make_runner",
    "time_models",
]

log = logging.getLogger(__name__)


_INSTALL_HINT = {
    "cuda": "pip install 'onnxsvd[gpu]' on a machine with an NVIDIA GPU",
}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ProviderError(
            "onnxruntime is not installed; pip install 'onnxsvd[cpu]' (or 'onnxsvd[gpu]' for CUDA)"
        ) from error
    return onnxruntime


def execution_provider(provider: str) -> str:
    """The ONNX Runtime provider for ``"cpu"`` or ``"cuda"``, checked against this installation.

    Raises:
        UsageError: an unknown provider name.
        ProviderError: the provider is not available in this onnxruntime.
    """
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in _onnxruntime().get_available_providers():
        hint = _INSTALL_HINT.get(provider, "install an onnxruntime build that has it")
        raise ProviderError(f"{provider.upper()} requested but this onnxruntime has no {name}; {hint}")
    return name


def check_providers(providers: Sequence[str]) -> None:
    """Raise now, before any work, when a provider is unknown or not installed.

    Raises:
        UsageError: an unknown provider name.
        ProviderError: the provider is not available in this onnxruntime.
    """
    for provider in providers:
        execution_provider(provider)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_session(
    path: str | os.PathLike[str],
    provider: str = "cpu",
    threads: int | None = None,
    profile_prefix: str | None = None,
    spinning: bool = False,
) -> tuple[Any, float]:
    """Open an ``InferenceSession`` on ``path`` for ``provider``; return it and the seconds it took.

    Args:
        path: the model file (a path, so that external data is found beside it).
        provider: ``"cpu"`` or ``"cuda"`` (CUDA sessions fall back to CPU for nodes CUDA lacks).
        threads: ``intra_op_num_threads`` (``None``: onnxruntime's default).
        profile_prefix: enable onnxruntime profiling, writing the trace with this prefix.
        spinning: let idle pool threads spin (onnxruntime's default). Off by default: sessions timed
            alternately would otherwise steal each other's cores.

    Raises:
        ProviderError: the provider is missing or failed to initialise.
        ModelError: onnxruntime cannot load the model.
    """
    ort = _onnxruntime()
    name = execution_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        # Two sessions timed alternately in one process each have a thread pool; a pool that spins after
        # its run keeps the cores busy while the other session runs, and slows whichever runs second.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own pybind classes, all plain Exceptions
        raise ModelError(f"onnxruntime cannot load {path}: {_first_line(error)}") from error
    seconds = time.perf_counter() - started
    if name not in session.get_providers():
        raise ProviderError(
            f"{name} failed to initialise for {path} (onnxruntime fell back to "
            f"{', '.join(session.get_providers())}); check the CUDA and cuDNN libraries onnxruntime needs"
        )
    log.debug("session %s on %s opened in %.3f s", path, provider, seconds)
    return session, seconds


def make_runner(session: Any, feeds: Mapping[str, np.ndarray], provider: str) -> Callable[[], None]:
    """A no-argument function running ``session`` once on ``feeds``.

    On CUDA the inputs are copied to the device once and outputs are bound to the device (IO binding);
    on CPU it is a plain ``session.run``.

    Raises:
        DataError: the first run fails (checked here so that timing never times an error).
    """
    ort = _onnxruntime()
    feeds = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
    if provider == "cuda":
        binding = session.io_binding()
        device_inputs = []  # keep the device copies alive as long as the runner
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
            device_inputs.append(value)
            binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", 0)
        binding.synchronize_inputs()

        def run(_device_inputs: list[Any] = device_inputs) -> None:
            session.run_with_iobinding(binding)
    else:

        def run() -> None:
            session.run(None, feeds)

    try:
        run()
    except Exception as error:  # onnxruntime's pybind errors
        raise DataError(f"onnxruntime failed to run the model on the batch: {_first_line(error)}") from error
    return run


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one batch over ``iters`` timed runs.

    Attributes:
        p50_ms: median latency.
        p90_ms: 90th percentile.
        mean_ms: mean.
        min_ms: fastest run.
        throughput: samples per second at the median latency (``batch_size / p50``).
        p10_ms: 10th percentile (with ``p90_ms``, the spread beside the median).
        max_ms: slowest run.
    """

    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    p10_ms: float = math.nan
    max_ms: float = math.nan

    @classmethod
    def from_seconds(cls, seconds: list[float], batch_size: int) -> LatencyStats:
        times = np.asarray(seconds, dtype=np.float64) * 1e3  # [iters] ms
        p50 = float(np.percentile(times, 50))
        return cls(
            p50_ms=p50,
            p90_ms=float(np.percentile(times, 90)),
            mean_ms=float(times.mean()),
            min_ms=float(times.min()),
            throughput=batch_size / (p50 / 1e3) if p50 > 0 else float("inf"),
            p10_ms=float(np.percentile(times, 10)),
            max_ms=float(times.max()),
        )


@dataclasses.dataclass(frozen=True)
class ProviderTiming:
    """Both models timed on one provider.

    Attributes:
        provider: ``"cpu"`` or ``"cuda"``.
        batch_size: samples in the timed batch.
        warmup: untimed runs of each model first.
        iters: timed runs of each model.
        threads: ``intra_op_num_threads`` (``None``: onnxruntime's default).
        original: latency of the original model.
        rewritten: latency of the rewritten model.
        session_seconds_original: time to create the original's session.
        session_seconds_rewritten: time to create the rewritten model's session.
        speedup_p10: 10th percentile of the paired ratios ``original_i / rewritten_i`` of the
            alternating rounds (each pair ran back to back, so a slow moment of the machine hits both).
        speedup_p90: their 90th percentile.
    """

    provider: str
    batch_size: int
    warmup: int
    iters: int
    threads: int | None
    original: LatencyStats
    rewritten: LatencyStats
    session_seconds_original: float
    session_seconds_rewritten: float
    speedup_p10: float = math.nan
    speedup_p90: float = math.nan

    @property
    def speedup(self) -> float:
        """``p50_original / p50_rewritten``."""
        return self.original.p50_ms / self.rewritten.p50_ms if self.rewritten.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["speedup"] = self.speedup
        return data


def time_runners(
    original: Callable[[], None], rewritten: Callable[[], None], warmup: int, iters: int
) -> tuple[list[float], list[float]]:
    """Run both functions alternately: ``warmup`` untimed rounds, then ``iters`` timed rounds (A B A B …)."""
    for _ in range(warmup):
        original()
        rewritten()
    times_original: list[float] = []
    times_rewritten: list[float] = []
    clock = time.perf_counter
    for _ in range(iters):
        started = clock()
        original()
        middle = clock()
        rewritten()
        ended = clock()
        times_original.append(middle - started)
        times_rewritten.append(ended - middle)
    return times_original, times_rewritten


def time_models(
    original_path: str | os.PathLike[str],
    rewritten_path: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    provider: str = "cpu",
    warmup: int = 5,
    iters: int = 20,
    threads: int | None = None,
    sessions: tuple[tuple[Any, float], tuple[Any, float]] | None = None,
) -> ProviderTiming:
    """Time both models on ``feeds`` (one batch ``{input: [B, ...]}``), alternately, on ``provider``.

    Args:
        original_path: the original model.
        rewritten_path: the rewritten model.
        feeds: the batch.
        provider: ``"cpu"`` or ``"cuda"``.
        warmup: untimed runs of each model.
        iters: timed runs of each model (at least 1).
        threads: ``intra_op_num_threads``.
        sessions: already open ``(session, creation seconds)`` of both models on ``provider``, to reuse.

    Raises:
        UsageError: ``iters < 1`` or ``warmup < 0``.
        ProviderError: the provider is not available.
        ModelError, DataError: a model cannot be loaded or run on the batch.
    """
    if iters < 1 or warmup < 0:
        raise UsageError(f"need iters ≥ 1 and warmup ≥ 0, got iters={iters}, warmup={warmup}")
    if sessions is None:
        sessions = (
            open_session(Path(original_path), provider, threads),
            open_session(Path(rewritten_path), provider, threads),
        )
    (session_a, seconds_a), (session_b, seconds_b) = sessions
    batch_size = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    run_a = make_runner(session_a, feeds, provider)
    run_b = make_runner(session_b, feeds, provider)
    times_a, times_b = time_runners(run_a, run_b, warmup, iters)
    ratios = np.asarray(times_a) / np.maximum(np.asarray(times_b), 1e-12)  # [iters] paired speedups
    timing = ProviderTiming(
        provider=provider,
        batch_size=batch_size,
        warmup=warmup,
        iters=iters,
        threads=threads,
        original=LatencyStats.from_seconds(times_a, batch_size),
        rewritten=LatencyStats.from_seconds(times_b, batch_size),
        session_seconds_original=seconds_a,
        session_seconds_rewritten=seconds_b,
        speedup_p10=float(np.percentile(ratios, 10)),
        speedup_p90=float(np.percentile(ratios, 90)),
    )
    log.info(
        "%s: p50 %.3f ms → %.3f ms (speedup %.2f×) on a batch of %d",
        provider, timing.original.p50_ms, timing.rewritten.p50_ms, timing.speedup, batch_size,
    )
    return timing
