"""Truncated SVD in a data metric, with residual stages. ndarrays in, ndarrays out.

Dimension legend:
    K  input channels of the layer (rows of W)
    N  output channels of the layer (columns of W)
    r  rank of one stage; R the total rank over all stages
    T  rows of calibration activations (all leading dimensions flattened)

The layer is ``Y = X · W`` with ``X`` ``[T, K]`` and ``W`` ``[K, N]``. For a metric ``Lᵀ`` (``[K, K]``)

    ‖X W − X W'‖_F = ‖Lᵀ (W − W')‖_F        when G = XᵀX = L Lᵀ              (whitening, SVD-LLM)
    ‖diag(s) (W − W')‖_F                     when Lᵀ = diag(s), s = mean|x|^α  (ASVD)
    ‖W − W'‖_F                               when Lᵀ = I                       (plain SVD)

so the best rank-r ``W'`` in that metric is ``L⁻ᵀ · trunc_r(Lᵀ W)`` (Eckart–Young). Plain SVD is the
identity metric: one code path for all three methods.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg

from onnxsvd.errors import TORCH_INSTALL_HINT, FactorizationError

__all__ = [
    "Metric",
    "SvdOptions",
    "Decomposition",
    "Factorization",
    "FactorRounding",
    "identity_metric",
    "diagonal_metric",
    "whitening_metric",
    "decompose",
    "truncate",
    "factorize",
    "split_rank",
    "spectrum",
    "randomized_svd",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Metric:
    """The left transform ``Lᵀ`` of a data metric, applied and undone without forming an inverse.

    Attributes:
        kind: ``"identity"``, ``"diagonal"``, ``"cholesky"`` or ``"eigen"``.
        diagonal: ``[K]`` the diagonal of ``Lᵀ`` when ``kind == "diagonal"``.
        lower: ``[K, K]`` ``L`` when ``kind`` is ``"cholesky"`` (lower-triangular) or ``"eigen"``
            (``L = Q Λ^½``, orthogonal columns).
    """

    kind: str
    diagonal: np.ndarray | None = None
    lower: np.ndarray | None = None

    def apply(self, matrix: np.ndarray) -> np.ndarray:
        """``Lᵀ · matrix`` for ``matrix`` ``[K, M]``."""
        if self.kind == "identity":
            return matrix
        if self.kind == "diagonal":
            return self.diagonal[:, None] * matrix  # [K, M]
        return self.lower.T @ matrix  # [K, K] · [K, M] → [K, M]

    def unapply(self, matrix: np.ndarray) -> np.ndarray:
        """``L⁻ᵀ · matrix`` for ``matrix`` ``[K, M]``, by a triangular solve (never an inverse)."""
        if self.kind == "identity":
            return matrix
        if self.kind == "diagonal":
            return matrix / self.diagonal[:, None]  # [K, M]
        if self.kind == "cholesky":
            # Lᵀ is upper-triangular: solve Lᵀ Z = matrix.
            return scipy.linalg.solve_triangular(self.lower, matrix, trans="T", lower=True)  # [K, M]
        # eigen: L = Q Λ^½ with Q orthogonal, so L⁻ᵀ = Q Λ^-½ (Λ was floored above zero).
        column_norms_sq = np.sum(self.lower * self.lower, axis=0)  # [K] = Λ
        return self.lower @ (matrix / column_norms_sq[:, None])  # Q Λ^½ Λ^-1 · matrix: [K, M]


IDENTITY = Metric("identity")


def identity_metric() -> Metric:
    """The metric of plain SVD: ``Lᵀ = I``."""
    return IDENTITY


def diagonal_metric(mean_abs: np.ndarray, alpha: float = 0.5, floor: float = 1e-6) -> Metric:
    """ASVD's diagonal scaling ``Lᵀ = diag(s)``, ``s = mean|x|^α``.

    Args:
        mean_abs: ``[K]`` per-channel mean of ``|x|`` over the calibration rows.
        alpha: the exponent α (0.5 in ASVD).
        floor: relative floor so a dead channel (mean 0) does not divide by zero.

    Raises:
        FactorizationError: the statistics are all zero or not finite.
    """
    mean_abs = np.asarray(mean_abs, dtype=np.float64)  # [K]
    if not np.all(np.isfinite(mean_abs)) or float(mean_abs.max(initial=0.0)) <= 0.0:
        raise FactorizationError("degenerate statistics: activation magnitudes are all zero or not finite")
    scale = np.power(np.maximum(mean_abs, floor * mean_abs.max()), alpha)  # [K]
    return Metric("diagonal", diagonal=scale)


def whitening_metric(gram: np.ndarray, damping: float = 1e-2) -> Metric:
    """SVD-LLM's whitening: ``G + λ·mean(diag G)·I = L Lᵀ``.

    Cholesky first; if it fails (``G`` singular beyond what damping cures, or indefinite from rounding),
    the eigendecomposition of the symmetrised ``G`` with its eigenvalues floored at the damping level.

    Args:
        gram: ``[K, K]`` ``XᵀX`` accumulated over the calibration rows.
        damping: λ, relative to the mean of ``diag G``.

    Raises:
        FactorizationError: ``G`` is all zero or not finite.
    """
    gram = np.asarray(gram, dtype=np.float64)  # [K, K]
    if not np.all(np.isfinite(gram)):
        raise FactorizationError("degenerate statistics: the Gram matrix has NaN or Inf")
    scale = float(np.mean(np.diag(gram)))
    if scale <= 0.0:
        raise FactorizationError("degenerate statistics: activations are all zero")
    floor = max(damping, 1e-10) * scale
    # One K×K buffer beside the Gram, worked on in place (a wide site's Gram is hundreds of MB): the
    # symmetrised, damped Gram, then its Cholesky factor.
    damped = np.add(gram, gram.T)  # [K, K]
    damped *= 0.5
    damped[np.diag_indices_from(damped)] += floor
    try:
        # damped.T is the same symmetric matrix in Fortran order, so LAPACK factors it in place: Uᵀ U = damped.
        upper = scipy.linalg.cholesky(damped.T, lower=False, overwrite_a=True, check_finite=False)  # [K, K]
        lower = upper.T  # [K, K], damped = L Lᵀ
        if np.all(np.isfinite(lower)) and np.min(np.abs(np.diag(lower))) > 0.0:
            return Metric("cholesky", lower=lower)
    except (np.linalg.LinAlgError, ValueError):
        pass
    del damped
    symmetric = np.add(gram, gram.T)  # [K, K]
    symmetric *= 0.5
    try:
        eigenvalues, eigenvectors = np.linalg.eigh(symmetric)  # [K], [K, K]
    except np.linalg.LinAlgError as error:
        raise FactorizationError(
            f"whitening failed: neither Cholesky nor eigh of the Gram converged ({error})"
        ) from error
    eigenvalues = np.maximum(eigenvalues, 0.0) + floor  # [K], all ≥ floor > 0
    return Metric("eigen", lower=eigenvectors * np.sqrt(eigenvalues)[None, :])  # Q Λ^½: [K, K]


@dataclasses.dataclass(frozen=True)
class SvdOptions:
    """How SVDs are computed.

    Attributes:
        solver: ``"exact"``, ``"randomized"`` (range finder with oversampling and power iterations,
            needs the rank up front) or ``"auto"`` (randomized when the rank is well below ``min(K, N)``).
        backend: ``"numpy"`` (LAPACK through scipy), ``"torch"`` (CPU threads, or CUDA), or ``"auto"``
            (torch when it is installed).
        device: ``"cpu"`` or ``"cuda"`` (torch backend only).
        oversample: extra random directions of the range finder.
        power_iterations: subspace iterations of the range finder (sharpen slowly decaying spectra).
        seed: seed of the random test matrix (results are reproducible).
    """

    solver: str = "auto"
    backend: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend == "auto":
            # Whether torch is installed, without importing it (≈3 s and 190 MB that calibrate never needs).
            import importlib.util

            resolved = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
            object.__setattr__(self, "backend", resolved)
        if self.device != "cpu" and self.backend != "torch":
            raise FactorizationError(f"--device {self.device} needs torch: {TORCH_INSTALL_HINT}")
    oversample: int = 16
    power_iterations: int = 2
    seed: int = 0

    def use_randomized(self, rank: int | None, k: int, n: int) -> bool:
        """Randomized only with a known rank, and for ``auto`` only when it is well below ``min(K, N)``."""
        if rank is None or self.solver == "exact":
            return False
        if self.solver == "randomized":
            return rank + self.oversample < min(k, n)
        return min(k, n) >= 256 and 4 * (rank + self.oversample) <= min(k, n)


EXACT = SvdOptions(solver="exact", backend="numpy")


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The (possibly partial) SVD of ``Lᵀ W``: ``u`` ``[K, m]``, ``s`` ``[m]`` descending, ``vt`` ``[m, N]``.

    ``m = min(K, N)`` for an exact SVD, or the computed leading components for a randomized one;
    ``total_energy`` is always ``‖Lᵀ W‖_F² = Σ σ_i²`` over the full spectrum. ``notes`` say which SVD
    needed the fallback driver and why (empty when the first driver worked).
    """

    weight: np.ndarray
    metric: Metric
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    total_energy: float = -1.0
    options: SvdOptions = EXACT
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when ``s`` is the whole spectrum."""
        return self.s.shape[0] == min(self.weight.shape)

    def kept_energy(self, rank: int) -> float:
        """``Σ_{i≤r} σ_i² / Σ σ_i²`` in the metric (1.0 for an all-zero weight)."""
        energy = self.s.astype(np.float64) ** 2  # [m]
        total = self.total_energy if self.total_energy >= 0.0 else float(energy.sum())
        return 1.0 if total <= 0.0 else float(min(energy[:rank].sum() / total, 1.0))


@dataclasses.dataclass(frozen=True)
class Factorization:
    """Factors of one weight, stage by stage, in their storage dtype.

    Attributes:
        stages: ``(A_i, B_i)`` with ``A_i`` ``[K, r_i]`` and ``B_i`` ``[r_i, N]``; ``W ≈ Σ_i A_i B_i``.
        kept_energy: the share of ``Σσ²`` of ``Lᵀ W`` the total rank keeps.
        notes: every SVD behind these factors (the decomposition's and each later stage's) that needed
            the fallback driver, and why.
    """

    stages: tuple[tuple[np.ndarray, np.ndarray], ...]
    kept_energy: float
    notes: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return sum(a.shape[1] for a, _ in self.stages)

    def fused(self) -> tuple[np.ndarray, np.ndarray]:
        """The stages concatenated: ``A = [A_1 … A_k]`` ``[K, R]`` and ``B = [B_1; …; B_k]`` ``[R, N]``."""
        return (
            np.concatenate([a for a, _ in self.stages], axis=1),  # [K, R]
            np.concatenate([b for _, b in self.stages], axis=0),  # [R, N]
        )

    def product(self) -> np.ndarray:
        """``Σ_i A_i B_i`` in float64: ``[K, N]``."""
        return sum(a.astype(np.float64) @ b.astype(np.float64) for a, b in self.stages)


#: One thin SVD: ``U`` ``[K, m]``, ``σ`` ``[m]``, ``Vᵀ`` ``[m, N]``, and the note of the fallback it needed
#: (``None`` when the first driver worked).
_Triplets = tuple[np.ndarray, np.ndarray, np.ndarray, "str | None"]


def _svd(matrix: np.ndarray, options: SvdOptions = EXACT) -> _Triplets:
    """Thin SVD of ``matrix`` ``[K, N]``, falling back to a slower, sturdier driver when the first fails.

    The first driver is LAPACK's divide-and-conquer ``gesdd`` (numpy backend) or ``torch.linalg.svd``. It
    fails when it raises (no convergence) or returns NaN/Inf. The fallback is then, on CUDA, torch's
    ``gesvd`` driver, and after it (or on the CPU at once) scipy's LAPACK ``gesvd`` in float64. The note
    says which driver failed, how, and which one gave the result.

    Raises:
        np.linalg.LinAlgError: every driver failed (naming each failure).
    """
    if options.backend == "torch":
        return _torch_svd(matrix, options)
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        failure = None if _finite(u, s, vt) else "NaN or Inf in its result"
    except np.linalg.LinAlgError as error:
        failure = _first_line(error)
    if failure is None:
        return u, s, vt, None
    u, s, vt = _lapack_gesvd(matrix, f"LAPACK gesdd: {failure}")
    return u, s, vt, f"SVD fallback: LAPACK gesdd failed ({failure}); used LAPACK gesvd in float64"


def _finite(*arrays: object) -> bool:
    """True when every array (numpy, or torch on any device) holds only finite values."""
    for array in arrays:
        if isinstance(array, np.ndarray):
            if not np.all(np.isfinite(array)):
                return False
        elif not bool(array.isfinite().all()):  # type: ignore[attr-defined]
            return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _lapack_gesvd(matrix: np.ndarray, failed: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fallback SVD: scipy's LAPACK ``gesvd`` (QR iteration) in float64, on the CPU.

    Raises:
        np.linalg.LinAlgError: ``gesvd`` failed too; the message names ``failed`` (the earlier failures).
    """
    matrix = np.asarray(matrix, dtype=np.float64)  # [K, N]
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    except np.linalg.LinAlgError as error:
        raise np.linalg.LinAlgError(f"{failed}; LAPACK gesvd: {_first_line(error)}") from error
    if not _finite(u, s, vt):
        raise np.linalg.LinAlgError(f"{failed}; LAPACK gesvd: NaN or Inf in its result")
    return u, s, vt


