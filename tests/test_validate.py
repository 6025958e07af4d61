"""Validation: metrics on hand-made arrays, latency and the bound on tiny models, the gate, the command."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.cli.validate import validate_command
from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import DataError, ModelError, ProviderError, UsageError, ValidationGateError
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.validate import (
    LatencyStats,
    MetricAccumulator,
    ProviderSpeed,
    ProviderTiming,
    ValidateConfig,
    check_gate,
    compare_outputs,
    execution_provider,
    factorized_sites,
    factorized_sites_from_report,
    looks_like_class_scores,
    make_runner,
    open_session,
    parse_trace,
    profile_time_share,
    run_shares,
    site_flops,
    speedup_bound,
    time_models,
    validate,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()

# Tiny model: x [batch, 16] → MatMul W1 [16, 32] → Relu → Gemm(W2 [10, 32], transB=1) + b → logits [batch, 10].
K, HIDDEN, CLASSES, RANK = 16, 32, 10, 4


def tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((K, HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((CLASSES, HIDDEN)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "b2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, its rank-4 rewrite, the rewrite report, and 40 samples with labels."""
    folder = tmp_path_factory.mktemp("tiny")
    original = folder / "tiny.onnx"
    onnx.save(tiny_model(), original)
    rewritten = folder / "tiny_small.onnx"
    config = RewriteConfig(policy=RankPolicy("rank", RANK, align=1))
    report = rewrite_file(RewriteJob(original, rewritten, config))
    report_path = folder / "rewrite.json"
    report_path.write_text(json.dumps(report.to_dict()))
    rng = np.random.default_rng(1)
    data = folder / "eval.npz"
    np.savez(data, x=rng.standard_normal((40, K)).astype(np.float32), labels=rng.integers(0, CLASSES, 40))
    return {"original": original, "rewritten": rewritten, "report": report_path, "data": data}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped digits MLP, its ratio-0.5 rewrite and the rewrite report."""
    folder = tmp_path_factory.mktemp("digits")
    rewritten = folder / "digits_small.onnx"
    report = rewrite_file(
        RewriteJob(MODELS / "digits_mlp.onnx", rewritten, RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1)))
    )
    report_path = folder / "rewrite.json"
    report_path.write_text(json.dumps(report.to_dict()))
    return {"original": MODELS / "digits_mlp.onnx", "rewritten": rewritten, "report": report_path,
            "data": MODELS / "digits_eval.npz", "folder": folder}


FAST = ValidateConfig(warmup=1, iters=3, threads=1)


# ---------------------------------------------------------------- metrics


def test_exact_outputs() -> None:
    scores = np.random.default_rng(0).standard_normal((50, 10)).astype(np.float32)
    metrics = compare_outputs(scores, scores.copy(), labels=np.argmax(scores, axis=1))
    assert metrics.cosine == 1.0 and metrics.cosine_min == 1.0 and metrics.cosine_global == 1.0
    assert metrics.sqnr_db == math.inf and metrics.relative == 0.0 and metrics.max_abs == 0.0
    assert metrics.top1_agreement == 1.0 and metrics.top5_agreement == 1.0
    assert metrics.accuracy_original == metrics.accuracy_rewritten == 1.0 and metrics.top1_drop == 0.0
    assert metrics.to_dict()["sqnr_db"] == "inf"


def test_known_perturbation() -> None:
    reference = np.ones((4, 8), dtype=np.float32)
    candidate = reference + 0.5  # parallel: cosine 1; ‖a − b‖/‖a‖ = 0.5
    metrics = compare_outputs(reference, candidate)
    assert metrics.max_abs == pytest.approx(0.5) and metrics.mean_abs == pytest.approx(0.5)
    assert metrics.relative == pytest.approx(0.5)
    assert metrics.sqnr_db == pytest.approx(10 * math.log10(4.0))  # Σa² / Σ(a−b)² = 1 / 0.25
    assert metrics.cosine == pytest.approx(1.0)


def test_per_sample_and_global_cosine() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[0.0, 1.0], [0.0, 2.0]])  # sample 0 orthogonal, sample 1 parallel
    metrics = compare_outputs(reference, candidate)
    assert metrics.cosine == pytest.approx(0.5) and metrics.cosine_min == pytest.approx(0.0)
    assert metrics.cosine_global == pytest.approx(2.0 / (math.sqrt(2.0) * math.sqrt(5.0)))
    assert metrics.classes == 2 and metrics.top1_agreement == pytest.approx(0.5) and metrics.top5_agreement is None


def test_zero_vectors() -> None:
    zeros = np.zeros((3, 4))
    both = compare_outputs(zeros, zeros)
    assert both.cosine == 1.0 and both.cosine_global == 1.0 and both.sqnr_db == math.inf
    one = compare_outputs(zeros, np.ones((3, 4)))
    assert one.cosine == 0.0 and one.cosine_global == 0.0 and one.relative == math.inf and one.sqnr_db == -math.inf


def test_top_k_and_labels() -> None:
    reference = np.tile(np.arange(10, dtype=np.float32), (10, 1))  # argmax 9 everywhere
    candidate = reference.copy()
    candidate[:4, 0] = 100.0  # 4 samples now pick class 0; class 9 stays second, inside the top 5
    candidate[:2, 1:9] = 50.0  # 2 of them push class 9 out of the top 5
    labels = np.array([9] * 8 + [0] * 2)
    metrics = compare_outputs(reference, candidate, labels)
    assert metrics.top1_agreement == pytest.approx(0.6)
    assert metrics.top5_agreement == pytest.approx(0.8)
    assert metrics.accuracy_original == pytest.approx(0.8)  # 8 labels of 9
    assert metrics.accuracy_rewritten == pytest.approx(0.4)  # samples 4..7
    assert metrics.top1_drop == pytest.approx(0.4)


def test_class_scores_detection() -> None:
    assert looks_like_class_scores((8, 10), np.dtype(np.float32))
    assert not looks_like_class_scores((8, 1), np.dtype(np.float32))
    assert not looks_like_class_scores((8, 10), np.dtype(np.int64))
    assert not looks_like_class_scores((8, 4, 10), np.dtype(np.float32))
    hidden = compare_outputs(np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    assert hidden.classes is None and hidden.top1_agreement is None and hidden.top1_drop is None


def test_nan_is_reported_and_fails_the_gate() -> None:
    reference = np.ones((3, 4), dtype=np.float32)
    candidate = reference.copy()
    candidate[1, 2] = np.nan
    metrics = compare_outputs(reference, candidate, name="y")
    assert metrics.non_finite == 1 and math.isnan(metrics.cosine) and math.isnan(metrics.max_abs)
    gate = check_gate([metrics], ValidateConfig(min_cosine=-1.0))
    assert not gate.passed and "'y'" in gate.failures[0]


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(np.ones((2, 3)), np.ones((2, 4)))


@settings(max_examples=30, deadline=None)
@given(samples=st.integers(1, 12), features=st.integers(2, 7), cut=st.integers(0, 12), seed=st.integers(0, 99))
def test_streaming_equals_one_shot(samples: int, features: int, cut: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((samples, features))
    candidate = reference + 0.1 * rng.standard_normal((samples, features))
    labels = rng.integers(0, features, samples)
    cut = min(cut, samples)
    streamed = MetricAccumulator("y")
    for part in (slice(0, cut), slice(cut, samples)):
        if part.stop > part.start:
            streamed.update(reference[part], candidate[part], labels[part])
    one = compare_outputs(reference, candidate, labels, name="y")
    two = streamed.result()
    for field in ("max_abs", "mean_abs", "relative", "sqnr_db", "cosine", "cosine_min", "cosine_global",
                  "top1_agreement", "accuracy_original", "accuracy_rewritten"):
        assert getattr(two, field) == pytest.approx(getattr(one, field), rel=1e-9, abs=1e-12), field
    assert -1.0 <= one.cosine_min <= one.cosine <= 1.0


# ---------------------------------------------------------------- gate and config


def test_gate_names_the_worst_output() -> None:
    good = compare_outputs(np.ones((2, 3)), np.ones((2, 3)), name="good")
    bad = compare_outputs(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]), name="bad")
    assert check_gate([good, bad], ValidateConfig()).passed and not check_gate([good], ValidateConfig()).checked
    gate = check_gate([good, bad], ValidateConfig(min_cosine=0.9))
    assert gate.checked and gate.failures == ("output 'bad' cosine 0.7071 < --min-cosine 0.9",)


def test_top1_gate_needs_class_scores() -> None:
    hidden = compare_outputs(np.ones((2, 3, 4)), np.ones((2, 3, 4)), name="hidden")
    with pytest.raises(UsageError, match=r"--max-top1-drop needs an output of class scores .*\['hidden'\]"):
        check_gate([hidden], ValidateConfig(max_top1_drop=0.01))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"providers": ()}, "at least one provider"),
        ({"providers": ("tpu",)}, "unknown provider 'tpu'"),
        ({"iters": 0}, "--iters must be at least 1"),
        ({"min_cosine": 1.5}, "--min-cosine must be in"),
        ({"max_top1_drop": -0.1}, "--max-top1-drop must be in"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
    ],
)
def test_config_rejects_impossible_values(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ValidateConfig(**options)


# ---------------------------------------------------------------- latency


def test_latency_on_a_tiny_model(tiny: dict[str, Path]) -> None:
    feeds = {"x": np.ones((8, K), dtype=np.float32)}
    timing = time_models(tiny["original"], tiny["rewritten"], feeds, "cpu", warmup=1, iters=4, threads=1)
    assert timing.provider == "cpu" and timing.batch_size == 8 and timing.iters == 4
    for stats in (timing.original, timing.rewritten):
        assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms
        assert stats.mean_ms > 0 and stats.throughput > 0
    assert timing.session_seconds_original > 0 and timing.session_seconds_rewritten > 0
    assert timing.speedup > 0 and timing.to_dict()["speedup"] == timing.speedup


def test_a_run_that_fails_is_a_data_error(tiny: dict[str, Path]) -> None:
    session, _ = open_session(tiny["original"], "cpu", threads=1)
    with pytest.raises(DataError, match="onnxruntime failed to run"):
        make_runner(session, {"x": np.ones((2, K + 1), dtype=np.float32)}, "cpu")


def test_unknown_provider() -> None:
    with pytest.raises(UsageError, match="unknown provider 'rocm'"):
        execution_provider("rocm")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_without_cuda_is_a_provider_error(tiny: dict[str, Path]) -> None:
    expected = (
        "CUDA requested but this onnxruntime has no CUDAExecutionProvider; "
        "pip install 'onnxsvd[gpu]' on a machine with an NVIDIA GPU"
    )
    with pytest.raises(ProviderError) as caught:
        open_session(tiny["original"], "cuda")
    assert str(caught.value) == expected
    with pytest.raises(ProviderError, match="CUDA requested"):
        validate(tiny["original"], tiny["rewritten"], tiny["data"], ValidateConfig(providers=("cpu", "cuda")))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_cuda_latency_with_io_binding(tiny: dict[str, Path]) -> None:
    feeds = {"x": np.ones((8, K), dtype=np.float32)}
    timing = time_models(tiny["original"], tiny["rewritten"], feeds, "cuda", warmup=2, iters=5)
    assert timing.provider == "cuda" and timing.original.p50_ms > 0 and timing.rewritten.p50_ms > 0
    report = validate(tiny["original"], tiny["rewritten"], tiny["data"],
                      ValidateConfig(providers=("cuda", "cpu"), warmup=1, iters=3))
    assert [speed.provider for speed in report.speed] == ["cuda", "cpu"] and report.accuracy_provider == "cuda"
    assert report.outputs[0].cosine > 0.5


# ---------------------------------------------------------------- bound, FLOPs, profile


def test_speedup_bound_identities() -> None:
    assert speedup_bound(0.0, 0.3) == 1.0
    assert speedup_bound(0.8, 1.0) == pytest.approx(1.0)
    assert speedup_bound(0.8, 0.5) == pytest.approx(1 / (0.2 + 0.4))
    assert speedup_bound(0.5, 0.0) == pytest.approx(2.0)
    assert speedup_bound(1.0, 0.0) == math.inf


@given(share=st.floats(0.0, 0.99), kept=st.floats(0.0, 1.0))
def test_speedup_bound_lies_between_one_and_amdahl(share: float, kept: float) -> None:
    bound = speedup_bound(share, kept)
    assert 1.0 - 1e-12 <= bound <= 1.0 / (1.0 - share) + 1e-9


def _event(name: str, ts: int, dur: int, op: str = "", shape: list[int] | None = None, cat: str = "Node") -> dict:
    args = {"op_name": op} if op else {}
    if shape is not None:
        args["output_type_shape"] = [{"float": shape}]
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": args}


def test_parse_trace_skips_the_first_run_and_follows_fused_names() -> None:
    events = [
        _event("fused fc1_kernel_time", 0, 1000, "FusedGemm", [8, 32]),  # warm-up run: left out
        _event("model_run", 0, 2000, cat="Session"),
        _event("fused fc1_kernel_time", 3000, 30, "FusedGemm", [8, 32]),
        _event("relu_kernel_time", 3040, 10, "Relu"),
        _event("fc2/MatMulScaleFusion/_kernel_time", 3060, 20, "FusedMatMul", [8, 10]),
        _event("fc10_kernel_time", 3090, 40, "MatMul", [8, 5]),  # another node, not fc1
        _event("fc1_fence_before", 3000, 5),
        _event("model_run", 2990, 200, cat="Session"),
    ]
    site_us, total_us, per_site, rows = parse_trace(events, ["fc1", "fc2"], {"fc1": 32, "fc2": 10})
    assert (site_us, total_us) == (50.0, 100.0)
    assert per_site == {"fc1": 30.0, "fc2": 20.0} and rows == {"fc1": 8, "fc2": 8}


def test_flops_of_the_rewritten_sites(tiny: dict[str, Path]) -> None:
    original, rewritten = onnx.load(tiny["original"]), onnx.load(tiny["rewritten"])
    flops = site_flops(original, rewritten)
    assert flops.source == "inferred" and [site.name for site in flops.sites] == ["fc1", "fc2"]
    fc1, fc2 = flops.sites
    assert (fc1.k, fc1.n, fc2.k, fc2.n) == (K, HIDDEN, HIDDEN, CLASSES)
    assert fc1.flops_per_row_before == 2 * K * HIDDEN and fc1.flops_per_row_after == 2 * RANK * (K + HIDDEN)
    assert fc2.flops_per_row_after == 2 * RANK * (HIDDEN + CLASSES)
    assert flops.kept_fraction == pytest.approx(flops.per_row_after / flops.per_row_before)
    given_names = site_flops(original, rewritten, ["fc2"])
    assert given_names.source == "given" and [site.name for site in given_names.sites] == ["fc2"]
    with pytest.raises(UsageError, match="'relu' is not a constant-weight MatMul/Gemm"):
        factorized_sites(original, rewritten, ["relu"])
    assert factorized_sites(original, original)[0] == ()


def test_profile_share_and_bound_on_a_tiny_model(tiny: dict[str, Path]) -> None:
    flops = site_flops(onnx.load(tiny["original"]), onnx.load(tiny["rewritten"]))
    feeds = {"x": np.ones((8, K), dtype=np.float32)}
    share = profile_time_share(tiny["original"], feeds, flops.sites, "cpu", threads=1, runs=2)
    assert share.missing == () and 0.0 < share.share <= 1.0 and share.site_us <= share.total_us
    assert share.rows == {"fc1": 8, "fc2": 8}
    flops = flops.with_rows(share.rows)
    assert flops.flops_before == 8 * flops.per_row_before and flops.flops_after == 8 * flops.per_row_after
    bound = speedup_bound(share.share, flops.kept_fraction)
    assert 0.0 < flops.kept_fraction < 1.0
    assert 1.0 <= bound and (share.share == 1.0 or bound <= 1.0 / (1.0 - share.share))


# ---------------------------------------------------------------- validate()


def test_validate_tiny_models(tiny: dict[str, Path]) -> None:
    config = ValidateConfig(warmup=1, iters=3, threads=1, batch_size=16,
                            factorized_sites=factorized_sites_from_report(tiny["report"]))
    report = validate(tiny["original"], tiny["rewritten"], tiny["data"], config)
    assert report.samples == 40 and report.batch_size == 16 and report.has_labels
    (logits,) = report.outputs
    assert logits.name == "logits" and logits.shape == (40, CLASSES) and logits.samples == 40
    assert -1.0 <= logits.cosine <= 1.0 and logits.accuracy_original is not None
    assert report.flops.source == "given" and len(report.flops.sites) == 2
    (speed,) = report.speed
    assert speed.timing.batch_size == 16 and speed.time_share is not None and speed.bound is not None
    assert 1.0 <= speed.bound <= 1.0 / max(1e-9, 1.0 - speed.time_share.share) + 1e-9
    assert report.size.params_rewritten < report.size.params_original
    assert report.size.bytes_rewritten < report.size.bytes_original
    json.dumps(report.to_dict(), allow_nan=False)


def test_validate_a_model_against_itself(tiny: dict[str, Path]) -> None:
    report = validate(tiny["original"], tiny["original"], tiny["data"], ValidateConfig(
        warmup=0, iters=1, threads=1, min_cosine=0.999, max_top1_drop=0.0))
    (logits,) = report.outputs
    assert logits.cosine == 1.0 and logits.sqnr_db == math.inf and logits.top1_agreement == 1.0
    assert report.gate.checked and report.gate.passed
    assert report.flops.sites == () and report.speed[0].bound == 1.0
    assert report.to_dict()["outputs"][0]["sqnr_db"] == "inf"


def test_validate_gate_raises_with_the_worst_output(tiny: dict[str, Path]) -> None:
    config = ValidateConfig(warmup=0, iters=1, threads=1, min_cosine=0.99999, profile=False)
    with pytest.raises(ValidationGateError, match=r"validation gate failed: output 'logits' cosine .* < --min-cosine"):
        validate(tiny["original"], tiny["rewritten"], tiny["data"], config)
    report = validate(tiny["original"], tiny["rewritten"], tiny["data"], config, enforce_gate=False)
    assert not report.gate.passed and report.speed[0].bound is None
    assert ValidationGateError.exit_code == 3


def test_validate_refuses_models_with_other_inputs(tiny: dict[str, Path], tmp_path: Path) -> None:
    other = tiny_model()
    other.graph.input[0].name = "pixels"
    other.graph.node[0].input[0] = "pixels"
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    with pytest.raises(ModelError, match=r"takes inputs \['pixels'\] but the original takes \['x'\]"):
        validate(tiny["original"], path, tiny["data"], FAST)


def test_fixed_batch_models_get_their_batch_size(tiny: dict[str, Path], tmp_path: Path) -> None:
    fixed = tiny_model()
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 8
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, path)
    report = validate(path, path, tiny["data"], ValidateConfig(warmup=0, iters=1, threads=1, profile=False))
    assert report.batch_size == 8 and report.samples == 40
    with pytest.raises(UsageError, match="fixes the batch size to 8"):
        validate(path, path, tiny["data"], ValidateConfig(batch_size=5, profile=False))


# ---------------------------------------------------------------- the command


def _args(paths: dict[str, Path], *extra: str) -> list[str]:
    return [str(paths["original"]), str(paths["rewritten"]), "--data", str(paths["data"]),
            "--warmup", "1", "--iters", "3", "--threads", "1", *extra]


def test_command_end_to_end_on_digits(digits: dict[str, Path]) -> None:
    output = digits["folder"] / "validate.json"
    result = CliRunner().invoke(
        validate_command, _args(digits, "--json", str(output), "--rewrite-report", str(digits["report"]))
    )
    assert result.exit_code == 0, result.output
    for text in ("accuracy", "logits", "latency", "speedup", "bound", "size", "parameters"):
        assert text in result.output
    report = json.loads(output.read_text())
    (logits,) = report["outputs"]
    assert report["samples"] == 541 and report["has_labels"] and report["batch_size"] == 64
    assert logits["accuracy_original"] == pytest.approx(0.976, abs=1e-3)
    assert 0.0 < logits["cosine"] < 1.0 and 0.0 <= logits["top1_agreement"] <= 1.0
    assert report["flops"]["source"] == "given" and len(report["flops"]["sites"]) == 3
    (cpu,) = report["speed"]
    assert cpu["provider"] == "cpu" and cpu["speedup"] > 0 and cpu["bound"] >= 1.0
    assert report["size"]["params_rewritten"] < report["size"]["params_original"]
    assert report["gate"] == {"checked": False, "passed": True, "failures": []}


def test_command_gate_exits_3_with_one_line(digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    output = digits["folder"] / "gate.json"
    result = CliRunner().invoke(
        validate_command, _args(digits, "--min-cosine", "0.99", "--json", str(output), "--no-profile")
    )
    assert isinstance(result.exception, ValidationGateError) and result.exception.exit_code == 3
    assert "gate: FAILED" in result.output and output.exists()  # rendered and written before failing
    assert json.loads(output.read_text())["gate"]["passed"] is False

    from onnxsvd.cli import cli, main

    monkeypatch.setitem(cli.commands, "validate", validate_command)
    code = main(["validate", *_args(digits, "--max-top1-drop", "0.01", "--no-profile")])
    assert code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("onnxsvd: error: validation gate failed: output 'logits' top-1 drop ")
    assert "> --max-top1-drop 0.01 (accuracy 0.9760 → " in lines[0]


def _parsed(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> ValidateConfig:
    """The :class:`ValidateConfig` the command builds from ``args`` (it stops before any work)."""
    import onnxsvd.validate.pipeline

    seen: list[ValidateConfig] = []

    def capture(original: object, rewritten: object, data: object, config: ValidateConfig, **_: object) -> None:
        seen.append(config)
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(onnxsvd.validate.pipeline, "validate", capture)
    result = CliRunner().invoke(validate_command, args)
    assert result.exit_code == 0 and len(seen) == 1, result.output
    return seen[0]


def test_command_parses_options_into_the_config(digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config option is named as its ValidateConfig field and defaults to it: one place maps them."""
    from onnxsvd.cli.validate import parse_config

    required = [str(digits["original"]), str(digits["rewritten"]), "--data", str(digits["data"])]
    assert _parsed(monkeypatch, required) == ValidateConfig()
    config = _parsed(monkeypatch, [
        *required, "--providers", "cpu, CUDA", "--warmup", "2", "--iters", "7", "--threads", "3", "--batch-size", "16",
        "--max-samples", "100", "--min-cosine", "0.9", "--max-top1-drop", "0.02", "--no-profile",
        "--rewrite-report", str(digits["report"]),
    ])
    assert config == ValidateConfig(
        providers=("cpu", "cuda"), warmup=2, iters=7, threads=3, batch_size=16, max_samples=100,
        min_cosine=0.9, max_top1_drop=0.02, profile=False,
        factorized_sites=("/layers/layers.0/Gemm", "/layers/layers.2/Gemm", "/layers/layers.4/Gemm"),
    )
    paths = {"original", "rewritten", "data_path", "json_path", "rewrite_report", "adapter"}
    options = {param.name for param in validate_command.params} - paths
    assert options <= {field.name for field in dataclasses.fields(ValidateConfig)}
    assert parse_config({"iters": 7}) == ValidateConfig(iters=7)
    result = CliRunner().invoke(validate_command, _args(digits, "--iters", "0"))
    assert isinstance(result.exception, UsageError) and "--iters must be at least 1" in str(result.exception)
    result = CliRunner().invoke(validate_command, _args(digits, "--rewrite-report", str(digits["data"])))
    assert isinstance(result.exception, UsageError) and "rewrite report" in str(result.exception)


