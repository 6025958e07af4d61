"""Deployment: fp16 factors end to end, and factor chains that survive a graph optimizer (onnxslim)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, RewriteConfig, io, rewrite
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.graph import find_sites
from tests.conftest import MODELS
from tests.models import assert_valid, make_model, relative_error, run


def wide_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """``x [batch, 128] → MatMul [128, 256] → Relu → Gemm(W [192, 256], transB=1) + b`` (weights dominate)."""
    w1 = (rng.standard_normal((128, 256)) / 12).astype(np.float32)
    w2 = (rng.standard_normal((192, 256)) / 16).astype(np.float32)
    b2 = rng.standard_normal(192).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 192])],
        [numpy_helper.from_array(w, name) for w, name in ((w1, "w1"), (w2, "w2"), (b2, "b2"))],
    )


def test_fp16_factors_end_to_end(tmp_path: Path, rng: np.random.Generator) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(wide_mlp(rng), source)
    sizes, outputs = {}, {}
    feeds = {"x": rng.standard_normal((8, 128)).astype(np.float32)}
    for dtype in ("fp32", "fp16"):
        path = tmp_path / f"small_{dtype}.onnx"
        report = rewrite_file(RewriteJob(source, path, RewriteConfig(policy=RankPolicy("ratio", 0.5), dtype=dtype)))
        assert len(report.factorized) == 2
        model = onnx.load(str(path))
        assert_valid(model)
        factors = [t for t in model.graph.initializer if ".svd" in t.name]
        assert len(factors) == 4
        expected = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
        assert {t.data_type for t in factors} == {expected}
        casts = [node for node in model.graph.node if node.op_type == "Cast"]
        assert len(casts) == (4 if dtype == "fp16" else 0)
        assert all(helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT for node in casts)
        sizes[dtype] = io.file_size(path)
        outputs[dtype] = run(model, feeds)[0]
        assert outputs[dtype].dtype == np.float32  # the model still computes (and answers) in fp32
    # Factors are nearly all of the file: fp16 roughly halves it.
    assert 0.45 < sizes["fp16"] / sizes["fp32"] < 0.6
    # fp16 rounding of the factors only (Σ split across both keeps them in range).
    assert relative_error(outputs["fp16"], outputs["fp32"]) < 5e-3


def _factor_params(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], bytes]]:
    """Every factor initializer: name → (shape, bytes of its values as float32)."""
    return {
        tensor.name: (tuple(tensor.dims), numpy_helper.to_array(tensor).astype(np.float32).tobytes())
        for tensor in model.graph.initializer
        if ".svd" in tensor.name
    }


@pytest.mark.parametrize("name", ["digits_mlp.onnx", "digits_vit.onnx"])
def test_onnxslim_keeps_the_factor_chains(name: str, rng: np.random.Generator) -> None:
    onnxslim = pytest.importorskip("onnxslim")
    original = onnx.load(str(MODELS / name))
    result = rewrite(original, RewriteConfig(policy=RankPolicy("ratio", 0.5)))
    rewritten = result.model
    slimmed = onnxslim.slim(onnx.ModelProto.FromString(rewritten.SerializeToString()))
    onnx.checker.check_model(slimmed, full_check=True)

    # The factor initializers are all there, unchanged, and nothing of a dense [K, N] shape came back.
    assert _factor_params(slimmed) == _factor_params(rewritten)
    chains = find_sites(rewritten).sites
    kept = find_sites(slimmed).sites
    assert Counter(site.shape for site in kept) == Counter(site.shape for site in chains)
    dense_shapes = {site.shape for site in find_sites(original).sites} - {site.shape for site in chains}
    assert not dense_shapes & {site.shape for site in kept}
    # Two MatMul/Gemm nodes per factorized site, and the same parameters in the factors.
    factorized = len(result.report.factorized)
    left_dense = len(find_sites(original).sites) - factorized
    assert factorized > 0 and len(kept) == len(chains) == 2 * factorized + left_dense
    factor_params = sum(int(np.prod(shape)) for shape, _ in _factor_params(slimmed).values())
    assert factor_params == sum(int(np.prod(shape)) for shape, _ in _factor_params(rewritten).values())

    # And it computes the same thing.
    (value,) = [v for v in rewritten.graph.input if v.name not in {t.name for t in rewritten.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else 5 for d in value.type.tensor_type.shape.dim]
    feeds = {value.name: rng.standard_normal(dims).astype(np.float32)}
    for a, b in zip(run(rewritten, feeds), run(slimmed, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
