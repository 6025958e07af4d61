"""Large-model paths (issue 5): external data, lazy loading, path safety, randomized SVD."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import io
from onnxsvd.cli import main
from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import ModelError
from onnxsvd.factorize import SvdOptions, decompose, factorize, truncate
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.pipeline import rewrite


def _decaying(rng: np.random.Generator, k: int, n: int, decay: float = 20.0) -> np.ndarray:
    m = min(k, n)
    left = np.linalg.qr(rng.standard_normal((k, m)))[0]
    right = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return (left * np.exp(-np.arange(m) / decay)) @ right.T + 1e-3 * rng.standard_normal((k, n))


def _two_layer(rng: np.random.Generator) -> onnx.ModelProto:
    w0 = _decaying(rng, 48, 64).astype(np.float32)
    w1 = _decaying(rng, 64, 40).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1"),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 40])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("lazy", [True, False])
def test_external_data_round_trip(tmp_path: Path, rng: np.random.Generator, lazy: bool) -> None:
    source = _save_external(_two_layer(rng), tmp_path / "in")
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    model = io.load_model(source, lazy=lazy)
    assert io.is_lazy(model) == lazy
    # Keep fc1 dense so an untouched external weight must be carried over to the output's data file.
    # Full rank (allow_growth) so the output must match the original to float precision.
    config = RewriteConfig(policy=RankPolicy("rank", 48, allow_growth=True), exclude="fc1")
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    output = out_folder / "small.onnx"
    report = rewrite_file(RewriteJob(source, output, config, external_data=True))
    assert sorted(p.name for p in out_folder.iterdir()) == ["small.onnx", "small.onnx.data"]
    written = onnx.load(str(output), load_external_data=False)
    locations = {e.value for t in io.external_tensors(written) for e in t.external_data if e.key == "location"}
    assert locations == {"small.onnx.data"}
    onnx.checker.check_model(str(output), full_check=True)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    reference, result = _run(source, x), _run(output, x)
    assert np.abs(result - reference).max() / np.abs(reference).max() < 1e-4
    # The dense fc1 weight came through bit for bit.
    loaded = onnx.load(str(output))
    w1 = next(numpy_helper.to_array(t) for t in loaded.graph.initializer if t.name == "w1")
    np.testing.assert_array_equal(w1, numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"),
                                                           str(source.parent)))
    assert report.file_size_after == io.file_size(output)
    assert report.file_size_before == io.file_size(source)
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before  # input untouched


def test_streamed_factors_equal_in_memory_ones_and_a_failure_leaves_nothing(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Factors written to the output's data file as they are made hold the bytes an in-memory rewrite
    gives; a rewrite that fails half way leaves the output folder empty."""
    from onnxsvd.pipeline import oneshot as rewrite_module
    source = _save_external(_two_layer(rng), tmp_path / "in")
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5))
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    rewrite_file(RewriteJob(source, output, config))  # external data in, so external data out, streamed
    streamed = {t.name: numpy_helper.to_array(t, str(output.parent)) for t in onnx.load(str(output)).graph.initializer}
    in_memory = rewrite(io.load_model(source, lazy=False), config).model
    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert streamed.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(streamed[name], array)

    calls = []
    original = rewrite_module.factor_group

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    monkeypatch.setattr(rewrite_module, "factor_group", failing)
    failed = tmp_path / "failed"
    failed.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        rewrite_file(RewriteJob(source, failed / "small.onnx", config))
    assert list(failed.iterdir()) == []


