"""What a rewrite report says about time: per-site seconds are the site's own work, start-up is apart.

The pipeline's clock is replaced by a virtual one that moves only when the test moves it, so what is
checked is which interval a cost lands in, never how fast the machine is (the test was flaky under load:
a site of the digits model took 5 s of real time beside other jobs)."""

from __future__ import annotations

import types

import onnx
import pytest

from onnxsvd import RankPolicy, RewriteConfig
from onnxsvd.factorize import lowrank
from onnxsvd.pipeline import assemble, group, oneshot, rewrite
from onnxsvd.pipeline.report import RewriteReport
from tests.conftest import MODELS

#: A one-time cost on the first SVD (as importing torch is on the first site), in virtual seconds.
START_UP = 1.0

#: Virtual seconds each clock reading moves on, so every interval is positive but tiny beside START_UP.
TICK = 1e-6


class VirtualClock:
    """``time.perf_counter`` for the pipeline's modules, moved by :meth:`sleep` and by ``TICK`` a reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += TICK
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _rewrite_with_a_slow_first_svd(monkeypatch: pytest.MonkeyPatch, start_up_pass: bool = True) -> RewriteReport:
    """Rewrite the digits MLP on the virtual clock, the first SVD costing ``START_UP`` virtual seconds."""
    clock = VirtualClock()
    for module in (group, oneshot, assemble):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    if not start_up_pass:
        monkeypatch.setattr(oneshot, "_start_up", lambda config: [])
    svd = lowrank._svd
    calls: list[int] = []

    def slow_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not calls:
            clock.sleep(START_UP)
        calls.append(1)
        return svd(*args, **kwargs)

    monkeypatch.setattr(lowrank, "_svd", slow_first)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1), svd="exact", jobs=1)
    report = rewrite(onnx.load(str(MODELS / "digits_mlp.onnx")), config).report
    assert len(calls) == int(start_up_pass) + len(report.factorized)  # the start-up's SVD, then one per site
    return report


def test_per_site_seconds_leave_out_the_one_time_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    report = _rewrite_with_a_slow_first_svd(monkeypatch)
    seconds = [site.seconds for site in report.factorized]
    assert len(seconds) == 3 and all(0 < value < START_UP / 2 for value in seconds), seconds
    (note,) = [note for note in report.notes if note.startswith("start-up: ")]
    assert note.startswith(f"start-up: {START_UP:.2f} s") and "not counted in any site's seconds" in note
    assert report.seconds >= START_UP  # the total still holds it


def test_without_the_start_up_pass_the_first_site_would_hold_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with the start-up pass gone, the cost lands in the first site's seconds."""
    report = _rewrite_with_a_slow_first_svd(monkeypatch, start_up_pass=False)
    first, *others = [site.seconds for site in report.factorized]
    assert first >= START_UP and all(value < START_UP / 2 for value in others)
    assert not [note for note in report.notes if note.startswith("start-up: ")]
