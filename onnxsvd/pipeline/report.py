"""Reports: what a rewrite did to every site, as data (JSON) first and tables second."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from onnxsvd.io import atomic_path

__all__ = ["SiteReport", "RewriteReport"]


@dataclasses.dataclass
class SiteReport:
    """One MatMul/Gemm, factorized or kept dense with the reason; or another node holding weights that is
    not a site (LSTM, Conv, a MatMul inside an If body…), kept with the reason.

    Attributes:
        name: node name (``<outer node>/<attribute>/<node>`` inside a subgraph).
        op_type: the node's op.
        shape: ``[K, N]`` of the normal form (``None`` when the node had no usable weight or is not a
            MatMul/Gemm of the main graph).
        action: ``"factorized"`` or ``"kept"``.
        reason: why it was kept, or how the rank was chosen.
        rank: total rank (0 when kept).
        stage_ranks: rank of each residual stage.
        params_before: ``K·N``; for another node, the values of its constant weights.
        params_after: ``r·(K+N)`` when factorized (shared factors are counted at every site reading
            them; the model totals count them once), else ``K·N``.
        dense_bytes: bytes of the weight as stored (int8 payload with its scale and zero point, two bytes a
            value in fp16, four in fp32); 0 when the node has no usable constant weight.
        factor_bytes: bytes of the factor chain in the factor dtype when factorized (shared factors counted
            at every site, as for ``params_after``), else 0.
        kept_energy: share of ``Σσ²`` kept, in the method's metric.
        weight_error: ``‖W − Σ A_i B_i‖_F / ‖W‖_F`` with the stored factors.
        shared_with: other sites that read the same factors.
        seconds: time spent factorizing.
        dense_ms: median time of the dense layer alone (``--keep-dense-if-slower``; slowest provider).
        factorized_ms: median time of its factor chain alone, on the same activation and provider.
        speedup: ``dense_ms / factorized_ms``; the chain is kept only when this is above 1.
        speed_provider: the provider those times are from (the one where the chain gains least).
        notes: what the site's SVDs needed beyond the first driver (an SVD fallback: which driver failed,
            how, and which one gave the factors); empty when nothing did.
        base: the quantized base (``int4 b32 sym rtn``) when the site was quantized (``--quantize``), else
            ``None``. ``factor_bytes`` is then ``base_bytes + correction_bytes``, ``kept_energy`` the share of
            the quantization error's energy (in the method's metric) that the correction keeps, and
            ``weight_error`` ``‖W − Ŵ − Σ A_i B_i‖_F / ‖W‖_F``.
        base_bytes: bytes of the quantized base (packed values, scales, zero points).
        correction_bytes: bytes of the correction's factors in their dtype.
        base_error: ``‖W − Ŵ‖_F / ‖W‖_F``, the base's error before the correction.
        rank_note: how the policy's rank was rounded (aligned down or up, left unaligned and why, raised
            to the floor); also in ``reason``. ``None`` when it was taken as it came.
        sensitivity: global allocation: α, the factor from the site's discarded energy to the model's
            output error (``None`` without global allocation, or when the site was not allocated).
        sensitivity_estimated: True when ``sensitivity`` was not measured but estimated (the median of
            the measured ones); ``sensitivity_reason`` says why it could not be measured.
        sensitivity_reason: why the sensitivity is estimated (``None`` when it was measured).
        conv_form: a Conv site's factor form (``"channel"`` or ``"spatial"``), else ``None``.
        flops_before: a Conv site's multiply-adds per output position, dense (``N·C·∏k``), else ``None``.
        flops_after: those of its chain when factorized (channel ``r·(C·∏k + N)``; spatial
            ``r·(C·k_h·s_w + k_w·N)``: its first Conv runs at the input's width), else ``flops_before``.
    """

    name: str
    op_type: str
    shape: list[int] | None
    action: str
    reason: str
    rank: int = 0
    stage_ranks: list[int] = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    dense_bytes: int = 0
    factor_bytes: int = 0
    kept_energy: float | None = None
    weight_error: float | None = None
    shared_with: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    dense_ms: float | None = None
    factorized_ms: float | None = None
    speedup: float | None = None
    speed_provider: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    base: str | None = None
    base_bytes: int = 0
    correction_bytes: int = 0
    base_error: float | None = None
    rank_note: str | None = None
    sensitivity: float | None = None
    sensitivity_estimated: bool = False
    sensitivity_reason: str | None = None
    conv_form: str | None = None
    flops_before: float | None = None
    flops_after: float | None = None


@dataclasses.dataclass
class RewriteReport:
    """The whole rewrite. ``params_*`` count every initializer and Constant of the model, ``bytes_*``
    their values' bytes in each tensor's own dtype (what the guard weighs; the file adds its framing)."""

    input: str | None
    output: str | None
    method: str
    policy: str
    layout: str
    stages: int
    params_before: int
    params_after: int
    sites: list[SiteReport]
    file_size_before: int | None = None
    file_size_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    seconds: float = 0.0
    dry_run: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def factorized(self) -> list[SiteReport]:
        return [site for site in self.sites if site.action == "factorized"]

    @property
    def kept(self) -> list[SiteReport]:
        return [site for site in self.sites if site.action == "kept"]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sites_factorized"] = len(self.factorized)
        data["sites_kept"] = len(self.kept)
        return data

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        with atomic_path(path, suffix=".json") as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