def test_command_data_errors_are_one_line(digits: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((3, 64), dtype=np.float32))
    result = CliRunner().invoke(validate_command, _args({**digits, "data": bad}))
    assert isinstance(result.exception, DataError)
    assert str(result.exception).startswith("input 'input' missing from ") and "\n" not in str(result.exception)


# ---------------------------------------------------------------- spreads, the bound's note, the gate once


def test_profile_share_is_reported_run_by_run() -> None:
    events = [
        _event("model_run", 0, 100, cat="Session"),  # warm-up: left out
        _event("fc1_kernel_time", 10, 50, "MatMul"),
        _event("model_run", 200, 100, cat="Session"),
        _event("fc1_kernel_time", 210, 30, "MatMul"),
        _event("relu_kernel_time", 250, 10, "Relu"),
        _event("model_run", 400, 100, cat="Session"),
        _event("fc1_kernel_time", 410, 10, "MatMul"),
        _event("relu_kernel_time", 430, 30, "Relu"),
    ]
    from onnxsvd.validate import OriginalProfile, SiteCost

    assert run_shares(events, ["fc1"], skip_runs=1) == [0.75, 0.25]
    share = OriginalProfile("cpu", 2, 1, tuple(events)).time_share([SiteCost("fc1", "MatMul", 4, 4, 32, 16)])
    assert share.share == pytest.approx(0.5) and share.share_range == (0.25, 0.75)
    assert share.to_dict()["share_range"] == [0.25, 0.75]


