"""Trainable forms of a factor pair, and folding them back into two factors.

Legend: K input channels, N output channels, r the chain's rank, R the rank of the core's update
(``--lora-rank``), q = min(K, N, r) the rank the product can have.

Both forms start from the SVD of the pair's product, computed without forming the ``[K, N]`` matrix:
``A = Q_a R_a`` and ``Bᵀ = Q_b R_b`` (thin QR), so ``A·B = Q_a (R_a R_bᵀ) Q_bᵀ``; the small SVD
``R_a R_bᵀ = P Σ Qᵀ`` gives ``A·B = U_r Σ_r V_rᵀ`` with ``U_r = Q_a P`` and ``V_r = Q_b Q``.

- ``core`` (the seed's form): ``U_r`` and ``V_r`` are fixed; the trainable core is
  ``M = diag(σ) + X·Y`` (``σ`` starts at ``Σ_r``, ``X`` ``[r, R]`` small random, ``Y`` ``[R, r]`` zero), so
  the layer is ``U_r M V_rᵀ``. During training the graph reads ``A = U_r M`` and ``B = V_rᵀ``.
- ``factors``: ``A = U_r Σ^½`` and ``B = Σ^½ V_rᵀ`` (the balanced split of the same product), both trained.

Folding back is the balanced split of the trained product, ``A' = U P D^½``, ``B' = D^½ Qᵀ Vᵀ`` from the
same QR-then-SVD, so both factors keep comparable ranges (it matters for fp16 storage) and the graph
keeps its two nodes and its shapes.

Learning rates are relative: every trained tensor gets Adam's step size ``lr × its scale`` (the RMS of
its starting value), so a step changes each factor by about ``lr`` of its norm. ``Y`` starts at zero and
takes the scale ``rms(σ)/√r`` of an off-diagonal entry: a step of all ``r²`` entries of ``X·Y`` then moves the
core by about ``lr`` of ``‖diag(σ)‖``, like a step of ``σ``. Whitened factors are badly
balanced (MiniLM's ``A`` has an RMS near 0.01 and its ``B`` near 0.7), which is why one absolute learning
rate on whole factors either collapses one of them or leaves the other untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FORMS", "CoreForm", "FactorsForm", "balanced_split", "product_svd", "make_form"]

#: The ``--train`` choices.
FORMS = ("core", "factors")


def product_svd(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A·B = U diag(s) Vᵀ`` without forming ``A·B``; padded with zero columns to ``r``.

    Args:
        a: ``[K, r]``.
        b: ``[r, N]``.

    Returns:
        ``U`` ``[K, r]``, ``s`` ``[r]`` (descending), ``V`` ``[N, r]``, float64.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rank = a.shape[1]
    q_a, r_a = np.linalg.qr(a)  # [K, min(K, r)], [min(K, r), r]
    q_b, r_b = np.linalg.qr(b.T)  # [N, min(N, r)], [min(N, r), r]
    core = r_a @ r_b.T  # [min(K, r), min(N, r)]
    p, s, q_t = np.linalg.svd(core, full_matrices=False)  # [., q], [q], [q, .]
    u = q_a @ p  # [K, q]
    v = q_b @ q_t.T  # [N, q]
    pad = rank - s.shape[0]
    if pad > 0:  # r above min(K, N): the extra directions carry nothing
        u = np.concatenate([u, np.zeros((u.shape[0], pad))], axis=1)  # [K, r]
        v = np.concatenate([v, np.zeros((v.shape[0], pad))], axis=1)  # [N, r]
        s = np.concatenate([s, np.zeros(pad)])  # [r]
    return u, s, v


def balanced_split(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same product split evenly: ``A' = U diag(s)^½``, ``B' = diag(s)^½ Vᵀ`` with ``A'·B' = A·B``.

    Args:
        a: ``[K, r]``.
        b: ``[r, N]``.

    Returns:
        ``A'`` ``[K, r]`` and ``B'`` ``[r, N]``, float64.
    """
    u, s, v = product_svd(a, b)  # [K, r], [r], [N, r]
    root = np.sqrt(s)  # [r]
    return u * root[None, :], root[:, None] * v.T  # [K, r], [r, N]


