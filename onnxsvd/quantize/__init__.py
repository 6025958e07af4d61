"""Weight quantization through ONNX Runtime's own quantizer: one weight in, its MatMulNBits tensors and
the weight exactly as ONNX Runtime dequantizes it out. No packing is done here."""

from __future__ import annotations

from onnxsvd.quantize.ort import QuantizedWeight, dequantized_weight, quantize_weight

__all__ = ["QuantizedWeight", "dequantized_weight", "quantize_weight"]