def _skips(rng: np.random.Generator, width: int = 16) -> onnx.ModelProto:
    """Three MatMuls with skip connections that cross any cut: x feeds layer 2, r0 feeds the output."""
    weights = [numpy_helper.from_array(_decaying(rng, width, width).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "x"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "r0"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "skips",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", width])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_segmented_calibration_of_a_lazy_model_equals_one_session(tmp_path: Path, rng: np.random.Generator) -> None:
    """A lazy model run one segment (one weight) at a time, tensors crossing the cuts kept on disk
    between segments, gives the statistics of the whole model in one session."""
    from onnxsvd.calibrate import CalibrateConfig, calibrate

    source = _save_external(_skips(rng), tmp_path / "in")
    x = rng.standard_normal((10, 3, 16)).astype(np.float32)

    def batches():
        return ({"x": x[i : i + 4]} for i in range(0, 10, 4))

    whole = calibrate(io.load_model(source, lazy=False), batches)
    lazy = io.load_model(source, lazy=True)
    progress = []
    segmented = calibrate(
        lazy, batches, CalibrateConfig(segment_bytes=1100), progress=lambda d, t, what: progress.append(what),
        base_dir=source.parent,
    )
    # Three segments, one per weight; the last only reads a1, made in the second, so it never runs.
    assert set(progress) == {"segment 1/3", "segment 2/3"}
    assert set(segmented.activations) == set(whole.activations) == {"x", "r0", "a1"}
    for name, stats in whole.activations.items():
        np.testing.assert_allclose(segmented.activations[name].gram, stats.gram, rtol=1e-6)
        np.testing.assert_allclose(segmented.activations[name].abs_max, stats.abs_max, rtol=1e-6)
        assert segmented.activations[name].rows == stats.rows == 30
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx", "weights.bin"]  # no leftovers


def _branching(rng: np.random.Generator) -> onnx.ModelProto:
    """x [B, 16] → MatMul w0 → Relu r → If (then: r + shift, else: r − shift) → y → MatMul w1 → z.

    ``r`` and the weight ``shift`` are read only inside the If's bodies, from the outer scope: pruning
    to ``y`` must keep the Relu and the first MatMul, and the If's segment must hold ``shift``."""
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["r", "shift"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
        helper.make_node("Relu", ["m0"], ["r"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", "Add"), else_branch=branch("else", "Sub")),
        helper.make_node("MatMul", ["y", "w1"], ["z"], name="fc1"),
    ]
    initializers = [
        numpy_helper.from_array(_decaying(rng, 16, 24).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "shift"),
        numpy_helper.from_array(np.array(True), "flag"),
        numpy_helper.from_array(_decaying(rng, 24, 8).astype(np.float32), "w1"),
    ]
    graph = helper.make_graph(
        nodes, "branching", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 8])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_calibration_follows_what_if_bodies_read_from_outside(tmp_path: Path, rng: np.random.Generator) -> None:
    """Exposing the If's output keeps the nodes and weights only its bodies read (onnx-ir's use-def
    links), in one session and in segments of a lazy model; the statistics are those of numpy's forward."""
    from onnxsvd.calibrate import CalibrateConfig, calibrate
    from onnxsvd.calibrate.collect import expose

    model = _branching(rng)
    exposed = expose(model, [("y", TensorProto.FLOAT)])
    assert [node.op_type for node in exposed.graph.node] == ["MatMul", "Relu", "If"]
    assert sorted(tensor.name for tensor in exposed.graph.initializer) == ["flag", "shift", "w0"]
    x = rng.standard_normal((6, 16)).astype(np.float32)
    weights = {tensor.name: numpy_helper.to_array(tensor).astype(np.float64) for tensor in model.graph.initializer}
    y = np.maximum(x.astype(np.float64) @ weights["w0"], 0.0) + weights["shift"]  # [B, 24], the then branch

    def batches():
        return ({"x": x[i : i + 4]} for i in range(0, 6, 4))

    one_session = calibrate(model, batches)
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    # The weights go to external data; flag and shift stay inline: ONNX Runtime (1.23) resolves external
    # data that an If reads relative to the working directory, not the model's folder.
    onnx.save(model, str(source), save_as_external_data=True, location="weights.bin", size_threshold=128)
    segmented = calibrate(
        io.load_model(source, lazy=True), batches, CalibrateConfig(segment_bytes=1600), base_dir=source.parent
    )
    for statistics in (one_session, segmented):
        assert set(statistics.activations) == {"x", "y"}
        np.testing.assert_allclose(statistics.activations["y"].gram, y.T @ y, rtol=1e-5)
        assert statistics.activations["y"].rows == 6


def test_lazy_inspect_and_calibrate_read_from_disk(tmp_path: Path, rng: np.random.Generator) -> None:
    source = _save_external(_two_layer(rng), tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, 48)).astype(np.float32))
    stats = tmp_path / "stats.npz"
    assert main(["inspect", str(source), "--json"]) == 0
    assert main(["calibrate", str(source), "--data", str(data), "-o", str(stats)]) == 0
    output = tmp_path / "w.onnx"
    argv = ["rewrite", str(source), "-o", str(output), "--rank", "8", "--method", "whiten", "--stats", str(stats)]
    assert main(argv) == 0
    assert (tmp_path / "w.onnx.data").exists()  # the input kept its weights outside: so does the output
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, rng: np.random.Generator, location: str) -> None:
    folder = tmp_path / "model"
    source = _save_external(_two_layer(rng), folder)
    model = onnx.load(str(source), load_external_data=False)
    (tmp_path / "outside.bin").write_bytes((folder / "weights.bin").read_bytes())
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(source))
    with pytest.raises(ModelError, match="outside the model's folder"):
        io.load_model(source)


def test_missing_and_short_external_files_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    source = _save_external(_two_layer(rng), tmp_path)
    data = tmp_path / "weights.bin"
    payload = data.read_bytes()
    data.write_bytes(payload[: len(payload) - 16])
    with pytest.raises(ModelError, match="shorter"):
        io.load_model(source, lazy=True)
    data.unlink()
    with pytest.raises(ModelError, match="missing"):
        io.load_model(source)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_svd_is_within_one_percent_of_exact(backend: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weight = _decaying(rng, 400, 300, decay=40.0)
    for rank in (10, 40, 60):
        exact = factorize(weight, [rank], storage_dtype=np.float64)
        options = SvdOptions(solver="randomized", backend=backend)
        randomized = truncate(decompose(weight, rank=rank, options=options), [rank], np.float64)
        exact_error = np.linalg.norm(weight - exact.product())
        randomized_error = np.linalg.norm(weight - randomized.product())
        assert randomized_error <= 1.01 * exact_error, (rank, randomized_error, exact_error)
        assert abs(randomized.kept_energy - exact.kept_energy) <= 0.01 * exact.kept_energy


def test_auto_solver_picks_randomized_only_well_below_full_rank() -> None:
    options = SvdOptions(solver="auto", backend="numpy")
    assert options.use_randomized(64, 1024, 1024)
    assert not options.use_randomized(400, 1024, 1024)
    assert not options.use_randomized(None, 1024, 1024)  # energy policies need the whole spectrum
    assert not options.use_randomized(8, 64, 64)  # small layers: exact is cheap


def test_parallel_jobs_give_the_same_model(rng: np.random.Generator) -> None:
    model = _two_layer(rng)
    one = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 8), jobs=1)).model
    two = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 8), jobs=2)).model
    assert one.SerializeToString() == two.SerializeToString()
