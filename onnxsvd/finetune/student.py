"""The student: a rewritten model run in torch with its factor pairs in a trainable form, and folding back.

The factor initializers are not stored in the graph module: each forward pass asks every form for its
``(A, B)``, stores them the way the graph reads them (transposed for the mirror form, in the factors'
storage dtype, so an fp16 model trains through its own rounding) and runs the graph on those values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import onnx
import torch
from onnx import numpy_helper

from onnxsvd.finetune.forms import make_form
from onnxsvd.finetune.sites import FactorPair, read_factors
from onnxsvd.finetune.torch_graph import TorchGraph, torch_dtype

__all__ = ["Student", "fold_back"]


class Student(torch.nn.Module):
    """A rewritten model with trainable factor pairs.

    Args:
        model: the rewritten model.
        pairs: its factor pairs (:func:`onnxsvd.finetune.sites.find_factor_pairs`).
        train: ``"core"`` or ``"factors"``.
        lora_rank: R for the core form.
        generator: seeds the core form's random ``X``.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        pairs: Sequence[FactorPair],
        train: str,
        lora_rank: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.forms = torch.nn.ModuleList(
            make_form(train, *read_factors(model, pair), lora_rank, generator) for pair in self.pairs
        )
        provided = [name for pair in self.pairs for name in (pair.a_tensor, pair.b_tensor)]
        self.graph = TorchGraph(model, provided=provided)

    def overrides(self) -> dict[str, torch.Tensor]:
        """The factor tensors as the graph stores them, from the forms' current values."""
        values: dict[str, torch.Tensor] = {}
        for pair, form in zip(self.pairs, self.forms, strict=True):
            a, b = form.factors()  # [K, r], [r, N]
            dtype = torch_dtype(pair.dtype)
            first, second = pair.layout(a, b)  # as stored: transposed for the mirror, Conv weights for a Conv
            values[pair.a_tensor] = first.to(dtype)
            values[pair.b_tensor] = second.to(dtype)
        return values

    def forward(
        self, feeds: Mapping[str, torch.Tensor], outputs: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.graph(feeds, overrides=self.overrides(), outputs=outputs)

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups with per-tensor relative step sizes."""
        return [group for form in self.forms for group in form.param_groups(lr)]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def fold_back(model: onnx.ModelProto, student: Student) -> onnx.ModelProto:
    """A copy of ``model`` whose factor initializers hold the student's trained factors.

    Same nodes, names, shapes and dtypes: each pair's trained product is split back into two balanced
    factors (:meth:`onnxsvd.finetune.forms.CoreForm.fold`) and stored in the pair's orientation and dtype.
    """
    folded = copy.deepcopy(model)
    replacements: dict[str, onnx.TensorProto] = {}
    for pair, form in zip(student.pairs, student.forms, strict=True):
        a, b = form.fold()  # [K, r], [r, N]
        first, second = pair.stored(a, b)
        replacements[pair.a_tensor] = numpy_helper.from_array(first, pair.a_tensor)
        replacements[pair.b_tensor] = numpy_helper.from_array(second, pair.b_tensor)
    for tensor in folded.graph.initializer:
        replacement = replacements.get(tensor.name)
        if replacement is not None:
            tensor.CopyFrom(replacement)
    return folded
