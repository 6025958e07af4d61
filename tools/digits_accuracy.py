"""Top-1 accuracy of ONNX classifiers on a labelled ``.npz`` set, run with ONNX Runtime on CPU.

Example::

    python tools/digits_accuracy.py models/digits_mlp.onnx models/digits_vit.onnx \\
        --data models/digits_eval.npz

prints one line per model, ``models/digits_mlp.onnx  accuracy 0.9760  (541 samples)``. The data file
holds the model input under ``--input-key`` (default ``input``) and int64 class labels under
``--label-key`` (default ``labels``); the model's first output is taken as the logits.
"""

from __future__ import annotations

__all__ = ["AccuracyError", "load_labelled_data", "model_accuracy", "main"]

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path("models/digits_eval.npz")


class AccuracyError(Exception):
    """A model or data file that cannot be read or run; the message says which and why."""


def load_labelled_data(path: Path, input_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(inputs [n, ...], labels [n])`` from an ``.npz`` file.

    Raises:
        AccuracyError: the file is missing, unreadable, lacks a key, or the lengths differ.
    """
    if not path.is_file():
        raise AccuracyError(f"data file not found: {path}")
    try:
        with np.load(path) as archive:
            missing = [key for key in (input_key, label_key) if key not in archive.files]
            if missing:
                raise AccuracyError(f"{path}: missing key(s) {missing}; present: {sorted(archive.files)}")
            inputs = archive[input_key]
            labels = archive[label_key]
    except AccuracyError:
        raise
    except Exception as error:  # numpy raises several types for a corrupt archive
        raise AccuracyError(f"{path}: not a readable .npz file ({error})") from error
    if len(inputs) != len(labels):
        raise AccuracyError(f"{path}: {len(inputs)} inputs but {len(labels)} labels")
    return inputs, labels.astype(np.int64)


def model_accuracy(model_path: Path, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of the classifier in ``model_path`` on ``inputs`` against ``labels``.

    The model's first input receives ``inputs`` (cast to its element type when it is float32) in
    batches; its first output must be ``[batch, classes]`` logits.

    Raises:
        AccuracyError: the model is missing, not valid ONNX, or fails to run on the data.
    """
    import onnxruntime

    if not model_path.is_file():
        raise AccuracyError(f"model file not found: {model_path}")
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: the exception carries the message we print
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own exception types from C++
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AccuracyError(f"{model_path}: cannot load model ({message})") from error
    model_input = session.get_inputs()[0]
    if model_input.type == "tensor(float)":
        inputs = inputs.astype(np.float32, copy=False)
    correct = 0
    try:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            (logits,) = session.run([session.get_outputs()[0].name], {model_input.name: batch})
            correct += int((np.asarray(logits).argmax(axis=-1) == labels[start : start + batch_size]).sum())
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AccuracyError(f"{model_path}: inference failed ({message})") from error
    return correct / max(len(labels), 1)


def main(argv: list[str] | None = None) -> int:
    """Print one accuracy line per model; exit 1 with a one-line message on the first bad file."""
    parser = argparse.ArgumentParser(
        description="Top-1 accuracy of ONNX classifiers on a labelled .npz set (ONNX Runtime, CPU)."
    )
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL", help="ONNX classifier(s)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"labelled .npz (default: {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--input-key", default="input", help="key of the model input in --data (default: input)"
    )
    parser.add_argument(
        "--label-key", default="labels", help="key of the int labels in --data (default: labels)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.debug else logging.WARNING, format="%(message)s")

    try:
        inputs, labels = load_labelled_data(arguments.data, arguments.input_key, arguments.label_key)
        for model_path in arguments.models:
            accuracy = model_accuracy(model_path, inputs, labels)
            print(f"{model_path}  accuracy {accuracy:.4f}  ({len(labels)} samples)", flush=True)
    except AccuracyError as error:
        if arguments.debug:
            logger.exception("failed")
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
