"""Weight-only int8 as some quantizers write it: ``int8 → Cast → Mul(scale)`` (or ``Div``) before the MatMul.

The chain is followed: the site's weight is what the model multiplies by, its bytes are the int8 payload
plus the scale. By default its factors are stored back as int8 (``tests/test_subgraph_sites.py`` tests that);
these tests ask for float factors (``--dtype fp32``/``fp16``), which an explicit dtype gives.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, rewrite
from onnxsvd.graph import GraphIndex, find_sites, load_weight
from tests.conftest import FULL_RANK
from tests.models import assert_valid, make_model, relative_error, run

#: Per-tensor and per-channel scales, by the shape of the scale constant (K = 64, N = 48).
SCALES = {"tensor": (), "tensor_1x1": (1, 1), "channel_n": (48,), "channel_1n": (1, 48), "channel_k1": (64, 1)}


def int8_case(
    rng: np.random.Generator, scale_shape: tuple[int, ...], op: str = "Mul", scale_first: bool = False,
    k: int = 64, n: int = 48,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """``Y = X · (Cast(W_q) ∘ scale)``, ∘ = Mul or Div; returns the model, its feeds and ``W_kn`` as it
    computes it (float32)."""
    quantized = rng.integers(-127, 128, size=(k, n)).astype(np.int8)  # [K, N]
    scale = rng.uniform(0.005, 0.05, size=scale_shape).astype(np.float32)
    inputs = ["scale", "W_f"] if scale_first else ["W_f", "scale"]
    nodes = [
        helper.make_node("Cast", ["W_q"], ["W_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node(op, inputs, ["W"], name="scale_op"),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, n])],
        [numpy_helper.from_array(quantized, "W_q"), numpy_helper.from_array(scale, "scale")],
    )
    value = quantized.astype(np.float32)
    weight = value * scale if op == "Mul" else value / scale  # [K, N], in float32 as the model computes it
    return model, {"X": rng.standard_normal((4, k)).astype(np.float32)}, weight


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("op", "scale_first"), [("Mul", False), ("Mul", True), ("Div", False)])
def test_cast_then_scale_is_followed_and_full_rank_is_exact(
    scale: str, op: str, scale_first: bool, rng: np.random.Generator
) -> None:
    model, feeds, weight = int8_case(rng, SCALES[scale], op, scale_first)
    match = find_sites(model)
    assert not match.skips
    (site,) = match.sites
    assert [model.graph.node[p].op_type for p in site.weight.chain] == ["Cast", op]
    assert (site.weight.tensor, site.weight.storage_dtype, site.weight.compute_dtype) == (
        "W_q", TensorProto.INT8, TensorProto.FLOAT
    )
    assert site.dense_bytes == 64 * 48 + 4 * int(np.prod(SCALES[scale], dtype=int))  # int8 payload + fp32 scale
    np.testing.assert_array_equal(load_weight(GraphIndex(model.graph), site), weight.astype(np.float64))
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, dtype="fp32"))
    assert_valid(result.model)
    (before,), (after,) = run(model, feeds), run(result.model, feeds)
    assert relative_error(after, before) < 1e-4
    assert {"W_q", "scale"}.isdisjoint(tensor.name for tensor in result.model.graph.initializer)
    assert {"Cast", op}.isdisjoint(node.op_type for node in result.model.graph.node)


def test_byte_guard_counts_the_int8_payload_and_its_scale(rng: np.random.Generator) -> None:
    model, feeds, _ = int8_case(rng, (48,))
    dense = 64 * 48 + 4 * 48
    (site,) = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.5), dtype="fp32")).report.sites
    # ratio 0.5 → ⌊0.5·3072/112⌋ = 13, aligned to 8: 8·112·4 = 3,584 B of fp32 factors against 3,264 B.
    assert site.action == "kept"
    assert f"factor chain 3,584 B ≥ dense {dense:,} B (int8 weight, fp32 factors)" in site.reason
    small = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 4, align=1), dtype="fp32"))
    (site,) = small.report.sites
    assert site.action == "factorized" and site.dense_bytes == dense and site.factor_bytes == 4 * 112 * 4
    assert small.report.bytes_before == dense and small.report.bytes_after == 4 * 112 * 4
    half = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 8, align=1), dtype="fp16"))
    (site,) = half.report.sites
    assert site.action == "factorized" and site.factor_bytes == 8 * 112 * 2 < dense
    assert_valid(half.model)


def test_uses_through_their_own_cast_and_mul_share_one_factorization(rng: np.random.Generator) -> None:
    # One int8 weight and one scale, dequantized separately for two MatMuls (as per-layer exporters do).
    k, n = 32, 24
    quantized = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.005, 0.05, size=(n,)).astype(np.float32)
    nodes = []
    for use in ("1", "2"):
        nodes += [
            helper.make_node("Cast", ["W_q"], [f"W_f{use}"], name=f"cast{use}", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"W_f{use}", "scale"], [f"W{use}"], name=f"mul{use}"),
            helper.make_node("MatMul", [f"X{use}", f"W{use}"], [f"Y{use}"], name=f"mm{use}"),
        ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info(f"X{u}", TensorProto.FLOAT, [3, k]) for u in "12"],
        [helper.make_tensor_value_info(f"Y{u}", TensorProto.FLOAT, [3, n]) for u in "12"],
        [numpy_helper.from_array(quantized, "W_q"), numpy_helper.from_array(scale, "scale")],
    )
    first, second = find_sites(model).sites
    assert first.group == second.group
    result = rewrite(model, RewriteConfig(policy=FULL_RANK, dtype="fp32"))
    assert [site.shared_with for site in result.report.sites] == [["mm2"], ["mm1"]]
    assert len(result.model.graph.initializer) == 2
    feeds = {f"X{u}": rng.standard_normal((3, k)).astype(np.float32) for u in "12"}
    for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert relative_error(actual, expected) < 1e-4


def test_a_scale_that_broadcasts_the_weight_larger_is_not_a_weight_chain(rng: np.random.Generator) -> None:
    # Cast(W_q [K, 1]) · scale [1, N] is a [K, N] outer product, not a scaled weight: not followed.
    nodes = [
        helper.make_node("Cast", ["W_q"], ["W_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["W_f", "scale"], ["W"], name="outer"),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 8])],
        [
            numpy_helper.from_array(rng.integers(-5, 5, size=(16, 1)).astype(np.int8), "W_q"),
            numpy_helper.from_array(rng.uniform(size=(1, 8)).astype(np.float32), "scale"),
        ],
    )
    match = find_sites(model)
    assert not match.sites
    assert [skip.name for skip in match.skips if skip.kind == "matmul"] == ["mm"]
