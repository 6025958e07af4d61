"""Shared fixtures: a seeded generator, the full-rank configuration, the shipped models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from onnxsvd import RankPolicy, RewriteConfig

try:  # One BLAS thread: on a shared two-core machine, spinning BLAS threads make tiny SVDs 100× slower.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (the dev extra)
    pass

# Property tests are derandomized so a failure reproduces on every machine, and run without a deadline
# (ONNX Runtime session start-up times vary on a shared machine).
settings.register_profile(
    "onnxsvd", deadline=None, derandomize=True, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("onnxsvd")

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"

#: Keeps every singular value: the rewrite must reproduce the model.
FULL_RANK = RankPolicy("rank", 10**6, allow_growth=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def full_rank() -> RewriteConfig:
    return RewriteConfig(policy=FULL_RANK)


@pytest.fixture(params=["digits_mlp.onnx", "digits_vit.onnx"])
def shipped_model(request: pytest.FixtureRequest) -> Path:
    path = MODELS / request.param
    assert path.is_file(), f"{path} is missing; run python tools/make_digits_models.py"
    return path
