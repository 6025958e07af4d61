"""What ``rewrite`` records on every node it emits, so that later commands read chains instead of guessing.

Every node of a factor chain carries, in its ONNX ``metadata_props`` (keys under ``onnxsvd.``), one
:class:`ChainRecord`: the site it replaces, its stage, its role in the chain, the weight's side and the
names of the two factor initializers. ``metadata_props`` is a field of ``NodeProto`` (onnx ≥ 1.16, read
and ignored by ONNX Runtime at any IR version), so the records survive ``onnx.save``/``onnx.load``,
external data and onnx-ir round trips; a tool that rebuilds nodes without copying them drops them, and
``finetune`` then says so.

The model itself records the original it was made from: :data:`SOURCE_FINGERPRINT_KEY` in the model's
``metadata_props`` holds :func:`onnxsvd.io.fingerprint` of the model ``rewrite`` read.
"""

from __future__ import annotations

import dataclasses

import onnx

__all__ = [
    "FUSED",
    "PREFIX",
    "ROLES",
    "SOURCE_FINGERPRINT_KEY",
    "ChainRecord",
    "RecordError",
    "has_record",
    "read_record",
    "write_record",
]

#: Every key onnxsvd writes starts with this.
PREFIX = "onnxsvd."

#: The model-level key holding the fingerprint of the model that was rewritten.
SOURCE_FINGERPRINT_KEY = "onnxsvd.source_fingerprint"

#: ``stage`` of a fused chain (every stage concatenated into one ``A`` and one ``B``).
FUSED = 0

#: What a node does in its chain: the node reading ``A`` (``first``), the node reading ``B`` (``second``),
#: the ``Add`` that sums a stage into the stages before it (``sum``), the ``Transpose`` of a Gemm's
#: activation in old opsets or of a shared factor that a site reads the other way round (``transpose``),
#: the ``Cast`` of a factor stored in another dtype (``cast``), the quantized base (``MatMulNBits``) that a
#: correction branch is added to (``base``; with ``--branch fused`` it also computes the branch's ``X·Â``),
#: the ``Split`` of the fused base's output into the base and the branch's hidden tensor (``split``).
ROLES = ("first", "second", "sum", "transpose", "cast", "base", "split")

_SIDES = ("right", "left")
_KEYS = ("site", "stage", "role", "weight_side", "factor_a", "factor_b", "rank")


class RecordError(ValueError):
    """A node's ``onnxsvd.*`` metadata is incomplete or malformed (the message says which key)."""


@dataclasses.dataclass(frozen=True)
class ChainRecord:
    """One node's record of the chain it belongs to.

    Attributes:
        site: name of the MatMul/Gemm node the chain replaces.
        stage: :data:`FUSED` (0) for a fused chain, else the stage (1, 2, …) of the ``stages`` layout.
        role: one of :data:`ROLES`.
        weight_side: ``"right"`` (``X · A · B``; the initializers hold ``A`` ``[K, r]`` and ``B``
            ``[r, N]``) or ``"left"`` (``Bᵀ · Aᵀ · X``; they hold ``Aᵀ`` ``[r, K]`` and ``Bᵀ`` ``[N, r]``).
        factor_a: name of the initializer of the first factor, as stored (before any ``Cast``).
        factor_b: name of the initializer of the second factor, as stored.
        rank: r, the chain's rank.
    """

    site: str
    stage: int
    role: str
    weight_side: str
    factor_a: str
    factor_b: str
    rank: int

    @property
    def label(self) -> str:
        """The chain's name in reports: the site, with ``/svd_sI`` for stage I of the stages layout."""
        return self.site if self.stage == FUSED else f"{self.site}/svd_s{self.stage}"

    def as_props(self) -> dict[str, str]:
        """The record as ``metadata_props`` entries."""
        return {
            f"{PREFIX}site": self.site,
            f"{PREFIX}stage": "fused" if self.stage == FUSED else str(self.stage),
            f"{PREFIX}role": self.role,
            f"{PREFIX}weight_side": self.weight_side,
            f"{PREFIX}factor_a": self.factor_a,
            f"{PREFIX}factor_b": self.factor_b,
            f"{PREFIX}rank": str(self.rank),
        }


def write_record(node: onnx.NodeProto, record: ChainRecord) -> None:
    """Set ``record`` on ``node`` (replacing any ``onnxsvd.*`` entries it had; others are kept)."""
    kept = [(prop.key, prop.value) for prop in node.metadata_props if not prop.key.startswith(PREFIX)]
    del node.metadata_props[:]
    for key, value in kept + list(record.as_props().items()):
        node.metadata_props.add(key=key, value=value)


def has_record(node: onnx.NodeProto) -> bool:
    """Whether the node carries any ``onnxsvd.*`` entry."""
    return any(prop.key.startswith(PREFIX) for prop in node.metadata_props)


def read_record(node: onnx.NodeProto) -> ChainRecord | None:
    """The node's record, or None when it carries no ``onnxsvd.*`` entry.

    Raises:
        RecordError: some entries are there but the record is incomplete or malformed.
    """
    props = {prop.key[len(PREFIX):]: prop.value for prop in node.metadata_props if prop.key.startswith(PREFIX)}
    if not props:
        return None
    missing = [f"{PREFIX}{key}" for key in _KEYS if key not in props]
    if missing:
        raise RecordError(f"record lacks {', '.join(missing)}")
    stage_text = props["stage"]
    if stage_text == "fused":
        stage = FUSED
    elif stage_text.isdigit() and int(stage_text) >= 1:
        stage = int(stage_text)
    else:
        raise RecordError(f"{PREFIX}stage is {stage_text!r}, not 'fused' or a stage number from 1")
    if props["role"] not in ROLES:
        raise RecordError(f"{PREFIX}role is {props['role']!r}, not one of {', '.join(ROLES)}")
    if props["weight_side"] not in _SIDES:
        raise RecordError(f"{PREFIX}weight_side is {props['weight_side']!r}, not 'right' or 'left'")
    if not props["rank"].isdigit() or int(props["rank"]) < 1:
        raise RecordError(f"{PREFIX}rank is {props['rank']!r}, not a positive integer")
    if not props["factor_a"] or not props["factor_b"]:
        raise RecordError(f"{PREFIX}factor_a and {PREFIX}factor_b must name initializers")
    return ChainRecord(
        site=props["site"],
        stage=stage,
        role=props["role"],
        weight_side=props["weight_side"],
        factor_a=props["factor_a"],
        factor_b=props["factor_b"],
        rank=int(props["rank"]),
    )
