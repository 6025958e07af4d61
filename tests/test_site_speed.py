"""``--keep-dense-if-slower``: activation shapes, the two standalone forms of a site, the decision, the CLI.

The decision is tested with injected timings (tests never assert on wall time); one end-to-end run
times real sessions and checks only that the numbers are there and consistent with the action.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.cli import main
from onnxsvd.errors import ProviderError, UsageError
from onnxsvd.factorize import decompose, truncate
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.graph import GraphIndex, find_sites, load_weight
from onnxsvd.pipeline import speed as site_speed
from onnxsvd.pipeline.speed import (
    SiteSpeedCheck,
    SiteTiming,
    SpeedCheckConfig,
    activation_shapes,
    parse_shape,
    site_models,
)
from tests.conftest import MODELS
from tests.models import assert_valid, gemm_case, make_model, matmul_case, run

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
MLP = MODELS / "digits_mlp.onnx"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def two_layer_model(rng: np.random.Generator, k: int = 32, hidden: int = 48, n: int = 24) -> onnx.ModelProto:
    """``x [batch, seq, K] → MatMul W1 → Relu → MatMul W2 + b`` with symbolic batch and sequence."""
    w1 = rng.standard_normal((k, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, n)).astype(np.float32)
    b2 = rng.standard_normal(n).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "w2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="bias"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        [numpy_helper.from_array(w, name) for w, name in ((w1, "w1"), (w2, "w2"), (b2, "b2"))],
    )


# ---------------------------------------------------------------- parsing and configuration


def test_parse_shape() -> None:
    assert parse_shape("input_ids=32,64") == ("input_ids", (32, 64))
    assert parse_shape(" x = 4 ") == ("x", (4,))
    for bad in ("x", "x=", "=3", "x=a,b", "x=0,3", "x=-1"):
        with pytest.raises(UsageError, match="--shape takes NAME=d0,d1"):
            parse_shape(bad)


def test_config_validation() -> None:
    with pytest.raises(UsageError, match="unknown provider 'tpu'"):
        SpeedCheckConfig(providers=("tpu",))
    with pytest.raises(UsageError, match="at least 1 timed run"):
        SpeedCheckConfig(iters=0)
    with pytest.raises(UsageError, match="positive integer"):
        SpeedCheckConfig(input_shapes={"x": (0, 3)})


def test_check_needs_shapes_or_a_batch() -> None:
    with pytest.raises(UsageError, match="pass --data DATA .* or --shape NAME=d0,d1"):
        SiteSpeedCheck(SpeedCheckConfig())


# ---------------------------------------------------------------- activation shapes


def test_activation_shapes_from_declared_shapes_and_from_a_batch(rng: np.random.Generator) -> None:
    model = two_layer_model(rng)
    sites = find_sites(model).sites
    declared = activation_shapes(model, sites, input_shapes={"x": (2, 5, 32)})
    assert declared == {"x": (2, 5, 32), "a": (2, 5, 48)}
    batch = {"x": np.zeros((3, 7, 32), np.float32)}
    assert activation_shapes(model, sites, batch=batch) == {"x": (3, 7, 32), "a": (3, 7, 48)}


def test_activation_shapes_fall_back_to_an_onnxruntime_run(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_layer_model(rng)
    sites = find_sites(model).sites

    def fail(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise onnx.shape_inference.InferenceError("cannot infer")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    assert activation_shapes(model, sites, input_shapes={"x": (2, 5, 32)}) == {"x": (2, 5, 32), "a": (2, 5, 48)}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"y": (2, 5, 32)}, "the model has no input of that name"),
        ({"x": (2, 32)}, "has rank 2 but the model's input is"),
        ({"x": (2, 5, 31)}, "differs from the model's fixed input shape"),
    ],
)
def test_declared_shapes_that_do_not_fit(rng: np.random.Generator, shapes: dict, message: str) -> None:
    model = two_layer_model(rng)
    with pytest.raises(UsageError, match=message):
        activation_shapes(model, find_sites(model).sites, input_shapes=shapes)


# ---------------------------------------------------------------- the two standalone forms


CASES = {
    "matmul_right": lambda rng: matmul_case(rng, 12, 10, lead=(2, 3)),
    "matmul_left": lambda rng: matmul_case(rng, 12, 10, lead=(2, 3), side="left"),
    "matmul_transposed_source": lambda rng: matmul_case(rng, 12, 10, lead=(4,), source="transpose"),
    "gemm_transb_bias": lambda rng: gemm_case(rng, 5, 12, 10, trans_b=1, alpha=0.5, beta=2.0, bias="n"),
    "gemm_transa": lambda rng: gemm_case(rng, 5, 12, 10, trans_a=1, bias="mn"),
    "gemm_weight_as_a": lambda rng: gemm_case(rng, 10, 12, 5, weight_as="A", trans_a=1, bias="1n"),
}


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("layout", ["fused", "stages"])
def test_site_models_compute_the_site(rng: np.random.Generator, case_name: str, layout: str) -> None:
    case = CASES[case_name](rng)
    (site,) = find_sites(case.model).sites
    index = GraphIndex(case.model.graph)
    weight = load_weight(index, site)  # [K, N]
    node = case.model.graph.node[site.node_index]
    bias = site_speed._bias_value(index, site, None)
    rank = min(site.k, site.n)
    factorization = truncate(decompose(weight), [rank - 2, 2], np.dtype(np.float32))  # full rank, two stages
    shape = next(iter(case.feeds.values())).shape
    dense, factorized = site_models(site, node, weight, bias, shape, factorization, TensorProto.FLOAT, layout)
    for model in (dense, factorized):
        assert_valid(model)
    expected = run(case.model, case.feeds)[0]
    feeds = {"x": next(iter(case.feeds.values()))}
    np.testing.assert_allclose(run(dense, feeds)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(factorized, feeds)[0], expected, rtol=1e-4, atol=1e-4)
    chain = find_sites(factorized).sites
    assert len(chain) == (2 if layout == "fused" else 4)
    assert all(node.op_type == site.op_type for node in factorized.graph.node if node.op_type in ("MatMul", "Gemm"))


def test_site_models_with_fp16_storage_keep_the_cast(rng: np.random.Generator) -> None:
    case = matmul_case(rng, 16, 12, lead=(3,))
    (site,) = find_sites(case.model).sites
    weight = load_weight(GraphIndex(case.model.graph), site)
    factorization = truncate(decompose(weight), [8], np.dtype(np.float16))
    _, factorized = site_models(
        site, case.model.graph.node[0], weight, None, (3, 16), factorization, TensorProto.FLOAT16
    )
    assert [node.op_type for node in factorized.graph.node].count("Cast") == 2
    assert {t.data_type for t in factorized.graph.initializer} == {TensorProto.FLOAT16}


# ---------------------------------------------------------------- the decision (injected timings)


def fake_timings(monkeypatch: pytest.MonkeyPatch, by_k: dict[int, tuple[float, float]]) -> list[tuple[int, ...]]:
    """Replace real timing by (dense ms, factorized ms) chosen by the activation's last dimension (K)."""
    calls: list[tuple[int, ...]] = []

    def time_site(dense_path, factorized_path, activation, provider, config):  # noqa: ANN001, ANN202
        assert onnx.load(str(dense_path)).graph.node[0].op_type in ("MatMul", "Gemm")
        calls.append(tuple(activation.shape))
        dense_ms, factorized_ms = by_k[activation.shape[-1]]
        return SiteTiming(provider, dense_ms, factorized_ms, tuple(activation.shape), config.iters)

    monkeypatch.setattr(site_speed, "time_site", time_site)
    return calls


