"""The shipped character CNN (tools/make_char_cnn.py): valid ONNX, data that fits it, its recorded accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest

from onnxsvd.data import LABELS_KEY, iter_batches, load_inputs, model_inputs

from .conftest import MODELS

MODEL = MODELS / "chars_resnet.onnx"
RECIPE = MODELS / "chars_resnet.json"
CALIB = MODELS / "chars_calib.npz"
EVAL = MODELS / "chars_eval.npz"
#: The task has 20 classes (chance 5%); a trained model that falls under this is broken.
ACCURACY_FLOOR = 0.90
#: Argmax flips allowed between the machine that recorded the accuracy and this one (BLAS rounding).
FLIPS_ALLOWED = 2


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    assert MODEL.is_file(), f"{MODEL} is missing; run python tools/make_char_cnn.py"
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def recipe() -> dict:
    return json.loads(RECIPE.read_text(encoding="utf-8"))


def test_model_is_valid_and_convolutional(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    # stem + 9 blocks × 2 + 2 strided shortcuts; BatchNorm folded into every Conv's weight and bias.
    assert len(convs) == 21
    assert all(node.input[1] in initializers and len(node.input) == 3 for node in convs)
    assert not [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    kernels = [tuple(initializers[node.input[1]].dims[2:]) for node in convs]
    assert kernels.count((3, 3)) == 19 and kernels.count((1, 1)) == 2
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [dim.dim_value for dim in dims[1:]] == [1, 32, 32]


@pytest.mark.parametrize("path", [CALIB, EVAL], ids=["calib", "eval"])
def test_data_fits_the_model(model: onnx.ModelProto, path, recipe: dict) -> None:
    data = load_inputs(path, model)  # the reader calibrate/validate --data use
    assert [spec.name for spec in data.specs] == [spec.name for spec in model_inputs(model)] == ["input"]
    assert data.has_labels
    with np.load(path) as archive:
        assert set(archive.files) == {"input", LABELS_KEY}
        images, labels = archive["input"], archive[LABELS_KEY]
    assert images.dtype == np.float32 and images.shape[1:] == (1, 32, 32)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(len(recipe["classes"])))
    expected = recipe["n_calib"] if path == CALIB else recipe["n_eval"]
    assert data.samples == len(labels) == expected
    batch = next(iter(iter_batches(data, 64)))
    assert batch["input"].shape == (64, 1, 32, 32)


def test_onnx_runtime_reproduces_the_recorded_accuracy(recipe: dict) -> None:
    session = onnxruntime.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    with np.load(EVAL) as archive:
        images, labels = archive["input"], archive[LABELS_KEY]
    predictions = np.concatenate(
        [session.run(["logits"], {"input": images[start : start + 500]})[0].argmax(axis=1)
         for start in range(0, len(images), 500)]
    )
    accuracy = float(np.mean(predictions == labels))
    assert abs(accuracy - recipe["eval_accuracy"]) <= FLIPS_ALLOWED / len(labels)
    assert accuracy >= ACCURACY_FLOOR