def test_nchwc_conv_kernels_are_found_through_the_nodes_fused_behind_them() -> None:
    """ONNX Runtime's CPU layout pass names a Conv kernel after the output of what it fuses (a Relu, a
    residual Add then a Relu) with ``_nchwc``: the share still finds the Conv sites."""
    from onnx import TensorProto, helper

    from onnxsvd.validate.profile import conv_kernel_aliases

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu2"),
    ]
    graph = helper.make_graph(
        nodes, "resnet_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor("w1", TensorProto.FLOAT, [4, 4, 3, 3], [0.0] * 144),
         helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 3, 3], [0.0] * 144)],
    )
    aliases = conv_kernel_aliases(helper.make_model(graph))
    assert aliases == {"c1": "conv1", "r1": "conv1", "c2": "conv2", "s": "conv2", "y": "conv2"}
    events = [
        _event("model_run", 0, 100, cat="Session"),
        _event("model_run", 200, 100, cat="Session"),
        _event("r1_nchwc_kernel_time", 210, 30, "Conv"),
        _event("y_nchwc_kernel_time", 250, 50, "Conv"),
        _event("ReorderOutput_kernel_time", 300, 20, "ReorderOutput"),
    ]
    assert run_shares(events, ["conv1", "conv2"], skip_runs=1) == [0.0]  # by name alone, no kernel is a site
    assert run_shares(events, ["conv2"], skip_runs=1, aliases=aliases) == [0.5]
    assert run_shares(events, ["conv1", "conv2"], skip_runs=1, aliases=aliases) == [0.8]