def _torch_svd(matrix: np.ndarray, options: SvdOptions) -> _Triplets:
    import torch

    device = torch.device(options.device)
    # float64 on CPU; on CUDA float32 is several times faster and ample for a rank-r truncation.
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tensor = torch.as_tensor(matrix, dtype=dtype, device=device)  # [K, N]
    u, s, vt, note = _torch_thin_svd(tensor)  # [K, m], [m], [m, N]
    return (u.double().cpu().numpy(), s.double().cpu().numpy(), vt.double().cpu().numpy(), note)


def _torch_thin_svd(tensor: Any) -> tuple[Any, Any, Any, str | None]:
    """``torch.linalg.svd`` of ``tensor`` ``[K, N]`` with the fallbacks of :func:`_svd`; the factors come
    back as tensors of the input's dtype and device."""
    import torch

    try:
        u, s, vt = torch.linalg.svd(tensor, full_matrices=False)
        failure = None if _finite(u, s, vt) else "NaN or Inf in its result"
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        failure = _first_line(error)
    if failure is None:
        return u, s, vt, None
    where = f"torch.linalg.svd on {tensor.device.type}"
    if tensor.device.type == "cuda":
        try:
            u, s, vt = torch.linalg.svd(tensor, full_matrices=False, driver="gesvd")
            if _finite(u, s, vt):
                return u, s, vt, f"SVD fallback: {where} failed ({failure}); used its gesvd driver"
            failure += "; its gesvd driver: NaN or Inf in its result"
        except RuntimeError as error:
            failure += f"; its gesvd driver: {_first_line(error)}"
    u, s, vt = _lapack_gesvd(tensor.double().cpu().numpy(), f"{where}: {failure}")  # [K, m], [m], [m, N]
    back = [torch.as_tensor(part, dtype=tensor.dtype, device=tensor.device) for part in (u, s, vt)]
    note = f"SVD fallback: {where} failed ({failure}); used scipy's LAPACK gesvd in float64 on the CPU"
    return back[0], back[1], back[2], note


