"""One exception hierarchy for the whole package.

Every error a user can cause is an :class:`OnnxSvdError` whose message says what went wrong *and* what
to do about it, in one line. The CLI prints that line and exits with :attr:`OnnxSvdError.exit_code`;
a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

__all__ = [
    "TORCH_INSTALL_HINT",
    "TORCH_CUDA_INSTALL_HINT",
    "OnnxSvdError",
    "UsageError",
    "ModelError",
    "OutputError",
    "DataError",
    "StatsError",
    "FactorizationError",
    "QuantizationError",
    "ValidationGateError",
    "ProviderError",
    "UnsupportedOpError",
]


#: How to install torch without pulling several GB of CUDA packages: always pinned, from a checkout the
#: constraints file (torch==2.13.0, the CPU wheel), elsewhere the same pin by hand.
TORCH_INSTALL_HINT = "pip install -c constraints.txt 'onnxsvd[torch]' (or pip install 'torch==2.13.0')"
#: The same pin for ``--device cuda``: PyPI's Linux wheel of that version is the CUDA build.
TORCH_CUDA_INSTALL_HINT = "on a machine with an NVIDIA GPU, pip install 'torch==2.13.0' (PyPI's CUDA build)"


class OnnxSvdError(Exception):
    """Base of every error onnxsvd raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(OnnxSvdError):
    """An option value or combination that cannot work (a ratio outside (0, 1], a negative rank...)."""

    exit_code = 2


class ModelError(OnnxSvdError):
    """The input model is missing, empty, not ONNX, truncated or otherwise unusable."""


class OutputError(OnnxSvdError):
    """The output path cannot be written (same as the input, missing folder, not writable...)."""


class DataError(OnnxSvdError):
    """Calibration or evaluation data does not fit the model (name, dtype, rank, shape, file)."""


class StatsError(OnnxSvdError):
    """A statistics file is unreadable or belongs to another model."""


class FactorizationError(OnnxSvdError):
    """A factorization could not be computed (the site stays dense and the report says why)."""


class QuantizationError(FactorizationError):
    """ONNX Runtime's quantizer could not quantize a weight (the site stays dense and the report says why)."""


class ValidationGateError(OnnxSvdError):
    """``validate --min-cosine/--max-top1-drop`` found the rewrite outside the gate."""

    exit_code = 3


class ProviderError(OnnxSvdError):
    """An ONNX Runtime execution provider was asked for but is not available here."""


class UnsupportedOpError(OnnxSvdError):
    """The torch evaluator met an ONNX op it cannot run."""