def test_slower_chains_stay_dense_with_the_reason(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    model = two_layer_model(rng)
    calls = fake_timings(monkeypatch, {32: (0.32, 0.42), 48: (0.50, 0.25)})
    config = RewriteConfig(policy=RankPolicy("rank", 8, align=1))
    check = SiteSpeedCheck(SpeedCheckConfig(input_shapes={"x": (4, 6, 32)}))
    result = rewrite(model, config, speed_check=check)
    sites = {site.name: site for site in result.report.sites}
    assert calls == [(4, 6, 32), (4, 6, 48)]
    slow, fast = sites["fc1"], sites["fc2"]
    assert slow.action == "kept" and slow.rank == 0 and slow.params_after == slow.params_before
    assert slow.reason == "factorized chain 1.31× slower than dense on cpu (0.42 ms vs 0.32 ms)"
    assert (slow.dense_ms, slow.factorized_ms, slow.speed_provider) == (0.32, 0.42, "cpu")
    assert fast.action == "factorized" and fast.rank == 8
    assert fast.speedup == pytest.approx(2.0) and (fast.dense_ms, fast.factorized_ms) == (0.50, 0.25)
    assert fast.reason.endswith("chain 2.00× faster than dense on cpu (0.25 ms vs 0.5 ms)")
    # The kept layer is the original MatMul reading its own weight; the other is a chain.
    nodes = {node.name: node for node in result.model.graph.node}
    assert list(nodes["fc1"].input) == ["x", "w1"] and "fc2" not in nodes
    assert_valid(result.model)
    feeds = {"x": rng.standard_normal((4, 6, 32)).astype(np.float32)}
    original = run(model, feeds)[0]
    assert np.isfinite(run(result.model, feeds)[0]).all() and original.shape == (4, 6, 24)
    data = result.report.to_dict()["sites"]
    assert {"dense_ms", "factorized_ms", "speedup", "speed_provider"} <= set(data[0])


def test_equal_time_is_not_faster_and_identical_sites_are_timed_once(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two layers with the same shapes, attributes and rank: one timing serves both.
    weight_a, weight_b = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "wa"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "wb"], ["y"], name="second"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weight_a, "wa"), numpy_helper.from_array(weight_b, "wb")],
    )
    calls = fake_timings(monkeypatch, {16: (0.2, 0.2)})
    check = SiteSpeedCheck(SpeedCheckConfig(input_shapes={"x": (8, 16)}))
    result = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 4, align=1)), speed_check=check)
    assert len(calls) == 1
    assert [site.action for site in result.report.sites] == ["kept", "kept"]
    assert result.report.sites[0].reason.startswith("factorized chain 1.00× slower than dense on cpu")


