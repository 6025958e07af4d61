"""SVD fallback drivers: when the first SVD fails, a sturdier driver gives the factors, and it is reported
(issue 11). Failures are forced by replacing the first driver."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.linalg

from onnxsvd import RankPolicy, RewriteConfig
from onnxsvd.errors import FactorizationError
from onnxsvd.factorize import SvdOptions, decompose, lowrank, truncate
from onnxsvd.pipeline import rewrite
from tests.conftest import FULL_RANK, MODELS
from tests.models import run

NUMPY = SvdOptions(solver="exact", backend="numpy")


def _exact(matrix: np.ndarray) -> np.ndarray:
    return scipy.linalg.svdvals(matrix)


def _break_gesdd(monkeypatch: pytest.MonkeyPatch, how: str) -> list[str]:
    """Make LAPACK gesdd raise (``"raise"``) or return NaN (``"nan"``); gesvd still works. Returns the drivers
    called, in order."""
    real = scipy.linalg.svd
    called: list[str] = []

    def svd(matrix, *args, lapack_driver="gesdd", **kwargs):  # type: ignore[no-untyped-def]
        called.append(lapack_driver)
        if lapack_driver == "gesdd":
            if how == "raise":
                raise np.linalg.LinAlgError("SVD did not converge")
            u, s, vt = real(matrix, *args, lapack_driver=lapack_driver, **kwargs)
            return u, np.full_like(s, np.nan), vt
        return real(matrix, *args, lapack_driver=lapack_driver, **kwargs)

    monkeypatch.setattr(lowrank.scipy.linalg, "svd", svd)
    return called


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_numpy_gesdd_failure_falls_back_to_gesvd_and_says_so(
    how: str, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    weight = rng.standard_normal((20, 12))  # [K, N]
    called = _break_gesdd(monkeypatch, how)
    decomposition = decompose(weight, options=NUMPY)
    assert called == ["gesdd", "gesvd"]
    np.testing.assert_allclose(decomposition.s, _exact(weight), rtol=1e-12)
    (note,) = decomposition.notes
    failure = "SVD did not converge" if how == "raise" else "NaN or Inf in its result"
    assert note == f"SVD fallback: LAPACK gesdd failed ({failure}); used LAPACK gesvd in float64"
    factors = truncate(decomposition, [12], np.float64)
    np.testing.assert_allclose(factors.product(), weight, atol=1e-10)
    assert factors.notes == decomposition.notes


def test_a_later_stage_fallback_is_reported_with_its_stage(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    weight = rng.standard_normal((16, 10))  # [K, N]
    decomposition = decompose(weight, options=NUMPY)
    assert decomposition.notes == ()
    _break_gesdd(monkeypatch, "raise")
    factors = truncate(decomposition, [4, 3], np.float32)
    (note,) = factors.notes
    assert note.startswith("stage 2: SVD fallback: LAPACK gesdd failed")


def test_every_driver_failing_names_each_failure(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    def broken(*args, lapack_driver="gesdd", **kwargs):  # type: ignore[no-untyped-def]
        raise np.linalg.LinAlgError(f"{lapack_driver} did not converge")

    monkeypatch.setattr(lowrank.scipy.linalg, "svd", broken)
    with pytest.raises(FactorizationError, match="LAPACK gesdd: gesdd did not converge; LAPACK gesvd: gesvd did not"):
        decompose(rng.standard_normal((8, 6)), options=NUMPY)


# ---- torch: the default backend whenever torch is installed ---------------------------------------------


def _break_torch(monkeypatch: pytest.MonkeyPatch, how: str) -> list[dict]:
    """Make torch.linalg.svd raise LinAlgError (``"raise"``) or return NaN (``"nan"``); returns its calls."""
    torch = pytest.importorskip("torch")
    real = torch.linalg.svd
    calls: list[dict] = []

    def svd(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        if how == "raise":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 3)")
        u, s, vt = real(tensor, *args, **kwargs)
        return u, s * float("nan"), vt

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_torch_failure_falls_back_to_lapack_gesvd_and_says_so(
    how: str, solver: str, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    # [K, N]: wide enough for the randomized range finder, with a decaying spectrum it recovers exactly
    u, _ = np.linalg.qr(rng.standard_normal((300, 280)))  # [K, N]
    v, _ = np.linalg.qr(rng.standard_normal((280, 280)))  # [N, N]
    weight = (u * np.exp(-np.arange(280) / 4.0)) @ v.T  # [K, N]
    calls = _break_torch(monkeypatch, how)
    options = SvdOptions(solver=solver, backend="torch")
    decomposition = decompose(weight, rank=8, options=options)
    assert len(calls) == 1  # once on the CPU: no torch driver to retry, straight to LAPACK
    np.testing.assert_allclose(decomposition.s[:8], _exact(weight)[:8], rtol=1e-8)
    assert np.all(np.isfinite(decomposition.u)) and np.all(np.isfinite(decomposition.vt))
    (note,) = decomposition.notes
    failure = "linalg.svd: The algorithm failed to converge (error code: 3)" if how == "raise" else "NaN or Inf"
    assert note.startswith(f"SVD fallback: torch.linalg.svd on cpu failed ({failure}")
    assert note.endswith("used scipy's LAPACK gesvd in float64 on the CPU")


def test_torch_failure_with_lapack_failing_too_keeps_the_site_dense_with_both_reasons(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _break_torch(monkeypatch, "raise")

    def broken(*args, lapack_driver="gesdd", **kwargs):  # type: ignore[no-untyped-def]
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(lowrank.scipy.linalg, "svd", broken)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1), jobs=1)
    report = rewrite(onnx.load(str(MODELS / "digits_mlp.onnx")), config).report
    assert not report.factorized
    for site in report.sites:
        assert "torch.linalg.svd on cpu: linalg.svd: The algorithm failed to converge" in site.reason
        assert "LAPACK gesvd: SVD did not converge" in site.reason


def test_a_rewrite_reports_every_fallback_per_site_and_in_its_notes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torch's SVD failing at every site: the factors come from LAPACK (the full-rank rewrite reproduces the
    model), each site's notes say so, and one report note names the sites."""
    _break_torch(monkeypatch, "raise")
    model = onnx.load(str(MODELS / "digits_mlp.onnx"))
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, jobs=1))
    report = result.report
    assert report.factorized and all(site.notes for site in report.factorized)
    for site in report.factorized:
        (note,) = site.notes
        assert note.startswith("SVD fallback: torch.linalg.svd on cpu failed (linalg.svd: The algorithm failed")
    (summary,) = [note for note in report.notes if note.startswith("SVD fallback")]
    names = [site.name for site in report.factorized]
    assert summary.endswith(f"— at {len(names)} sites: {', '.join(names)}"), summary
    feeds = {"input": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)
    written = json.loads(report.write_json(tmp_path / "report.json").read_text())
    assert [site["notes"] for site in written["sites"] if site["action"] == "factorized"] == [
        site.notes for site in report.factorized
    ]


def test_a_working_svd_adds_no_note(rng: np.random.Generator) -> None:
    report = rewrite(onnx.load(str(MODELS / "digits_mlp.onnx")), RewriteConfig(jobs=1)).report
    assert all(site.notes == [] for site in report.sites)
    assert not [note for note in report.notes if "fallback" in note]


def test_cuda_failure_retries_torch_gesvd_first(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    real = torch.linalg.svd

    def default_driver_fails(tensor, *args, driver=None, **kwargs):  # type: ignore[no-untyped-def]
        if driver is None:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(tensor, *args, driver=driver, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", default_driver_fails)
    weight = rng.standard_normal((64, 48))
    decomposition = decompose(weight, options=SvdOptions(solver="exact", backend="torch", device="cuda"))
    np.testing.assert_allclose(decomposition.s, _exact(weight), rtol=1e-4)
    assert decomposition.notes == (
        "SVD fallback: torch.linalg.svd on cuda failed (linalg.svd: The algorithm failed to converge); "
        "used its gesvd driver",
    )