def randomized_svd(
    matrix: np.ndarray, rank: int, options: SvdOptions = SvdOptions()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of ``matrix`` ``[K, N]`` by a randomized range finder.

    ``Y = M Ω`` with ``Ω`` ``[N, l]`` Gaussian, ``l = rank + oversample``; ``q`` power iterations
    ``Y ← M (Mᵀ Q)`` with re-orthonormalisation; then the exact SVD of the small ``Qᵀ M`` ``[l, N]``
    (with the fallback driver of :func:`decompose`, logged as a warning here; :func:`decompose` reports it
    in :attr:`Decomposition.notes`).
    """
    u, s, vt, note = _randomized_svd(matrix, rank, options)
    if note is not None:
        log.warning("%s", note)
    return u, s, vt


def _randomized_svd(matrix: np.ndarray, rank: int, options: SvdOptions) -> _Triplets:
    if options.backend == "torch":
        return _torch_randomized_svd(matrix, rank, options)
    k, n = matrix.shape
    width = min(rank + options.oversample, min(k, n))
    generator = np.random.default_rng(options.seed)
    sketch = matrix @ generator.standard_normal((n, width))  # Y = M Ω: [K, l]
    basis, _ = np.linalg.qr(sketch)  # Q: [K, l]
    for _ in range(options.power_iterations):
        co_basis, _ = np.linalg.qr(matrix.T @ basis)  # [N, l]
        basis, _ = np.linalg.qr(matrix @ co_basis)  # [K, l]
    # SVD of the tall (Qᵀ M)ᵀ = V Σ Ûᵀ [N, l]: LAPACK is faster on tall than on wide matrices.
    v, s, small_ut, note = _svd((basis.T @ matrix).T)  # [N, l], [l], [l, l]
    return (basis @ small_ut.T)[:, :rank], s[:rank], v.T[:rank], note  # U = Q Û: [K, r]; Vᵀ: [r, N]


def _torch_randomized_svd(matrix: np.ndarray, rank: int, options: SvdOptions) -> _Triplets:
    import torch

    device = torch.device(options.device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    m = torch.as_tensor(matrix, dtype=dtype, device=device)  # [K, N]
    k, n = m.shape
    width = min(rank + options.oversample, min(k, n))
    generator = torch.Generator(device=device).manual_seed(options.seed)
    omega = torch.randn((n, width), generator=generator, dtype=dtype, device=device)  # Ω: [N, l]
    basis, _ = torch.linalg.qr(m @ omega)  # [K, l]
    for _ in range(options.power_iterations):
        co_basis, _ = torch.linalg.qr(m.T @ basis)  # [N, l]
        basis, _ = torch.linalg.qr(m @ co_basis)  # [K, l]
    v, s, small_ut, note = _torch_thin_svd((basis.T @ m).T)  # tall: [N, l], [l], [l, l]
    u = basis @ small_ut.T  # U = Q Û: [K, l]
    return (
        u[:, :rank].double().cpu().numpy(),  # [K, r]
        s[:rank].double().cpu().numpy(),  # [r]
        v.T[:rank].double().cpu().numpy(),  # [r, N]
        note,
    )


def decompose(
    weight: np.ndarray, metric: Metric = IDENTITY, rank: int | None = None, options: SvdOptions = EXACT
) -> Decomposition:
    """SVD of ``Lᵀ W`` for ``weight`` ``[K, N]`` (computed in float64).

    With ``rank`` known up front and ``options`` allowing it, only the leading ``rank`` components are
    computed (randomized); the total energy ``‖Lᵀ W‖_F²`` is exact either way.

    Raises:
        FactorizationError: the weight holds NaN or Inf, or the SVD fails.
    """
    weight = np.asarray(weight, dtype=np.float64)  # [K, N]
    if not np.all(np.isfinite(weight)):
        raise FactorizationError("weight contains NaN or Inf")
    transformed = metric.apply(weight)  # Lᵀ W: [K, N]
    u, s, vt, note = _decompose_transformed(transformed, rank, options)  # [K, m], [m], [m, N]
    total = float(np.sum(transformed * transformed))
    notes = () if note is None else (note,)
    return Decomposition(
        weight=weight, metric=metric, u=u, s=s, vt=vt, total_energy=total, options=options, notes=notes
    )


def _decompose_transformed(transformed: np.ndarray, rank: int | None, options: SvdOptions) -> _Triplets:
    """Randomized or exact SVD of ``Lᵀ W`` ``[K, N]`` as ``options`` allow, with the fallback's note.

    Raises:
        FactorizationError: every driver failed.
    """
    try:
        if options.use_randomized(rank, *transformed.shape):
            return _randomized_svd(transformed, int(rank), options)  # type: ignore[arg-type]
        return _svd(transformed, options)
    except (np.linalg.LinAlgError, ValueError, RuntimeError) as error:
        raise FactorizationError(f"SVD failed: {error}") from error


def spectrum(weight: np.ndarray, metric: Metric = IDENTITY) -> np.ndarray:
    """Singular values of ``Lᵀ W`` ``[min(K, N)]``, descending, without the singular vectors (cheaper).

    Raises:
        FactorizationError: the weight holds NaN or Inf, or the SVD fails.
    """
    weight = np.asarray(weight, dtype=np.float64)  # [K, N]
    if not np.all(np.isfinite(weight)):
        raise FactorizationError("weight contains NaN or Inf")
    try:
        return scipy.linalg.svdvals(metric.apply(weight), check_finite=False)  # [m]
    except (np.linalg.LinAlgError, ValueError) as error:
        raise FactorizationError(f"SVD failed: {error}") from error


def split_rank(total: int, stages: int) -> list[int]:
    """An even split of ``total`` over ``stages``, earlier stages taking the remainder: 10, 3 → [4, 3, 3]."""
    if stages < 1:
        raise ValueError("stages must be at least 1")
    base, extra = divmod(total, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def _stage_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """``A = L⁻ᵀ U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ`` in float64 (Σ split across both keeps fp16 in range)."""
    root = np.sqrt(s[:rank])  # [r]
    a = metric.unapply(u[:, :rank] * root[None, :])  # [K, r]
    b = root[:, None] * vt[:rank, :]  # [r, N]
    return a, b


#: Rounds one stage's factors to what their storage gives back: ``(A [K, r], B [r, N]) → (Â, B̂)`` (int8 storage,
#: :func:`onnxsvd.factorize.rounding.round_int8`); ``None`` is a cast to the storage dtype alone.
FactorRounding = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


def truncate(
    decomposition: Decomposition,
    stage_ranks: Sequence[int],
    storage_dtype: np.dtype,
    rounding: FactorRounding | None = None,
) -> Factorization:
    """Factor a decomposed weight into residual stages of the given ranks.

    Stage 1 is the top ``r_1`` components of ``Lᵀ W``. Stage i factors the residual
    ``W − Σ_{j<i} A_j B_j`` left after the earlier stages' factors were *rounded to the storage dtype*,
    so later stages correct the rounding. With exact factors this equals one SVD of rank ``Σ r_i``.

    Args:
        decomposition: from :func:`decompose`.
        stage_ranks: ``[r_1, …, r_k]``, each ≥ 1.
        storage_dtype: numpy dtype the factors are stored in (float32, float16, ml_dtypes.bfloat16…).
        rounding: the storage's rounding of one stage's factors, when it is more than a cast (int8 factors:
            the factors hold the values ``q·s`` the graph computes, in ``storage_dtype``).

    Returns:
        The factors, rounded to ``storage_dtype``.
    """
    limit = min(decomposition.weight.shape)
    ranks = [int(r) for r in stage_ranks]
    if any(r < 1 for r in ranks):
        raise FactorizationError(f"stage ranks must be at least 1, got {ranks}")
    if sum(ranks) > limit:
        raise FactorizationError(f"total rank {sum(ranks)} exceeds min(K, N) = {limit}")
    if ranks[0] > decomposition.s.shape[0]:
        raise FactorizationError(f"rank {ranks[0]} exceeds the {decomposition.s.shape[0]} computed components")
    metric = decomposition.metric
    stages: list[tuple[np.ndarray, np.ndarray]] = []
    notes = list(decomposition.notes)
    residual = decomposition.weight  # [K, N]
    u, s, vt = decomposition.u, decomposition.s, decomposition.vt
    for index, rank in enumerate(ranks):
        if index > 0:
            transformed = metric.apply(residual)  # Lᵀ R: [K, N]
            u, s, vt, note = _decompose_transformed(transformed, rank, decomposition.options)  # [K, m], [m], [m, N]
            if note is not None:
                notes.append(f"stage {index + 1}: {note}")
        a, b = _stage_factors(u, s, vt, rank, metric)  # [K, r], [r, N]
        if rounding is not None:
            a, b = rounding(a, b)
        a_stored = a.astype(storage_dtype)
        b_stored = b.astype(storage_dtype)
        stages.append((a_stored, b_stored))
        # The next stage sees what the *stored* factors leave: W − Σ_{j≤i} Â_j B̂_j.
        residual = residual - a_stored.astype(np.float64) @ b_stored.astype(np.float64)  # [K, N]
    return Factorization(stages=tuple(stages), kept_energy=decomposition.kept_energy(sum(ranks)), notes=tuple(notes))


def factorize(
    weight: np.ndarray,
    stage_ranks: Sequence[int],
    metric: Metric = IDENTITY,
    storage_dtype: np.dtype = np.float32,
) -> Factorization:
    """Decompose and truncate in one call: ``W`` ``[K, N]`` → stages of ``(A_i [K, r_i], B_i [r_i, N])``."""
    return truncate(decompose(weight, metric), stage_ranks, storage_dtype)
