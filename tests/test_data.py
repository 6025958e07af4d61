"""Data readers: checks against the model's inputs before any work, batching, bounded reading."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.data import LABELS_KEY, InputData, iter_batches, load_inputs, model_inputs
from onnxsvd.errors import DataError


def tiny_model(batch: int | str = "batch") -> onnx.ModelProto:
    """``x`` float32 [batch, 4] and ``ids`` int64 [batch, 3]; ``w`` is an initializer also listed as input."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
            helper.make_node("ReduceSum", ["ids"], ["count"], name="sum", keepdims=0),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2]),
            helper.make_tensor_value_info("count", TensorProto.INT64, []),
        ],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def arrays(samples: int, start: int = 0) -> dict[str, np.ndarray]:
    x = np.arange(start * 4, (start + samples) * 4, dtype=np.float32).reshape(samples, 4)
    ids = np.arange(start * 3, (start + samples) * 3, dtype=np.int64).reshape(samples, 3)
    return {"x": x, "ids": ids}


def save(path: Path, **data: np.ndarray) -> Path:
    np.savez(path, **data)
    return path


def test_model_inputs_exclude_initializers() -> None:
    specs = model_inputs(tiny_model())
    assert [spec.name for spec in specs] == ["x", "ids"]
    assert specs[0].dtype == np.float32 and specs[0].shape == ("batch", 4)
    assert specs[0].fixed_batch is None
    assert model_inputs(tiny_model(batch=2))[0].fixed_batch == 2


def test_single_file_with_labels_and_extra_keys(tmp_path: Path) -> None:
    file = save(tmp_path / "data.npz", **arrays(10), labels=np.arange(10), notes=np.zeros(3))
    data = load_inputs(file, tiny_model())
    assert data.samples == 10 and data.files == (file,) and data.has_labels and not data.is_folder
    (batch,) = list(iter_batches(data))
    assert set(batch) == {"x", "ids"}
    (batch,) = list(iter_batches(data, with_labels=True))
    assert set(batch) == {"x", "ids", LABELS_KEY}
    np.testing.assert_array_equal(batch["x"], arrays(10)["x"])


def test_missing_input_names_the_input_and_the_keys(tmp_path: Path) -> None:
    file = save(tmp_path / "data.npz", x=arrays(3)["x"], input_ids=arrays(3)["ids"])
    with pytest.raises(DataError, match=r"input 'ids' missing from .*data\.npz; it has keys \['input_ids', 'x'\]"):
        load_inputs(file, tiny_model())


def test_unsafe_cast_is_refused(tmp_path: Path) -> None:
    data = arrays(3)
    file = save(tmp_path / "data.npz", x=data["x"].astype(np.float64), ids=data["ids"])
    with pytest.raises(DataError, match=r"'x' .* float64 but the model takes float32.*not a safe cast"):
        load_inputs(file, tiny_model())


def test_safe_cast_int32_to_int64_is_accepted(tmp_path: Path) -> None:
    data = arrays(3)
    file = save(tmp_path / "data.npz", x=data["x"], ids=data["ids"].astype(np.int32))
    (batch,) = list(iter_batches(load_inputs(file, tiny_model())))
    assert batch["ids"].dtype == np.int64
    np.testing.assert_array_equal(batch["ids"], data["ids"])


def test_wrong_rank(tmp_path: Path) -> None:
    data = arrays(3)
    file = save(tmp_path / "data.npz", x=data["x"].reshape(3, 2, 2), ids=data["ids"])
    with pytest.raises(DataError, match=r"'x' .* rank 3 \[3, 2, 2\] but the model takes rank 2 \[batch, 4\]"):
        load_inputs(file, tiny_model())


def test_wrong_fixed_dimension(tmp_path: Path) -> None:
    data = arrays(3)
    file = save(tmp_path / "data.npz", x=data["x"][:, :3], ids=data["ids"])
    with pytest.raises(DataError, match=r"'x' .* shape \[3, 3\] .*\(axis 1 must be 4\)"):
        load_inputs(file, tiny_model())


def test_axis_zero_may_differ_from_a_fixed_batch(tmp_path: Path) -> None:
    file = save(tmp_path / "data.npz", **arrays(5))
    data = load_inputs(file, tiny_model(batch=2))
    assert data.fixed_batch == 2
    assert [len(b["x"]) for b in iter_batches(data, 2, drop_last=True)] == [2, 2]


def test_inputs_with_different_sample_counts(tmp_path: Path) -> None:
    file = save(tmp_path / "data.npz", x=arrays(3)["x"], ids=arrays(4)["ids"])
    with pytest.raises(DataError, match="different sample counts on axis 0 .*x 3, ids 4"):
        load_inputs(file, tiny_model())


