"""Configuration: frozen dataclasses, every default in one place, validated on construction.

The CLI parses its options into these; the library takes them. An invalid value raises
:class:`onnxsvd.errors.UsageError` with a message that says what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from onnxsvd.errors import UsageError

__all__ = [
    "VERSION",
    "PROVIDERS",
    "CONV_FORMS",
    "DEVICES",
    "Progress",
    "check_provider_names",
    "RANK_POLICIES",
    "LOW_KEPT_ENERGY",
    "MIN_SHARE",
    "METHODS",
    "LAYOUTS",
    "STORAGE_DTYPES",
    "SVD_SOLVERS",
    "ALLOCATIONS",
    "RankPolicy",
    "QUANT_TYPES",
    "QUANT_ALGORITHMS",
    "QUANT_BLOCK_SIZES",
    "FACTOR_DTYPES",
    "QuantizeConfig",
    "RewriteConfig",
    "VALIDATE_BATCH_SIZE",
    "PROFILE_RUNS",
    "ValidateConfig",
]

#: The package's version (``onnxsvd.__version__``, the packaging metadata, and the stamp in every
#: rewritten model's metadata); here so that any module can read it without importing the package root.
VERSION = "0.1.0"

#: Registries: the values each option accepts.
RANK_POLICIES = ("rank", "ratio", "energy", "full")
#: Sites whose truncation keeps less than this share of Σσ² (in their metric) are flagged in the summary.
LOW_KEPT_ENERGY = 0.5
#: The default ``--min-share``: a site with less than this share of the largest site's parameters stays dense.
MIN_SHARE = 0.01
METHODS = ("svd", "asvd", "whiten")
LAYOUTS = ("fused", "stages")
#: ``--conv``: how a Conv site is factored (channel: k×k Conv to r then 1×1; spatial: k_h×1 then 1×k_w; auto: per
#: site, the form with the smaller error in the data metric at the same parameter count).
CONV_FORMS = ("channel", "spatial", "auto")
STORAGE_DTYPES = ("auto", "fp32", "fp16")
SVD_SOLVERS = ("auto", "exact", "randomized")
ALLOCATIONS = ("uniform", "global")
#: ``--quantize`` → bits of ONNX Runtime's MatMulNBits (its CPU kernel runs 2, 4 and 8 bits in 1.32).
QUANT_TYPES: dict[str, int] = {"int2": 2, "int4": 4, "int8": 8}
#: ``--quant-algo``: ``rtn`` is ONNX Runtime's default block quantizer (round to nearest, its C++ kernels),
#: ``hqq`` its half-quadratic quantizer (torch, asymmetric only). ORT's GPTQ and its neural-compressor RTN
#: go through Intel Neural Compressor, which is not a dependency: not offered.
QUANT_ALGORITHMS = ("rtn", "hqq")
#: Block sizes ONNX Runtime's block quantizer accepts (MLAS refuses any other).
QUANT_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: ``--factor-dtype`` of a quantized site's correction (``auto``: the weight's own float dtype; ``int8``: one
#: scale per rank component, behind ``DequantizeLinear``).
FACTOR_DTYPES = ("auto", "fp32", "fp16", "int8")
#: Provider names the CLI and the configs accept → ONNX Runtime execution providers.
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: Where the SVDs (and fine-tuning) run.
DEVICES = ("cpu", "cuda")

#: A progress callback, called as ``progress(done, total, item)`` after each step of a long job
#: (``total`` is ``None`` while it is not known yet).
Progress = Callable[[int, "int | None", str], None]


def check_provider_names(providers: Sequence[str], flag: str = "--providers") -> None:
    """Refuse an empty, unknown or repeated provider name (what ONNX Runtime has is checked elsewhere).

    Raises:
        UsageError: naming the bad value and the accepted ones.
    """
    if not providers:
        raise UsageError(f"give at least one provider to {flag} ({', '.join(PROVIDERS)})")
    for provider in providers:
        if provider not in PROVIDERS:
            raise UsageError(f"unknown provider {provider!r} in {flag}; use one of {', '.join(PROVIDERS)}")
    if len(set(providers)) != len(providers):
        raise UsageError(f"{flag} lists a provider twice: {','.join(providers)}")


@dataclasses.dataclass(frozen=True)
class RankPolicy:
    """How the rank of each layer is chosen.

    Attributes:
        kind: ``"ratio"`` (kept fraction of the layer's parameters, ``r = ⌊ρ·K·N/(K+N)⌋``),
            ``"rank"`` (a fixed rank), ``"energy"`` (smallest rank keeping β of ``Σσ²``) or ``"full"``
            (every site at its full rank ``min(K, N)``: exact, growth allowed; ``--rank full``).
        value: ρ in (0, 1], the rank (≥ 1), or β in (0, 1]; unused by ``"full"``.
        align: round ranks to a multiple of this (GEMM kernels like multiples of 8); 1 disables it.
        allow_growth: factorize even when the chain is no smaller in bytes than the weight as stored
            (``r·(K+N)`` factor values against the stored weight; ``r·(K+N) ≥ K·N`` for a float weight
            whose factors keep its dtype).
        min_rank: the rank floor (``--min-rank``): a ratio, energy or globally allocated rank under it
            keeps the layer dense (an energy rank is raised to it where that is under break-even);
            ``None``: ``align``. A fixed ``--rank`` and ``--rank full`` are not floored.
    """

    kind: str = "ratio"
    value: float = 0.5
    align: int = 8
    allow_growth: bool = False
    min_rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RANK_POLICIES:
            raise UsageError(f"unknown rank policy {self.kind!r}; use one of {', '.join(RANK_POLICIES)}")
        if self.kind == "ratio" and not 0.0 < self.value <= 1.0:
            raise UsageError(f"--ratio must be in (0, 1] (kept fraction of parameters), got {self.value:g}")
        if self.kind == "energy" and not 0.0 < self.value <= 1.0:
            raise UsageError(f"--energy must be in (0, 1] (kept share of Σσ²), got {self.value:g}")
        if self.kind == "rank" and (self.value < 1 or self.value != int(self.value)):
            raise UsageError(f"--rank must be a positive integer or 'full', got {self.value:g}")
        if self.align < 1:
            raise UsageError(f"--align must be at least 1, got {self.align}")
        if self.min_rank is not None and self.min_rank < 1:
            raise UsageError(f"--min-rank must be at least 1, got {self.min_rank}")
        if self.kind == "full" and not self.allow_growth:
            object.__setattr__(self, "allow_growth", True)  # a full-rank chain may be larger: that is asked

    @property
    def floor(self) -> int:
        """The rank floor: ``min_rank``, or ``align`` when it is not given."""
        return self.min_rank if self.min_rank is not None else self.align

    def describe(self, allocate: str = "uniform") -> str:
        """One line for summaries: what the policy means (``allocate="global"``: one budget over all
        sites, not a per-layer ratio)."""
        if allocate == "global" and self.kind == "ratio":
            return f"ratio {self.value:g} of all sites' parameters together (global allocation)"
        if allocate == "global" and self.kind == "energy":
            return f"energy {self.value:g} of all sites' Σσ² together (global allocation)"
        if self.kind == "ratio":
            return f"ratio {self.value:g} (kept fraction of each layer's parameters)"
        if self.kind == "energy":
            return f"energy {self.value:g} (kept share of Σσ² per layer)"
        if self.kind == "full":
            return "full rank min(K, N) (exact)"
        return f"rank {int(self.value)}"


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """A quantized base for every site, with a low-rank correction of its error (``--quantize``).

    Each site's weight is quantized by ONNX Runtime's own weight quantizer into a ``MatMulNBits`` node
    (blocks of ``block_size`` values along K, one scale per block and column); the correction ``X·A·B`` is
    fitted to ``E = W − Ŵ``, ``Ŵ`` the weight exactly as ONNX Runtime dequantizes it, in the rewrite's
    data metric, and added to the node's output.

    Attributes:
        bits: 2, 4 or 8 (``--quantize int2|int4|int8``).
        block_size: values per quantization block along K (16, 32, 64, 128 or 256). A K that the block
            does not divide is padded by the quantizer; the last block is then partly zeros.
        symmetric: symmetric blocks (zero point at the middle of the range, no zero-point tensor) or
            asymmetric ones (a zero point per block).
        accuracy_level: MatMulNBits' ``accuracy_level`` (0: unset, the kernel's default; 4 quantizes the
            activations to int8 inside the kernel, so ORT computes ``X·Ŵ`` only approximately).
        algorithm: ``"rtn"`` (round to nearest) or ``"hqq"`` (half-quadratic, asymmetric only).
        correction: fit the low-rank correction; ``False`` quantizes only (``--rank 0``).
        factor_dtype: storage of the correction's factors (``auto``, ``fp32``, ``fp16`` or ``int8``); each
            residual stage is fitted after the earlier stages are rounded to it.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    algorithm: str = "rtn"
    correction: bool = True
    factor_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.factor_dtype not in FACTOR_DTYPES:
            raise UsageError(f"unknown --factor-dtype {self.factor_dtype!r}; use one of {', '.join(FACTOR_DTYPES)}")
        if self.bits not in QUANT_TYPES.values():
            names = ", ".join(QUANT_TYPES)
            raise UsageError(f"--quantize takes {names} (MatMulNBits' 2, 4 or 8 bits), got {self.bits} bits")
        if self.block_size not in QUANT_BLOCK_SIZES:
            sizes = ", ".join(map(str, QUANT_BLOCK_SIZES))
            raise UsageError(f"--block must be one of {sizes} (ONNX Runtime's block quantizer), got {self.block_size}")
        if self.accuracy_level not in range(5):
            raise UsageError(f"--accuracy-level must be 0–4 (MatMulNBits' accuracy_level), got {self.accuracy_level}")
        if self.algorithm not in QUANT_ALGORITHMS:
            raise UsageError(
                f"unknown --quant-algo {self.algorithm!r}; use one of {', '.join(QUANT_ALGORITHMS)} (ORT's GPTQ "
                "needs Intel Neural Compressor, which onnxsvd does not use)"
            )
        if self.algorithm == "hqq" and self.symmetric:
            raise UsageError("--quant-algo hqq is asymmetric in ONNX Runtime: add --asymmetric")

    @property
    def label(self) -> str:
        """``int4 b32 sym rtn``: the base in a few words, for reports."""
        kind = "sym" if self.symmetric else "asym"
        level = f" acc{self.accuracy_level}" if self.accuracy_level else ""
        return f"int{self.bits} b{self.block_size} {kind} {self.algorithm}{level}"


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
    """Everything ``rewrite`` needs besides the model and calibration statistics.

    Attributes:
        policy: the rank policy.
        stages: number of residual stages (each fitted to what the earlier, rounded stages left).
        stage_ranks: explicit ranks per stage; overrides ``policy`` and ``stages`` when given.
        layout: ``"fused"`` (two MatMuls, the stages' factors concatenated) or ``"stages"`` (one chain
            per stage, summed, so trailing stages can be dropped).
        method: ``"svd"`` (plain), ``"asvd"`` (diagonal activation scaling) or ``"whiten"`` (Cholesky
            whitening). The last two need calibration statistics.
        alpha: ASVD's exponent α in ``s = mean|x|^α``.
        damping: whitening's damping, relative to the mean of ``diag(XᵀX)``.
        ridge: the sequential rewrite's least-squares target ``(G̃ + λI)⁻¹ (C W + λ W)`` is pulled
            towards the original weight with this λ, relative to the mean of ``diag(X̃ᵀX̃)``.
        include: regular expression; only sites whose node name matches are considered.
        exclude: regular expression; sites whose node name matches are kept dense.
        min_params: sites with fewer weight parameters stay dense.
        min_share: sites (weight groups) with less than this share of the largest site's parameters stay
            dense, with the reason (``--min-share``; 0 disables it; not applied by ``--rank full``).
        dtype: storage dtype of the factors: ``"auto"`` (the weight's own), ``"fp32"`` or ``"fp16"``.
        svd: ``"exact"``, ``"randomized"`` or ``"auto"`` (randomized when the rank is known up front and
            well below ``min(K, N)``).
        device: ``"cpu"`` or ``"cuda"`` for the SVDs (cuda through torch).
        jobs: weights factorized in parallel; 0 picks from the cores.
        allocate: ``"uniform"`` (each layer by the policy) or ``"global"`` (one budget over all sites,
            ranks chosen by discarded energy in the metric times measured sensitivity).
        sensitivity_ratios: per-layer ratios at which each site is truncated alone to measure its
            sensitivity (global allocation with calibration data).
        quantize: quantize each site's weight with ONNX Runtime and fit the rank policy's factors to the
            quantization error instead of the weight (see :class:`QuantizeConfig`); ``None``: low rank only.
        conv: how Conv sites are factored, one of :data:`CONV_FORMS`.
    """

    policy: RankPolicy = RankPolicy()
    stages: int = 1
    stage_ranks: tuple[int, ...] | None = None
    layout: str = "fused"
    method: str = "svd"
    alpha: float = 0.5
    damping: float = 1e-2
    ridge: float = 5e-2
    include: str | None = None
    exclude: str | None = None
    min_params: int = 0
    min_share: float = MIN_SHARE
    dtype: str = "auto"
    svd: str = "auto"
    device: str = "cpu"
    jobs: int = 0
    allocate: str = "uniform"
    sensitivity_ratios: tuple[float, ...] = (0.25, 0.5)
    quantize: QuantizeConfig | None = None
    conv: str = "channel"

    def __post_init__(self) -> None:
        if self.conv not in CONV_FORMS:
            raise UsageError(f"unknown --conv {self.conv!r}; use one of {', '.join(CONV_FORMS)}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown --allocate {self.allocate!r}; use one of {', '.join(ALLOCATIONS)}")
        if self.svd not in SVD_SOLVERS:
            raise UsageError(f"unknown --svd {self.svd!r}; use one of {', '.join(SVD_SOLVERS)}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown --device {self.device!r}; use cpu or cuda")
        if self.jobs < 0:
            raise UsageError(f"--jobs must be ≥ 0 (0: as many as the cores allow), got {self.jobs}")
        if self.stages < 1:
            raise UsageError(f"--stages must be at least 1, got {self.stages}")
        if self.stage_ranks is not None:
            if not self.stage_ranks or any(r < 1 for r in self.stage_ranks):
                raise UsageError(f"--stage-ranks must be positive integers, got {list(self.stage_ranks)}")
            object.__setattr__(self, "stages", len(self.stage_ranks))
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.dtype not in STORAGE_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
        if not 0.0 <= self.alpha <= 2.0:
            raise UsageError(f"--alpha must be in [0, 2], got {self.alpha:g}")
        if self.ridge < 0.0:
            raise UsageError(f"--ridge must be ≥ 0, got {self.ridge:g}")
        if self.damping < 0.0:
            raise UsageError(f"--damping must be ≥ 0, got {self.damping:g}")
        if not 0.0 <= self.min_share < 1.0:
            raise UsageError(
                f"--min-share must be in [0, 1) (a share of the largest site's parameters), got {self.min_share:g}"
            )
        if self.allocate == "global" and self.policy.kind in ("rank", "full"):
            raise UsageError("--allocate global takes --ratio (a budget over all sites) or --energy, not a fixed rank")
        if self.allocate == "global" and self.stage_ranks is not None:
            raise UsageError("--allocate global chooses the ranks: do not give --stage-ranks with it")
        if self.min_params < 0:
            raise UsageError(f"--min-params must be ≥ 0, got {self.min_params}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise UsageError(f"{flag} {pattern!r} is not a valid regular expression: {error}") from error

    @property
    def needs_statistics(self) -> bool:
        """True for the activation-aware methods."""
        return self.method != "svd"


#: ``validate``'s batch size when none is given and the data is one ``.npz`` (a folder: one batch per file).
VALIDATE_BATCH_SIZE = 64
#: Profiled runs of the original: enough that the share of a run varies little from run to run.
PROFILE_RUNS = 10


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """How to validate a rewrite. Every default is here.

    Attributes:
        providers: ``"cpu"`` and/or ``"cuda"``; accuracy runs on the first, latency on each.
        warmup: untimed runs of each model before timing.
        iters: timed runs of each model.
        threads: onnxruntime ``intra_op_num_threads`` (``None``: onnxruntime's default).
        batch_size: samples per batch (``None``: one batch per file of a folder, else
            :data:`VALIDATE_BATCH_SIZE`).
        min_cosine: gate: fail when an output's mean cosine is below this.
        max_top1_drop: gate: fail when the top-1 drop of a class-score output is above this (accuracy
            drop against ``labels`` when the data has them, else ``1 − top-1 agreement``).
        max_samples: use at most this many samples of the data.
        profile: profile the original to compute the speedup bound.
        factorized_sites: names of the rewritten sites (from the rewrite report); ``None``: inferred.
        profile_runs: profiled runs of the original (after ``warmup`` left out); the share's min–max
            over them is reported.
    """

    providers: tuple[str, ...] = ("cpu",)
    warmup: int = 5
    iters: int = 20
    threads: int | None = None
    batch_size: int | None = None
    min_cosine: float | None = None
    max_top1_drop: float | None = None
    max_samples: int | None = None
    profile: bool = True
    factorized_sites: tuple[str, ...] | None = None
    profile_runs: int = PROFILE_RUNS

    def __post_init__(self) -> None:
        check_provider_names(self.providers)
        if self.profile_runs < 1:
            raise UsageError(f"profile runs must be at least 1, got {self.profile_runs}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.iters < 1:
            raise UsageError(f"--iters must be at least 1, got {self.iters}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise UsageError(f"--min-cosine must be in [-1, 1], got {self.min_cosine:g}")
        if self.max_top1_drop is not None and not 0.0 <= self.max_top1_drop <= 1.0:
            raise UsageError(f"--max-top1-drop must be in [0, 1] (a share of samples), got {self.max_top1_drop:g}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["providers"] = list(self.providers)
        if self.factorized_sites is not None:
            data["factorized_sites"] = list(self.factorized_sites)
        return data