def test_min_speedup_and_sequential_rewrite(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_layer_model(rng)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, 6, 32)).astype(np.float32))
    calls = fake_timings(monkeypatch, {32: (0.30, 0.25), 48: (0.50, 0.25)})
    report = rewrite_file(RewriteJob(
        path, tmp_path / "small.onnx", RewriteConfig(policy=RankPolicy("rank", 8, align=1), method="whiten"),
        data=data, sequential=True, speed_check=SpeedCheckConfig(min_speedup=1.5),
    ))
    # Shapes from the first calibration batch (32 samples per batch by default: all 16 here).
    assert sorted(calls) == [(16, 6, 32), (16, 6, 48)]
    sites = {site.name: site for site in report.sites}
    assert sites["fc1"].action == "kept" and "under the required 1.5× on cpu" in sites["fc1"].reason
    assert sites["fc2"].action == "factorized"
    assert_valid(onnx.load(str(tmp_path / "small.onnx")))


def test_real_timing_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code, out, err = cli(
        capsys, "rewrite", MLP, "-o", tmp_path / "small.onnx", "--ratio", "0.5", "--keep-dense-if-slower",
        "--shape", "input=16,64", "--speed-iters", "5", "--threads", "1", "--report", report, "--min-rank", "1",
    )
    assert code == 0, err
    for site in json.loads(report.read_text())["sites"]:
        assert site["dense_ms"] > 0 and site["factorized_ms"] > 0 and site["speed_provider"] == "cpu"
        assert site["speedup"] == pytest.approx(site["dense_ms"] / site["factorized_ms"])
        assert (site["action"] == "factorized") == (site["speedup"] > 1.0)
        assert "than dense on cpu" in site["reason"]


# ---------------------------------------------------------------- command line errors


def assert_one_line_error(err: str, out: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxsvd: error: "), err
    assert "Traceback" not in err + out


def test_keep_dense_without_data_or_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "rewrite", MLP, "-o", tmp_path / "small.onnx", "--keep-dense-if-slower")
    assert code == 2
    assert_one_line_error(err, out)
    assert "pass --data DATA" in err and "--shape NAME=d0,d1" in err
    assert not (tmp_path / "small.onnx").exists()


def test_shape_without_the_flag_and_bad_shapes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "rewrite", MLP, "-o", tmp_path / "a.onnx", "--shape", "input=4,64")
    assert code == 2 and "add that flag" in err
    code, out, err = cli(
        capsys, "rewrite", MLP, "-o", tmp_path / "a.onnx", "--keep-dense-if-slower", "--shape", "pixels=4,64"
    )
    assert code == 2
    assert_one_line_error(err, out)
    assert "--shape pixels: the model has no input of that name; its inputs are ['input']" in err


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
@pytest.mark.parametrize(
    "extra",
    [
        ["--keep-dense-if-slower", "--shape", "input=4,64"],
        ["--data", str(MODELS / "digits_calib.npz"), "--method", "whiten"],
    ],
    ids=["keep-dense", "calibration"],
)
def test_rewrite_on_cuda_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str]) -> None:
    code, out, err = cli(capsys, "rewrite", MLP, "-o", tmp_path / "small.onnx", "--providers", "cuda", *extra)
    assert code == 1
    assert_one_line_error(err, out)
    assert "CUDA requested but this onnxruntime has no CUDAExecutionProvider" in err
    assert not (tmp_path / "small.onnx").exists()
    with pytest.raises(ProviderError, match="CUDA requested"):
        SiteSpeedCheck(SpeedCheckConfig(providers=("cuda",), input_shapes={"input": (4, 64)}))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_keep_dense_on_cuda(tmp_path: Path) -> None:
    report = rewrite_file(RewriteJob(
        MLP, tmp_path / "small.onnx", RewriteConfig(), speed_check=SpeedCheckConfig(
            providers=("cuda",), input_shapes={"input": (256, 64)}, iters=5
        ),
    ))
    timed = [site for site in report.sites if site.speedup is not None]
    assert timed and all(site.speed_provider == "cuda" for site in timed)