def _timing(speedup: float) -> ProviderTiming:
    def stats(p50: float) -> LatencyStats:
        return LatencyStats(p50, p50 * 1.2, p50, p50 * 0.9, 64 / p50, p10_ms=p50 * 0.95, max_ms=p50 * 1.5)

    return ProviderTiming("cpu", 64, 5, 20, None, stats(1.6), stats(1.6 / speedup), 0.01, 0.01,
                          speedup_p10=speedup * 0.8, speedup_p90=speedup * 1.1)


def test_a_speedup_above_its_bound_is_explained() -> None:
    from onnxsvd.validate import TimeShare

    share = TimeShare("cpu", 10, 30.0, 100.0, run_shares=(0.18, 0.3, 0.56))
    speed = ProviderSpeed(_timing(1.6), share, bound=1.3)
    assert speed.exceeds_bound and speed.to_dict()["exceeds_bound"] is True
    note = speed.bound_note()
    assert note is not None and note.startswith("cpu: measured 1.60× exceeds the profile bound 1.30×")
    assert "s 0.18–0.56 over 10 profiled runs" in note and "p10–p90 1.28–1.76×" in note
    assert ProviderSpeed(_timing(1.2), share, bound=1.3).bound_note() is None


def test_validate_table_shows_spreads_and_the_bound_note(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io as text_io

    from rich.console import Console

    from onnxsvd.cli.validate import render_report
    from onnxsvd.validate import pipeline

    monkeypatch.setattr(pipeline, "speedup_bound", lambda share, kept: 0.5)  # any measurement beats it
    config = ValidateConfig(warmup=1, iters=5, threads=1, profile_runs=4,
                            factorized_sites=factorized_sites_from_report(tiny["report"]))
    report = validate(tiny["original"], tiny["rewritten"], tiny["data"], config)
    (speed,) = report.speed
    assert speed.time_share is not None and speed.time_share.runs == 4 and len(speed.time_share.run_shares) == 4
    assert speed.timing.original.p10_ms <= speed.timing.original.p50_ms <= speed.timing.original.p90_ms
    assert speed.timing.speedup_p10 <= speed.timing.speedup_p90
    assert any(note.startswith("cpu: measured ") and "exceeds the profile bound 0.50×" in note for note in report.notes)
    console = Console(width=200, file=text_io.StringIO())
    render_report(report, console)
    text = console.file.getvalue()
    low, high = speed.time_share.share_range
    assert "p10–p90" in text and f"{speed.timing.original.p10_ms:.3f}–{speed.timing.original.p90_ms:.3f}" in text
    assert f"{low:.2f}–{high:.2f}" in text and "≤ 0.50× *" in text


def test_a_failed_gate_is_printed_once(digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from onnxsvd.cli import cli, main

    monkeypatch.setitem(cli.commands, "validate", validate_command)
    code = main(["validate", *_args(digits, "--min-cosine", "0.99", "--no-profile")])
    captured = capsys.readouterr()
    assert code == 3
    assert (captured.out + captured.err).count("< --min-cosine 0.99") == 1
    assert "gate: FAILED" in captured.out
    assert captured.err.startswith("onnxsvd: error: validation gate failed: output 'logits' cosine ")