def test_not_an_npz(tmp_path: Path) -> None:
    file = tmp_path / "data.npz"
    file.write_text("input,labels\n1,2\n")
    with pytest.raises(DataError, match=r"data\.npz is not an \.npz archive; save one array per model input"):
        load_inputs(file, tiny_model())
    npy = tmp_path / "x.npy"
    np.save(npy, arrays(2)["x"])
    with pytest.raises(DataError, match="not an .npz archive"):
        load_inputs(npy, tiny_model())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data not found: .*nowhere\.npz; pass an \.npz file or a folder"):
        load_inputs(tmp_path / "nowhere.npz", tiny_model())


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no data here")
    with pytest.raises(DataError, match=r"folder .* holds no \.npz files; put one \.npz per batch in it"):
        load_inputs(tmp_path, tiny_model())


def test_no_samples(tmp_path: Path) -> None:
    file = save(tmp_path / "data.npz", **arrays(0))
    with pytest.raises(DataError, match="holds no samples"):
        load_inputs(file, tiny_model())


def test_folder_is_read_in_name_order_file_by_file(tmp_path: Path) -> None:
    save(tmp_path / "b.npz", **arrays(3, start=5), labels=np.arange(5, 8))
    save(tmp_path / "a.npz", **arrays(5, start=0), labels=np.arange(0, 5))
    save(tmp_path / "c.npz", **arrays(4, start=8), labels=np.arange(8, 12))
    data = load_inputs(tmp_path, tiny_model())
    assert [file.name for file in data.files] == ["a.npz", "b.npz", "c.npz"]
    assert data.is_folder and data.samples == 12 and data.has_labels
    assert [len(batch["x"]) for batch in iter_batches(data)] == [5, 3, 4]
    batches = list(iter_batches(data, 5, with_labels=True))
    assert [len(batch["x"]) for batch in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), arrays(12)["x"])
    np.testing.assert_array_equal(np.concatenate([b[LABELS_KEY] for b in batches]), np.arange(12))


def test_a_bad_file_in_a_folder_fails_before_any_work(tmp_path: Path) -> None:
    save(tmp_path / "a.npz", **arrays(2))
    save(tmp_path / "b.npz", x=arrays(2)["x"])
    with pytest.raises(DataError, match=r"input 'ids' missing from .*b\.npz"):
        load_inputs(tmp_path, tiny_model())


def test_max_samples(tmp_path: Path) -> None:
    save(tmp_path / "a.npz", **arrays(5))
    save(tmp_path / "b.npz", **arrays(5, start=5))
    data = load_inputs(tmp_path, tiny_model(), max_samples=7)
    assert data.file_samples == (5, 2) and data.samples == 7
    assert [len(batch["x"]) for batch in iter_batches(data)] == [5, 2]


def test_labels_that_are_not_one_integer_per_sample_are_refused(tmp_path: Path) -> None:
    """Unusable labels would silently drop the accuracy column: a one-line error says what to fix."""
    file = save(tmp_path / "data.npz", **arrays(4), labels=np.arange(3))
    with pytest.raises(DataError, match=r"'labels' in .*data.npz has shape \[3\] but the file holds 4 samples: .*"
                                        r"shape \[4\]"):
        load_inputs(file, tiny_model())
    file = save(tmp_path / "float.npz", **arrays(4), labels=np.zeros(4))
    with pytest.raises(DataError, match=r"is float64, not integer classes; save it with .astype\('int64'\)"):
        load_inputs(file, tiny_model())
    assert load_inputs(save(tmp_path / "column.npz", **arrays(4), labels=np.zeros((4, 1), np.int64)),
                       tiny_model()).has_labels


def test_labels_in_some_files_of_a_folder_only_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "a.npz", **arrays(3), labels=np.arange(3))
    save(tmp_path / "b.npz", **arrays(2))
    with pytest.raises(DataError, match="a.npz holds 'labels' but b.npz does not; give every file labels or none"):
        load_inputs(tmp_path, tiny_model())


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4), batch=st.integers(1, 7))
def test_batches_cover_every_sample_once_in_order(sizes: list[int], batch: int) -> None:
    if sum(sizes) == 0:
        sizes = [*sizes[:-1], 1]
    with tempfile.TemporaryDirectory() as folder:
        start = 0
        for position, size in enumerate(sizes):
            save(Path(folder) / f"{position:03d}.npz", **arrays(size, start=start))
            start += size
        data: InputData = load_inputs(folder, tiny_model())
        batches = list(iter_batches(data, batch))
    assert all(len(b["x"]) == batch for b in batches[:-1]) and 0 < len(batches[-1]["x"]) <= batch
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), arrays(start)["x"])
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), arrays(start)["ids"])