def _rms(value: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(value.double() ** 2)).item()) if value.numel() else 0.0


class _Form(torch.nn.Module):
    """A trainable pair: :meth:`factors` gives ``(A [K, r], B [r, N])`` for the graph."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups, each with its relative step size ``lr × scale``."""
        raise NotImplementedError

    def fold(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained product as two balanced factors ``(A' [K, r], B' [r, N])``, float64."""
        with torch.no_grad():
            a, b = self.factors()
        return balanced_split(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy())


class CoreForm(_Form):
    """``U_r (diag(σ) + X Y) V_rᵀ`` with ``U_r``, ``V_r`` fixed.

    Args:
        a: the pair's ``A`` ``[K, r]``.
        b: the pair's ``B`` ``[r, N]``.
        lora_rank: R (capped at r).
        generator: seeds ``X``.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, lora_rank: int, generator: torch.Generator) -> None:
        super().__init__()
        u, s, v = product_svd(a, b)  # [K, r], [r], [N, r]
        rank = s.shape[0]
        lora = max(1, min(lora_rank, rank))
        self.register_buffer("u", torch.from_numpy(u).float())  # [K, r]
        self.register_buffer("v_t", torch.from_numpy(np.ascontiguousarray(v.T)).float())  # [r, N]
        self.sigma = torch.nn.Parameter(torch.from_numpy(s).float())  # [r]
        x = torch.randn(rank, lora, generator=generator) / math.sqrt(lora)  # [r, R]
        self.x = torch.nn.Parameter(x)
        self.y = torch.nn.Parameter(torch.zeros(lora, rank))  # [R, r]
        self.scale = _rms(self.sigma) or 1.0
        self.rank = rank

    def core(self) -> torch.Tensor:
        """``M = diag(σ) + X Y`` ``[r, r]``."""
        return torch.diag(self.sigma) + self.x @ self.y  # [r, r]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u @ self.core(), self.v_t  # [K, r], [r, N]

    def param_groups(self, lr: float) -> list[dict]:
        return [
            {"params": [self.sigma], "lr": lr * self.scale},
            {"params": [self.x], "lr": lr * (_rms(self.x) or 1.0)},
            # An update of every entry of the r×r core by ε·c/√r moves the core by ε of its own norm c·√r.
            {"params": [self.y], "lr": lr * self.scale / math.sqrt(self.rank)},
        ]


class FactorsForm(_Form):
    """Both factors trained, starting from the balanced split of their product.

    Args:
        a: the pair's ``A`` ``[K, r]``.
        b: the pair's ``B`` ``[r, N]``.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        first, second = balanced_split(a, b)  # [K, r], [r, N]
        self.a = torch.nn.Parameter(torch.from_numpy(first).float())
        self.b = torch.nn.Parameter(torch.from_numpy(second).float())
        self.scales = (_rms(self.a) or 1.0, _rms(self.b) or 1.0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b  # [K, r], [r, N]

    def param_groups(self, lr: float) -> list[dict]:
        return [
            {"params": [self.a], "lr": lr * self.scales[0]},
            {"params": [self.b], "lr": lr * self.scales[1]},
        ]


def make_form(kind: str, a: np.ndarray, b: np.ndarray, lora_rank: int, generator: torch.Generator) -> _Form:
    """The trainable form ``kind`` (one of :data:`FORMS`) of the pair ``A [K, r]``, ``B [r, N]``."""
    if kind == "core":
        return CoreForm(a, b, lora_rank, generator)
    if kind == "factors":
        return FactorsForm(a, b)
    raise ValueError(f"unknown form {kind!r}")
