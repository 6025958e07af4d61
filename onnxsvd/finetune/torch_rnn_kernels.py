"""Torch kernels for ONNX's recurrent ops: RNN, GRU and LSTM, one time step at a time.

Dimension letters: ``T`` time steps, ``B`` batch, ``I`` input size, ``H`` hidden size, ``D`` directions
(1, or 2 when bidirectional), ``g`` gates (RNN 1, GRU 3 in the order z r h, LSTM 4 in the order i o f c).
Weights are ``W [D, g·H, I]``, ``R [D, g·H, H]``, ``B [D, 2·g·H]`` (input biases, then recurrent ones);
``layout=1`` puts the batch first in X, Y and the states. Steps past a row's ``sequence_lens`` leave its
state unchanged and write zeros to Y. The registry of ops is :data:`onnxsvd.finetune.torch_graph.OPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import torch

from onnxsvd.finetune.torch_kernels import Kernel, Tensor, refuse

__all__ = ["recurrent"]

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
#: Activation → (default alpha, default beta); None where the function takes no such parameter.
_PARAMETERS: dict[str, tuple[float | None, float | None]] = {
    "Relu": (None, None), "Tanh": (None, None), "Sigmoid": (None, None), "Softsign": (None, None),
    "Softplus": (None, None), "Affine": (1.0, 0.0), "LeakyRelu": (0.01, None), "ThresholdedRelu": (1.0, None),
    "ScaledTanh": (1.0, 1.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, None),
}


def _activation(name: str, alpha: float | None, beta: float | None) -> Callable[[Tensor], Tensor]:
    functions: dict[str, Callable[[Tensor], Tensor]] = {
        "Relu": torch.relu,
        "Tanh": torch.tanh,
        "Sigmoid": torch.sigmoid,
        "Softsign": lambda x: x / (1 + x.abs()),
        "Softplus": torch.nn.functional.softplus,
        "Affine": lambda x: alpha * x + beta,
        "LeakyRelu": lambda x: torch.nn.functional.leaky_relu(x, alpha),
        "ThresholdedRelu": lambda x: torch.where(x > alpha, x, torch.zeros_like(x)),
        "ScaledTanh": lambda x: alpha * torch.tanh(beta * x),
        "HardSigmoid": lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0),
        "Elu": lambda x: torch.nn.functional.elu(x, alpha),
    }
    return functions[name]


def _activations(node: onnx.NodeProto, attrs: dict[str, Any], directions: int) -> list[Callable[[Tensor], Tensor]]:
    names = [n.decode() if isinstance(n, bytes) else n for n in attrs.get("activations", [])]
    per_direction = len(_DEFAULT_ACTIVATIONS[node.op_type])
    names = names or _DEFAULT_ACTIVATIONS[node.op_type] * directions
    if len(names) == per_direction and directions == 2:
        names = names * 2
    alphas = [float(a) for a in attrs.get("activation_alpha", [])]
    betas = [float(b) for b in attrs.get("activation_beta", [])]
    functions = []
    for name in names:
        if name not in _PARAMETERS:
            raise refuse(node, f"activation {name}")
        alpha, beta = _PARAMETERS[name]
        if alpha is not None and alphas:
            alpha = alphas.pop(0)
        if beta is not None and betas:
            beta = betas.pop(0)
        functions.append(_activation(name, alpha, beta))
    return functions


def recurrent(node: onnx.NodeProto, attrs: dict[str, Any], opset: int) -> Kernel:
    """RNN, GRU or LSTM (the node's op type)."""
    kind = node.op_type
    gates = _GATES[kind]
    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "reverse", "bidirectional"):
        raise refuse(node, f"direction={direction}")
    directions = 2 if direction == "bidirectional" else 1
    functions = _activations(node, attrs, directions)
    per_direction = len(functions) // directions
    clip = attrs.get("clip")
    batch_first = bool(attrs.get("layout", 0))
    linear_before_reset = bool(attrs.get("linear_before_reset", 0))
    input_forget = bool(attrs.get("input_forget", 0))

    def run(xs: list[Any]) -> tuple[Tensor, ...]:
        xs = list(xs) + [None] * (8 - len(xs))
        x, weight, recurrence, bias, lengths, initial_h = xs[:6]
        initial_c, peephole = (xs[6], xs[7]) if kind == "LSTM" else (None, None)
        if batch_first:
            x = x.transpose(0, 1)  # [T, B, I]
            initial_h = None if initial_h is None else initial_h.transpose(0, 1)
            initial_c = None if initial_c is None else initial_c.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        hidden = recurrence.shape[-1]
        outputs, finals, cells = [], [], []
        for d in range(directions):
            reverse = direction == "reverse" or d == 1
            f = functions[d * per_direction : (d + 1) * per_direction]
            w, r = weight[d], recurrence[d]  # [g·H, I], [g·H, H]
            b = bias[d] if bias is not None else torch.zeros(2 * gates * hidden, dtype=x.dtype, device=x.device)
            w_bias, r_bias = b[: gates * hidden], b[gates * hidden :]  # [g·H] each
            h = initial_h[d] if initial_h is not None else torch.zeros(batch, hidden, dtype=x.dtype, device=x.device)
            c = initial_c[d] if initial_c is not None else torch.zeros_like(h)
            p = peephole[d] if peephole is not None else None  # [3·H]: i, o, f
            projected = x @ w.T + w_bias  # [T, B, g·H]: the input part of every gate at once
            ys: list[Tensor] = [torch.zeros_like(h)] * steps
            order = range(steps - 1, -1, -1) if reverse else range(steps)
            for t in order:
                active = None if lengths is None else (t < lengths.to(x.device)).reshape(batch, 1)  # [B, 1]
                new_h, new_c = _step(kind, projected[t], h, c, r, r_bias, p, f, clip, linear_before_reset,
                                     input_forget)
                if active is not None:
                    new_h = torch.where(active, new_h, h)
                    new_c = torch.where(active, new_c, c)
                    ys[t] = torch.where(active, new_h, torch.zeros_like(new_h))
                else:
                    ys[t] = new_h
                h, c = new_h, new_c
            outputs.append(torch.stack(ys))  # [T, B, H]
            finals.append(h)
            cells.append(c)
        y = torch.stack(outputs, dim=1)  # [T, D, B, H]
        y_h, y_c = torch.stack(finals), torch.stack(cells)  # [D, B, H]
        if batch_first:
            y = y.permute(2, 0, 1, 3)  # [B, T, D, H]
            y_h, y_c = y_h.transpose(0, 1), y_c.transpose(0, 1)  # [B, D, H]
        return (y, y_h, y_c) if kind == "LSTM" else (y, y_h)

    return run


