"""Write a decoder-shaped ONNX model of any width and depth, with external data, for scale benchmarks.

Each layer: LayerNorm → q, k, v projections (d×d) → single-head attention → output projection (d×d)
→ residual → LayerNorm → up (d×4d) → Relu → down (4d×d) → residual. The weights have realistic decaying
spectra (σ_i ∝ (i+1)^-power, random singular vectors from Gaussian products) and are written one at a
time straight into the external data file, so making a 2.5 GB model needs little memory.

    python tools/make_synthetic.py --width 2048 --layers 12 --out build/synthetic/2.5gb
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def decaying_weight(rng: np.random.Generator, k: int, n: int, power: float = 0.8) -> np.ndarray:
    """``[K, N]`` float32 with singular values decaying like ``(i+1)^-power`` (approximately).

    ``(G₁ · diag(s)) · G₂`` with Gaussian ``G₁`` ``[K, m]`` and ``G₂`` ``[m, N]``: random singular
    vectors without an explicit QR, scaled so activations keep their size through the layer.
    """
    m = min(k, n)
    scale = (np.arange(1, m + 1, dtype=np.float32) ** -power).astype(np.float32)  # [m]
    left = rng.standard_normal((k, m), dtype=np.float32) * scale[None, :]  # [K, m]
    right = rng.standard_normal((m, n), dtype=np.float32)  # [m, N]
    try:
        import torch

        weight = (torch.from_numpy(left) @ torch.from_numpy(right)).numpy()
    except ImportError:
        weight = left @ right
    weight /= np.float32(np.linalg.norm(weight, ord="fro") / math.sqrt(n))  # unit-ish row gain
    return weight


class ExternalWriter:
    """Appends tensors to one data file and returns TensorProtos that point into it."""

    def __init__(self, folder: Path, location: str) -> None:
        self.location = location
        self.handle = open(folder / location, "wb")  # noqa: SIM115 - closed in close()

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        tensor = numpy_helper.from_array(np.zeros((0,), dtype=array.dtype), name)
        del tensor.dims[:]
        tensor.dims.extend(array.shape)
        tensor.ClearField("raw_data")
        offset = self.handle.tell()
        self.handle.write(np.ascontiguousarray(array).tobytes())
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        self.handle.close()


def build(width: int, layers: int, folder: Path, seed: int = 0) -> Path:
    """Write ``folder/model.onnx`` and ``folder/model.onnx.data``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ExternalWriter(folder, "model.onnx.data")
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    d, hidden = width, 4 * width

    def weight(name: str, k: int, n: int) -> str:
        initializers.append(writer.add(name, decaying_weight(rng, k, n)))
        return name

    def small(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    small("scale_d", np.array(1.0 / math.sqrt(d)))
    current = "x"
    for layer in range(layers):
        p = f"layers.{layer}"
        gamma, beta = small(f"{p}.ln1.weight", np.ones(d)), small(f"{p}.ln1.bias", np.zeros(d))
        nodes.append(helper.make_node("LayerNormalization", [current, gamma, beta], [f"{p}.ln1"], axis=-1))
        for proj in ("q", "k", "v"):
            nodes.append(helper.make_node(
                "MatMul", [f"{p}.ln1", weight(f"{p}.attn.{proj}.weight", d, d)], [f"{p}.{proj}"],
                name=f"/{p}/attn/{proj}/MatMul",
            ))
        nodes += [
            helper.make_node("Transpose", [f"{p}.k"], [f"{p}.kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}.q", f"{p}.kt"], [f"{p}.scores_raw"], name=f"/{p}/attn/scores"),
            helper.make_node("Mul", [f"{p}.scores_raw", "scale_d"], [f"{p}.scores"]),
            helper.make_node("Softmax", [f"{p}.scores"], [f"{p}.probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", f"{p}.v"], [f"{p}.context"], name=f"/{p}/attn/context"),
            helper.make_node(
                "MatMul", [f"{p}.context", weight(f"{p}.attn.o.weight", d, d)], [f"{p}.attn_out"],
                name=f"/{p}/attn/o/MatMul",
            ),
            helper.make_node("Add", [current, f"{p}.attn_out"], [f"{p}.res1"]),
        ]
        gamma, beta = small(f"{p}.ln2.weight", np.ones(d)), small(f"{p}.ln2.bias", np.zeros(d))
        nodes += [
            helper.make_node("LayerNormalization", [f"{p}.res1", gamma, beta], [f"{p}.ln2"], axis=-1),
            helper.make_node(
                "MatMul", [f"{p}.ln2", weight(f"{p}.mlp.up.weight", d, hidden)], [f"{p}.up"],
                name=f"/{p}/mlp/up/MatMul",
            ),
            helper.make_node("Relu", [f"{p}.up"], [f"{p}.act"]),
            helper.make_node(
                "MatMul", [f"{p}.act", weight(f"{p}.mlp.down.weight", hidden, d)], [f"{p}.down"],
                name=f"/{p}/mlp/down/MatMul",
            ),
            helper.make_node("Add", [f"{p}.res1", f"{p}.down"], [f"{p}.out"]),
        ]
        current = f"{p}.out"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    writer.close()
    graph = helper.make_graph(
        nodes,
        "synthetic_decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", d])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxsvd-synthetic")
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder to write model.onnx (+ .data) into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build(args.width, args.layers, args.out, args.seed)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.name.startswith("model.onnx"))
    print(f"{path}: width {args.width}, {args.layers} layers, {size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
