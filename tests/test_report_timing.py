"""What a rewrite report says about time: per-site seconds are the site's own work, start-up is apart."""

from __future__ import annotations

import time

import onnx
import pytest

from onnxsvd import RankPolicy, RewriteConfig
from onnxsvd.factorize import lowrank
from onnxsvd.pipeline import rewrite
from tests.conftest import MODELS

#: A one-time cost on the first SVD (as importing torch is on the first site), far above a tiny SVD's time.
START_UP = 1.0


def test_per_site_seconds_leave_out_the_one_time_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    svd = lowrank._svd
    calls: list[int] = []

    def slow_first(matrix, options=lowrank.EXACT):  # type: ignore[no-untyped-def]
        if not calls:
            time.sleep(START_UP)
        calls.append(1)
        return svd(matrix, options)

    monkeypatch.setattr(lowrank, "_svd", slow_first)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1), jobs=1)
    report = rewrite(onnx.load(str(MODELS / "digits_mlp.onnx")), config).report
    seconds = [site.seconds for site in report.factorized]
    assert len(seconds) == 3 and max(seconds) < START_UP / 2, seconds
    (note,) = [note for note in report.notes if note.startswith("start-up: ")]
    assert "not counted in any site's seconds" in note
    assert report.seconds >= START_UP  # the total still holds it
