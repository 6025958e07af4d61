"""The model fingerprint: values and attributes decide, storage does not (issue 11)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import RankPolicy, io
from onnxsvd.calibrate import calibrate, calibrate_file
from onnxsvd.cli import main
from onnxsvd.config import RewriteConfig
from onnxsvd.errors import ModelError, StatsError
from onnxsvd.pipeline import rewrite
from tests.models import IR_VERSION, OPSET, make_model

K, N = 24, 16


#: The tiny test layers sit under the default floor (--min-rank = --align 8): lower it.
WHITEN = RewriteConfig(policy=RankPolicy("ratio", 0.5, min_rank=1), method="whiten")


def _model(rng: np.random.Generator, sparse: bool = True) -> onnx.ModelProto:
    """x [B, K] → MatMul w → Gemm (alpha, transB) → (+ s) → LeakyRelu → If (a Constant in each branch) → y.

    Every kind of thing the fingerprint covers is here: initializers, a sparse initializer ``s`` (a dense
    one with ``sparse=False``: the checker's shape inference and onnx-ir do not take sparse inputs to Add),
    node attributes, a Constant value and a subgraph."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        constant = helper.make_node(
            "Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.full(N, value, np.float32), f"{name}_v")
        )
        add = helper.make_node("Add", ["h", f"{name}_c"], [f"{name}_out"])
        return helper.make_graph(
            [constant, add], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["B", N])]
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Gemm", ["m", "g"], ["gm"], name="gemm", alpha=0.5, transB=1),
        helper.make_node("Add", ["gm", "s"], ["gs"]),
        helper.make_node("LeakyRelu", ["gs"], ["h"], alpha=0.1),
        helper.make_node("ReduceSum", ["h"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "g"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    shift = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s"),
        numpy_helper.from_array(np.array([3, 7], np.int64), "s_indices"),
        [N],
    )
    if not sparse:
        dense = np.zeros(N, np.float32)
        dense[[3, 7]] = [1.0, 2.0]
        initializers.append(numpy_helper.from_array(dense, "s"))
    graph = helper.make_graph(
        nodes,
        "fingerprinted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        initializer=initializers,
        sparse_initializer=[shift] if sparse else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=not sparse)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(tensor for tensor in model.graph.initializer if tensor.name == name)


def _node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.op_type == op_type)


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(attribute for attribute in node.attribute if attribute.name == name)


def _one_weight_changed(model: onnx.ModelProto) -> None:
    tensor = _initializer(model, "w")
    values = numpy_helper.to_array(tensor).copy()
    values[3, 5] += 1e-3  # another checkpoint: same graph, same names, dtypes and shapes
    tensor.CopyFrom(numpy_helper.from_array(values, "w"))


def _gemm_alpha(model: onnx.ModelProto) -> None:
    _attribute(_node(model, "Gemm"), "alpha").f = 0.25


def _leaky_slope(model: onnx.ModelProto) -> None:
    _attribute(_node(model, "LeakyRelu"), "alpha").f = 0.2


def _constant_in_subgraph(model: onnx.ModelProto) -> None:
    branch = _attribute(_node(model, "If"), "then_branch").g
    value = _attribute(branch.node[0], "value").t
    value.CopyFrom(numpy_helper.from_array(np.full(N, 2.0, np.float32), value.name))


def _sparse_value(model: onnx.ModelProto) -> None:
    values = model.graph.sparse_initializer[0].values
    values.CopyFrom(numpy_helper.from_array(np.array([1.0, 2.5], np.float32), values.name))


def _sparse_position(model: onnx.ModelProto) -> None:
    indices = model.graph.sparse_initializer[0].indices
    indices.CopyFrom(numpy_helper.from_array(np.array([3, 8], np.int64), indices.name))


