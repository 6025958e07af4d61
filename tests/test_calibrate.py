"""Calibration, activation-aware factorization and the sequential rewrite (issue 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.calibrate import CalibrateConfig, calibrate, calibrate_file
from onnxsvd.calibrate.collect import expose, rows_of, session_for
from onnxsvd.calibrate.stats import FORMAT_VERSION, Statistics, StatsAccumulator, Workspace
from onnxsvd.cli import main
from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import StatsError, UsageError
from onnxsvd.factorize import diagonal_metric, factorize, identity_metric, whitening_metric
from onnxsvd.graph import find_sites
from onnxsvd.io import fingerprint
from onnxsvd.pipeline import rewrite
from onnxsvd.pipeline.sequential import rewrite_sequential, site_levels
from tests.models import assert_valid, run


def _mlp(rng: np.random.Generator, widths: tuple[int, ...] = (24, 32, 32, 16)) -> onnx.ModelProto:
    """x [B, S, K0] → MatMul/Add/Relu layers; weights with decaying spectra so rank matters."""
    nodes, initializers = [], []
    current = "x"
    for layer, (k, n) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        u, _ = np.linalg.qr(rng.standard_normal((k, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        spectrum = np.exp(-np.arange(min(k, n)) / 6.0)
        weight = (u[:, : min(k, n)] * spectrum) @ v[: min(k, n), :]
        initializers += [
            numpy_helper.from_array(weight.astype(np.float32), f"w{layer}"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, f"b{layer}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [f"m{layer}"], name=f"fc{layer}"),
            helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"]),
        ]
        current = f"a{layer}"
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{layer}"]))
            current = f"r{layer}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", widths[-1]])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _correlated(rng: np.random.Generator, samples: int, seq: int, k: int) -> np.ndarray:
    mixing = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 4.0)[None, :]
    scale = np.exp(rng.standard_normal(k))
    return (rng.standard_normal((samples, seq, k)) @ mixing.T * scale).astype(np.float32)


def _batches(data: dict[str, np.ndarray], size: int):
    count = len(next(iter(data.values())))
    return lambda: ({name: value[i : i + size] for name, value in data.items()} for i in range(0, count, size))


def test_streamed_statistics_equal_direct_computation(rng: np.random.Generator) -> None:
    model = _mlp(rng)
    x = _correlated(rng, 13, 5, 24)
    statistics = calibrate(model, _batches({"x": x}, 4))
    assert statistics.fingerprint == fingerprint(model)
    first = statistics.activations["x"]
    rows = x.reshape(-1, 24).astype(np.float64)
    np.testing.assert_allclose(first.gram, rows.T @ rows, rtol=1e-10)
    np.testing.assert_allclose(first.abs_sum, np.abs(rows).sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(first.abs_max, np.abs(rows).max(axis=0), rtol=1e-12)
    assert first.rows == 65
    # A later activation, computed through ORT, matches the numpy forward pass.
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0")).astype(np.float64)
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b0")).astype(np.float64)
    hidden = np.maximum(rows @ weight + bias, 0.0)
    np.testing.assert_allclose(statistics.activations["r0"].gram, hidden.T @ hidden, rtol=1e-4)


def test_accumulator_handles_empty_and_one_dimensional_batches() -> None:
    accumulator = StatsAccumulator(3)
    accumulator.update(np.zeros((0, 3), dtype=np.float32))
    accumulator.update(rows_of(np.array([1.0, -2.0, 3.0]), -1))
    result = accumulator.result()
    assert result.rows == 1
    np.testing.assert_allclose(result.gram, np.outer([1, -2, 3], [1, -2, 3]))


def test_rows_of_drops_padding_and_reads_transposed_channels() -> None:
    activation = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [B, S, K]
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = rows_of(activation, -1, mask)
    assert rows.shape == (3, 4)
    np.testing.assert_array_equal(rows, activation[mask != 0])
    transposed = rows_of(np.swapaxes(activation, -1, -2), -2)
    np.testing.assert_array_equal(transposed, activation.reshape(-1, 4))


def test_reused_buffers_give_the_same_statistics(rng: np.random.Generator) -> None:
    """Rows gathered into a shared workspace, batches of varying size, a Gram wider than one mirroring
    block: the same sums as a direct float64 computation, and an exactly symmetric Gram."""
    workspace = Workspace()
    wide, narrow = StatsAccumulator(300), StatsAccumulator(7)
    seen_wide, seen_narrow = [], []
    for rows in (5, 40, 3):
        activation = rng.standard_normal((2, rows, 300)).astype(np.float32)  # [B, S, K]
        mask = rng.integers(0, 2, size=(2, rows))
        mask[0, 0] = 1
        wide.update(rows_of(activation, -1, mask, workspace), workspace)
        narrow.update(rows_of(activation[..., :7], -1, mask, workspace), workspace)
        seen_wide.append(activation[mask != 0].astype(np.float64))
        seen_narrow.append(activation[..., :7][mask != 0].astype(np.float64))
    for accumulator, seen in ((wide, seen_wide), (narrow, seen_narrow)):
        direct = np.concatenate(seen)
        shared = accumulator.result(copy=False)
        np.testing.assert_allclose(shared.gram, direct.T @ direct, rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(shared.gram, shared.gram.T)
        np.testing.assert_allclose(shared.abs_sum, np.abs(direct).sum(axis=0), rtol=1e-10)
        np.testing.assert_array_equal(shared.abs_max, np.abs(direct).max(axis=0))
        assert shared.rows == len(direct)


def test_in_memory_sessions_match_the_serialized_model(rng: np.random.Generator) -> None:
    """Large initializers handed to ONNX Runtime as arrays give the outputs of the plain serialized
    model, and the model itself is left as it was."""
    import onnxruntime as ort

    model = _mlp(rng)
    before = model.SerializeToString()
    exposed = expose(model, [("r0", TensorProto.FLOAT), ("y", TensorProto.FLOAT)])
    assert {t.name for t in exposed.graph.initializer} == {"w0", "b0", "w1", "b1", "w2", "b2"}
    x = _correlated(rng, 3, 5, 24)
    shared = session_for(exposed).run(None, {"x": x})
    plain = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for left, right in zip(shared, plain, strict=True):
        np.testing.assert_array_equal(left, right)
    assert model.SerializeToString() == before


def test_statistics_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    model = _mlp(rng)
    statistics = calibrate(model, _batches({"x": _correlated(rng, 8, 4, 24)}, 3))
    path = statistics.save(tmp_path / "stats.npz")
    loaded = Statistics.load(path)
    assert loaded.fingerprint == statistics.fingerprint
    assert set(loaded.activations) == set(statistics.activations)
    for name, stats in statistics.activations.items():
        np.testing.assert_array_equal(loaded.activations[name].gram, stats.gram)
        assert loaded.activations[name].rows == stats.rows


@pytest.mark.parametrize(("version", "found"), [(1, "format 1"), (None, "no format version")])
def test_statistics_of_another_format_version_are_refused(
    version: int | None, found: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    """A file of format 1 holds a fingerprint of the structure alone: it must be made again, not trusted."""
    model = _mlp(rng)
    statistics = calibrate(model, _batches({"x": _correlated(rng, 8, 4, 24)}, 4))
    current = statistics.save(tmp_path / "current.npz")
    entries = dict(np.load(current))
    assert int(entries.pop("__format__")) == FORMAT_VERSION == 2
    if version is not None:
        entries["__format__"] = np.array(version)
    old = tmp_path / "old.npz"
    np.savez(old, **entries)
    with pytest.raises(StatsError) as raised:
        Statistics.load(old)
    message = str(raised.value)
    assert str(old) in message and found in message and f"reads format {FORMAT_VERSION}" in message, message
    assert "re-run 'onnxsvd calibrate'" in message and "\n" not in message


def _data_error(gram: np.ndarray, weight: np.ndarray, approximation: np.ndarray) -> float:
    difference = weight - approximation  # [K, N]
    return float(np.sqrt(max(np.trace(difference.T @ gram @ difference), 0.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitening_beats_svd_and_asvd_in_the_data_metric_at_every_rank(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n = 32, 24
    x = _correlated(rng, 40, 8, k).reshape(-1, k).astype(np.float64)
    gram = x.T @ x
    weight = rng.standard_normal((k, n))
    metrics = {
        "svd": identity_metric(),
        "asvd": diagonal_metric(np.abs(x).mean(axis=0)),
        "whiten": whitening_metric(gram, damping=1e-8),
    }
    for rank in range(1, min(k, n)):
        errors = {name: _data_error(gram, weight, factorize(weight, [rank], m, np.float64).product())
                  for name, m in metrics.items()}
        assert errors["whiten"] <= errors["svd"] * (1 + 1e-6) + 1e-9, (rank, errors)
        assert errors["whiten"] <= errors["asvd"] * (1 + 1e-6) + 1e-9, (rank, errors)


@pytest.mark.parametrize("case", ["zero_channels", "few_rows", "all_zero"])
def test_degenerate_grams_never_give_nan(case: str, rng: np.random.Generator) -> None:
    k, n = 16, 12
    weight = rng.standard_normal((k, n))
    x = rng.standard_normal((200, k))
    if case == "zero_channels":
        x[:, :5] = 0.0
    elif case == "few_rows":
        x = x[:4]
    gram = x.T @ x
    if case == "all_zero":
        from onnxsvd.errors import FactorizationError

        with pytest.raises(FactorizationError, match="degenerate"):
            whitening_metric(np.zeros((k, k)))
        with pytest.raises(FactorizationError, match="degenerate"):
            diagonal_metric(np.zeros(k))
        return
    for damping in (0.0, 1e-6, 1e-2):
        factors = factorize(weight, [6], whitening_metric(gram, damping=damping), np.float32)
        assert all(np.all(np.isfinite(part)) for stage in factors.stages for part in stage)
    # Singular beyond Cholesky: a Gram with a negative eigenvalue from rounding takes the eigen path.
    indefinite = gram - 1e-3 * np.eye(k) * np.trace(gram)
    metric = whitening_metric(indefinite, damping=0.0)
    assert metric.kind == "eigen"
    assert np.all(np.isfinite(factorize(weight, [6], metric).product()))


def test_degenerate_site_statistics_keep_the_layer_dense(rng: np.random.Generator) -> None:
    model = _mlp(rng)
    x = _correlated(rng, 6, 4, 24)
    statistics = calibrate(model, _batches({"x": x}, 3))
    activations = dict(statistics.activations)
    zeroed = activations["r0"]
    activations["r0"] = type(zeroed)(np.zeros_like(zeroed.gram), np.zeros_like(zeroed.abs_sum), zeroed.abs_max, 10)
    result = rewrite(
        model,
        RewriteConfig(policy=RankPolicy("rank", 4), method="whiten"),
        Statistics(statistics.fingerprint, activations),
    )
    by_name = {site.name: site for site in result.report.sites}
    assert by_name["fc1"].action == "kept" and "degenerate" in by_name["fc1"].reason
    assert by_name["fc0"].action == "factorized"
    assert_valid(result.model)


def test_activation_aware_rewrites_lower_the_output_error(rng: np.random.Generator) -> None:
    model = _mlp(rng)
    x = _correlated(rng, 64, 6, 24)
    statistics = calibrate(model, _batches({"x": x}, 16))
    (reference,) = run(model, {"x": x})
    errors = {}
    for method in ("svd", "asvd", "whiten"):
        config = RewriteConfig(policy=RankPolicy("rank", 4, align=1), method=method, damping=1e-6)
        result = rewrite(model, config, statistics if method != "svd" else None)
        assert_valid(result.model)
        (output,) = run(result.model, {"x": x})
        errors[method] = float(np.linalg.norm(output - reference))
    assert errors["whiten"] < errors["svd"], errors


def test_sequential_beats_one_shot_on_a_multi_layer_model(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(24, 32, 32, 32, 16))
    x = _correlated(rng, 64, 6, 24)
    batches = _batches({"x": x}, 16)
    statistics = calibrate(model, batches)
    # One λ: one-shot whitening damps with `damping`, the sequential closed form with `ridge`.
    config = RewriteConfig(policy=RankPolicy("rank", 5, align=1), method="whiten", damping=1e-6, ridge=1e-6)
    (reference,) = run(model, {"x": x})
    one_shot = rewrite(model, config, statistics)
    sequential = rewrite_sequential(model, config, batches)
    assert_valid(sequential.model)
    (out_one_shot,) = run(one_shot.model, {"x": x})
    (out_sequential,) = run(sequential.model, {"x": x})
    error_one_shot = np.linalg.norm(out_one_shot - reference)
    error_sequential = np.linalg.norm(out_sequential - reference)
    assert error_sequential < error_one_shot, (error_sequential, error_one_shot)
    assert any("sequential: 4 levels" in note for note in sequential.report.notes)
    # The same rank budget: sequential changes the factors, not their size.
    assert sequential.report.params_after == one_shot.report.params_after
    # svd + sequential refits B by least squares: no worse than plain SVD on the calibration data.
    plain = RewriteConfig(policy=RankPolicy("rank", 5, align=1), damping=1e-6)
    (out_plain,) = run(rewrite(model, plain).model, {"x": x})
    (out_refit,) = run(rewrite_sequential(model, plain, batches).model, {"x": x})
    assert np.linalg.norm(out_refit - reference) < np.linalg.norm(out_plain - reference)


def test_site_levels_follow_depth(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(8, 8, 8, 8))
    sites = find_sites(model).sites
    levels = site_levels(model, sites)
    assert [levels[site.node_index] for site in sites] == [0, 1, 2]


def test_rewrite_refuses_statistics_of_another_model(rng: np.random.Generator) -> None:
    model, other = _mlp(rng), _mlp(rng, widths=(24, 16, 16))
    statistics = calibrate(other, _batches({"x": _correlated(rng, 4, 4, 24)}, 4))
    with pytest.raises(StatsError, match="another model"):
        rewrite(model, RewriteConfig(method="whiten"), statistics)
    with pytest.raises(UsageError, match="needs calibration"):
        rewrite(model, RewriteConfig(method="whiten"))


# ---- the command line: one-line errors for bad data ------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    model_path = tmp_path / "model.onnx"
    onnx.save(_mlp(rng), model_path)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, x=_correlated(rng, 10, 4, 24))
    return model_path, data_path


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxsvd: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_calibrate_then_whiten_from_the_command_line(saved: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, data_path = saved
    stats_path = tmp_path / "stats.npz"
    assert main(["calibrate", str(model_path), "--data", str(data_path), "-o", str(stats_path)]) == 0
    out = tmp_path / "small.onnx"
    argv = ["rewrite", str(model_path), "-o", str(out), "--rank", "4", "--method", "whiten", "--stats", str(stats_path)]
    assert main(argv) == 0
    assert_valid(onnx.load(out))
    out_seq = tmp_path / "seq.onnx"
    argv = ["rewrite", str(model_path), "-o", str(out_seq), "--rank", "4", "--method", "whiten",
            "--data", str(data_path), "--sequential"]
    assert main(argv) == 0
    assert_valid(onnx.load(out_seq))


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p, rng: np.savez(p, wrong=rng.standard_normal((4, 4, 24)).astype(np.float32)), "'x'"),
        (lambda p, rng: np.savez(p, x=rng.standard_normal((4, 4, 24))), "float64"),
        (lambda p, rng: np.savez(p, x=rng.standard_normal((4, 24)).astype(np.float32)), "rank"),
        (lambda p, rng: np.savez(p, x=rng.standard_normal((4, 4, 7)).astype(np.float32)), "x"),
        (lambda p, rng: p.write_text("not an npz"), "npz"),
        (lambda p, rng: None, "not found"),
    ],
    ids=["wrong-name", "wrong-dtype", "wrong-rank", "wrong-shape", "not-npz", "missing"],
)
def test_bad_calibration_data_is_one_line(
    make, expect: str, saved: tuple[Path, Path], tmp_path: Path, rng: np.random.Generator, capsys
) -> None:
    model_path, _ = saved
    data_path = tmp_path / "bad.npz"
    make(data_path, rng)
    output = tmp_path / "stats.npz"
    error = _one_line_error(capsys, ["calibrate", str(model_path), "--data", str(data_path), "-o", str(output)])
    assert expect.lower() in error.lower(), error
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_statistics_of_another_model_are_refused_on_the_command_line(
    saved: tuple[Path, Path], tmp_path: Path, rng: np.random.Generator, capsys
) -> None:
    model_path, data_path = saved
    other_path = tmp_path / "other.onnx"
    onnx.save(_mlp(rng, widths=(24, 16, 16)), other_path)
    stats_path = tmp_path / "other_stats.npz"
    calibrate_file(other_path, data_path, stats_path, CalibrateConfig())
    out = tmp_path / "small.onnx"
    argv = ["rewrite", str(model_path), "-o", str(out), "--method", "whiten", "--stats", str(stats_path)]
    error = _one_line_error(capsys, argv)
    assert "another model" in error
    assert not out.exists()
    missing = ["rewrite", str(model_path), "-o", str(out), "--method", "whiten", "--stats", str(tmp_path / "no.npz")]
    assert "not found" in _one_line_error(capsys, missing)
    not_stats = ["rewrite", str(model_path), "-o", str(out), "--method", "whiten", "--stats", str(data_path)]
    assert "not an onnxsvd statistics file" in _one_line_error(capsys, not_stats)
    no_data = ["rewrite", str(model_path), "-o", str(out), "--method", "asvd"]
    assert "needs calibration" in _one_line_error(capsys, no_data, code=2)
