"""Fine-tuning the correction of a quantized rewrite (issue 12, point 5): only the low-rank branches train,
the quantized base stays byte for byte, and the graph keeps its structure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig  # noqa: E402
from onnxsvd.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxsvd.finetune.sites import find_factor_pairs  # noqa: E402
from onnxsvd.finetune.torch_graph import TorchGraph  # noqa: E402
from onnxsvd.graph.records import read_record  # noqa: E402
from onnxsvd.pipeline import rewrite  # noqa: E402
from tests.models import assert_valid, relative_error, run  # noqa: E402
from tests.test_calibrate import _correlated, _mlp  # noqa: E402


def quantized_rewrite(model: onnx.ModelProto, rank: int = 4, **options) -> onnx.ModelProto:
    config = RewriteConfig(policy=RankPolicy("rank", rank, align=1), quantize=QuantizeConfig(**options))
    return rewrite(model, config).model


def torch_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    graph = TorchGraph(model)
    with torch.no_grad():
        values = graph({name: torch.from_numpy(value) for name, value in feeds.items()})
    return [values[name].numpy() for name in graph.output_names]


def quantized_tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    """The packed weights, scales and zero points of every MatMulNBits, as serialized."""
    names = {name for node in model.graph.node if node.op_type == "MatMulNBits" for name in node.input[1:]}
    return {t.name: t.SerializeToString() for t in model.graph.initializer if t.name in names}


@pytest.mark.parametrize("symmetric", [True, False])
def test_torch_runs_matmul_nbits_with_the_weight_ort_uses(rng: np.random.Generator, symmetric: bool) -> None:
    model = _mlp(rng, (64, 48, 32))
    rewritten = quantized_rewrite(model, symmetric=symmetric)
    feeds = {"x": _correlated(rng, 3, 5, 64)}
    (expected,) = run(rewritten, feeds)
    (actual,) = torch_outputs(rewritten, feeds)
    assert relative_error(actual, expected) < 1e-5


def test_torch_runs_int8_factors_through_dequantize_linear(rng: np.random.Generator) -> None:
    rewritten = quantized_rewrite(_mlp(rng, (64, 48, 32)), factor_dtype="int8")
    assert "DequantizeLinear" in [node.op_type for node in rewritten.graph.node]
    feeds = {"x": _correlated(rng, 3, 5, 64)}
    assert relative_error(torch_outputs(rewritten, feeds)[0], run(rewritten, feeds)[0]) < 1e-5
    pairs, skips = find_factor_pairs(rewritten)
    assert not pairs and len(skips) == 2
    assert all("stored as int8" in skip.reason and "--factor-dtype" in skip.reason for skip in skips)


def test_the_correction_branches_are_recorded(rng: np.random.Generator) -> None:
    rewritten = quantized_rewrite(_mlp(rng, (64, 48, 32)))
    roles = {}
    for node in rewritten.graph.node:
        record = read_record(node)
        if record is not None:
            roles.setdefault(record.site, []).append((node.op_type, record.role))
    assert roles == {site: [("MatMulNBits", "base"), ("MatMul", "first"), ("MatMul", "second"), ("Add", "sum")]
                     for site in ("fc0", "fc1")}
    pairs, skips = find_factor_pairs(rewritten)
    assert not skips and [pair.sites for pair in pairs] == [("fc0",), ("fc1",)]
    assert all(pair.corrects and pair.rank == 4 for pair in pairs)


def test_finetune_trains_only_the_correction(rng: np.random.Generator) -> None:
    model = _mlp(rng, (64, 64, 32))
    rewritten = quantized_rewrite(model, rank=4)
    samples = _correlated(rng, 128, 4, 64)  # one distribution: 96 to fine-tune on, 32 never seen
    data = {"x": samples[:96]}
    config = FinetuneConfig(steps=80, lr=1e-2, batch_size=16, eval_every=10, patience=20, val_split=0.25)
    result = finetune(rewritten, model, data, config)
    report = result.report
    assert report.pairs == 2 and report.sites == ["fc0", "fc1"] and not report.skipped
    assert report.matched_activations == ["m0", "m1"]  # the sites' own outputs, base and branch summed
    assert report.best_step > 0 and report.heldout_after < 0.9 * report.heldout_before
    tuned = result.model
    onnx.checker.check_model(tuned, full_check=True)
    assert_valid(tuned)
    # Same graph: same nodes in the same order, same initializer names, shapes and dtypes.
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in tuned.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in rewritten.graph.node
    ]
    shapes = {t.name: (t.data_type, list(t.dims)) for t in rewritten.graph.initializer}
    assert {t.name: (t.data_type, list(t.dims)) for t in tuned.graph.initializer} == shapes
    # The quantized base is byte-identical; only the factors changed.
    assert quantized_tensors(tuned) == quantized_tensors(rewritten) and quantized_tensors(tuned)
    before = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    changed = sorted(t.name for t in tuned.graph.initializer
                     if not np.array_equal(numpy_helper.to_array(t), before[t.name]))
    pairs, _ = find_factor_pairs(rewritten)
    assert changed == sorted(name for pair in pairs for name in (pair.a_tensor, pair.b_tensor))
    # Held-out data through ONNX Runtime: the fine-tuned correction is closer to the original.
    held = {"x": samples[96:]}
    (want,) = run(model, held)
    assert relative_error(run(tuned, held)[0], want) < relative_error(run(rewritten, held)[0], want)


def test_a_matmul_nbits_whose_weight_is_not_an_initializer_is_refused(rng: np.random.Generator) -> None:
    rewritten = quantized_rewrite(_mlp(rng, (64, 48, 32)))
    node = next(n for n in rewritten.graph.node if n.op_type == "MatMulNBits")
    packed = next(t for t in rewritten.graph.initializer if t.name == node.input[1])
    rewritten.graph.initializer.remove(packed)
    rewritten.graph.input.append(helper.make_tensor_value_info(packed.name, TensorProto.UINT8, list(packed.dims)))
    from onnxsvd.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="MatMulNBits.*must be initializers"):
        TorchGraph(rewritten)