CHANGES: dict[str, Callable[[onnx.ModelProto], None]] = {
    "one-weight-value": _one_weight_changed,
    "gemm-alpha": _gemm_alpha,
    "leaky-relu-alpha": _leaky_slope,
    "constant-in-subgraph": _constant_in_subgraph,
    "sparse-value": _sparse_value,
    "sparse-position": _sparse_position,
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_values_and_attributes_change_the_fingerprint(change: str, rng: np.random.Generator) -> None:
    model = _model(rng)
    other = _copy(model)
    CHANGES[change](other)
    assert io.fingerprint(other) != io.fingerprint(model)


def test_names_order_and_storage_do_not_change_it(rng: np.random.Generator) -> None:
    """Node names, initializer order and raw vs typed fields do not change what the model computes."""
    model = _model(rng)
    other = _copy(model)
    _node(other, "MatMul").name = "renamed"
    first, second = other.graph.initializer[0], other.graph.initializer[1]
    swapped = [onnx.TensorProto(), onnx.TensorProto()]
    swapped[0].CopyFrom(second)
    swapped[1].CopyFrom(first)
    other.graph.initializer[0].CopyFrom(swapped[0])
    other.graph.initializer[1].CopyFrom(swapped[1])
    typed = _initializer(other, "g")
    values = numpy_helper.to_array(typed)
    typed.ClearField("raw_data")
    typed.float_data.extend(values.ravel().tolist())  # the same values in float_data instead of raw_data
    assert io.fingerprint(other) == io.fingerprint(model)


def test_rewrite_refuses_statistics_of_another_checkpoint(rng: np.random.Generator) -> None:
    model = _model(rng, sparse=False)
    checkpoint = _copy(model)
    _one_weight_changed(checkpoint)
    batches = lambda: iter([{"x": rng.standard_normal((8, K)).astype(np.float32)}])  # noqa: E731
    statistics = calibrate(checkpoint, batches)
    with pytest.raises(StatsError, match="another model") as raised:
        rewrite(model, WHITEN, statistics)
    assert statistics.fingerprint in str(raised.value) and io.fingerprint(model) in str(raised.value)
    assert rewrite(checkpoint, WHITEN, statistics).report.factorized


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Save a copy with every tensor in ``<path>.data`` (onnx.save converts the model it is given)."""
    model = _copy(model)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)
    return path


def test_external_data_is_streamed_and_hashes_as_inline(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same model saved inline and with external data has one fingerprint: values decide, not
    storage. The lazy model's weights are hashed from disk, in chunks, and need the model's folder."""
    model = _model(rng)
    inline = io.fingerprint(model)
    path = _save_external(model, tmp_path / "external.onnx")
    lazy = io.load_model(path, lazy=True)
    assert io.is_lazy(lazy)
    assert io.fingerprint(lazy, tmp_path) == inline
    assert io.fingerprint(io.load_model(path, lazy=False)) == inline
    monkeypatch.setattr(io, "FINGERPRINT_CHUNK", 7)  # chunks that split every weight, at odd offsets
    assert io.fingerprint(lazy, tmp_path) == inline
    with pytest.raises(ModelError, match="base_dir"):
        io.fingerprint(lazy)


def test_external_data_that_leaves_the_folder_is_not_read(tmp_path: Path, rng: np.random.Generator) -> None:
    path = _save_external(_model(rng), tmp_path / "external.onnx")
    lazy = io.load_model(path, lazy=True)
    tensor = next(io.external_tensors(lazy))
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    with pytest.raises(ModelError, match="outside the model's folder"):
        io.fingerprint(lazy, tmp_path)


def test_statistics_of_the_external_copy_serve_the_inline_copy(tmp_path: Path, rng: np.random.Generator) -> None:
    """On the command line: calibrate the external-data file, rewrite the inline file with those statistics;
    a changed weight is refused in one line."""
    model = _model(rng, sparse=False)
    inline_path = tmp_path / "inline.onnx"
    onnx.save(model, inline_path)
    external_path = _save_external(model, tmp_path / "external.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, K)).astype(np.float32))
    stats = tmp_path / "stats.npz"
    calibrate_file(external_path, data, stats)
    out = tmp_path / "small.onnx"
    command = ["rewrite", str(inline_path), "-o", str(out), "--method", "whiten", "--min-rank", "1"]
    command += ["--stats", str(stats)]
    assert main(command) == 0
    checkpoint = _copy(model)
    _one_weight_changed(checkpoint)
    checkpoint_path = tmp_path / "checkpoint.onnx"
    onnx.save(checkpoint, checkpoint_path)
    argv = ["rewrite", str(checkpoint_path), "-o", str(tmp_path / "other.onnx"), "--method", "whiten",
            "--stats", str(stats)]
    assert main(argv) == 1
    assert not (tmp_path / "other.onnx").exists()


def test_typed_sub_byte_weights_are_written_packed(tmp_path: Path) -> None:
    """An int4 weight held in int32_data goes to external data packed two values a byte, as raw_data
    holds it (it was written one byte a value, which no reader can load), and reads back the same."""
    values = (np.arange(4096) % 16 - 8).astype(np.int8)
    tensor = helper.make_tensor("q", TensorProto.INT4, [4096], values.tolist())
    assert not tensor.HasField("raw_data") and len(tensor.int32_data) == 2048
    model = make_model(
        [helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)],
        [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])], [tensor], opset=21, ir_version=10,
    )
    path = io.save_model(model, tmp_path / "int4.onnx", external_data=True)
    assert (tmp_path / "int4.onnx.data").stat().st_size == 2048
    loaded = io.load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]).astype(np.int8), values)
    assert io.fingerprint(loaded) == io.fingerprint(model)