def _step(
    kind: str, projected: Tensor, h: Tensor, c: Tensor, r: Tensor, r_bias: Tensor, p: Tensor | None,
    f: list[Callable[[Tensor], Tensor]], clip: float | None, linear_before_reset: bool, input_forget: bool,
) -> tuple[Tensor, Tensor]:
    """One time step: (H_t, C_t) from the input part of the gates ``[B, g·H]`` and the previous state."""
    hidden = h.shape[-1]

    def clipped(value: Tensor) -> Tensor:
        return value if clip is None else torch.clamp(value, -float(clip), float(clip))

    if kind == "RNN":
        # H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)
        return f[0](clipped(projected + h @ r.T + r_bias)), c
    if kind == "GRU":
        recurrent_part = h @ r[: 2 * hidden].T + r_bias[: 2 * hidden]  # [B, 2H]: z and r
        z = f[0](clipped(projected[:, :hidden] + recurrent_part[:, :hidden]))
        reset = f[0](clipped(projected[:, hidden : 2 * hidden] + recurrent_part[:, hidden:]))
        r_h, rb_h = r[2 * hidden :], r_bias[2 * hidden :]
        if linear_before_reset:  # h̃ = g(X W_h^T + r ⊙ (H R_h^T + Rb_h) + Wb_h)
            candidate = projected[:, 2 * hidden :] + reset * (h @ r_h.T + rb_h)
        else:  # h̃ = g(X W_h^T + (r ⊙ H) R_h^T + Rb_h + Wb_h)
            candidate = projected[:, 2 * hidden :] + (reset * h) @ r_h.T + rb_h
        candidate = f[1](clipped(candidate))
        return (1 - z) * candidate + z * h, c
    gates = projected + h @ r.T + r_bias  # [B, 4H]: i, o, f, c
    i_part, o_part, f_part, c_part = gates.split(hidden, dim=1)
    if p is not None:
        p_i, p_o, p_f = p.split(hidden)
        i_part, f_part = i_part + p_i * c, f_part + p_f * c
    input_gate = f[0](clipped(i_part))
    forget_gate = 1 - input_gate if input_forget else f[0](clipped(f_part))
    cell = forget_gate * c + input_gate * f[1](clipped(c_part))
    if p is not None:
        o_part = o_part + p_o * cell
    output_gate = f[0](clipped(o_part))
    return output_gate * f[2](cell), cell
