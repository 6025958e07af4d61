"""Fine-tuning a rewritten model by distilling its original: teacher → split → Adam → best checkpoint → fold.

Legend: S samples, B a batch, T sequence positions (after trimming padding), D an output's other axes.

1. The teacher (the original model) runs once through ONNX Runtime on all the data; its float outputs are
   kept as targets. The rewritten model's own held-out loss is measured the same way (step 0).
2. The samples are split (``val_split`` held out, seeded). Each step takes a batch of training samples,
   runs the student (:class:`onnxsvd.finetune.student.Student`) in torch and minimises
   ``loss = mean over outputs of ‖student − teacher‖² / (elements · Var(teacher output))``, plus with
   ``relation_weight`` the relational term of the outputs without a sequence axis (``[B, D]``: the mean
   squared difference of the two ``[B, B]`` cosine-similarity matrices of the batch, over the variance of
   the teacher's similarities), plus with ``match_activations`` (the default) the outputs' term for every site output
   (teacher activations from the original run in torch on the same batch), weighted by
   ``activation_weight``.
3. Every ``eval_every`` steps the held-out loss (the outputs' and relational terms, not the activations')
   is measured; the best checkpoint is kept
   and training stops after ``patience`` evaluations without a relative improvement of ``min_delta``.
4. The best checkpoint is folded back into the rewritten graph (same nodes and shapes) and its held-out
   loss is measured again through ONNX Runtime; if it is not below the rewritten model's, the rewritten
   model is returned unchanged. The result is never worse on the held-out split than its start.

With a token-mask input (``attention_mask``…) whose sequence axis is symbolic, every batch is cut to its
longest sample, and padded positions of sequence-shaped outputs (those whose axis 1 has the mask's
symbolic sequence dimension) are left out of the loss: the exported model's values there are arbitrary.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.collect import session_for
from onnxsvd.data import InputData, load_inputs, model_inputs
from onnxsvd.errors import TORCH_CUDA_INSTALL_HINT, TORCH_INSTALL_HINT, DataError, ModelError, ProviderError, UsageError
from onnxsvd.finetune.config import FinetuneConfig
from onnxsvd.finetune.report import EvaluationPoint, FinetuneReport
from onnxsvd.finetune.sites import FactorPair, find_factor_pairs, require_records
from onnxsvd.graph.records import SOURCE_FINGERPRINT_KEY

__all__ = ["FinetuneResult", "TrainingProgress", "finetune", "finetune_file", "DataSource"]

log = logging.getLogger(__name__)

#: Called after every step with (step, total steps, recent training loss, latest held-out loss).
TrainingProgress = Callable[[int, int, float, float], None]

#: Data as a path (``.npz`` or folder), a checked source, one ``{input: array [S, ...]}`` mapping, or
#: an iterable of such batches.
DataSource = Union[  # noqa: UP007 - a runtime alias: ``X | Y`` of these types fails on Python 3.10
    str, os.PathLike, InputData, Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]
]

#: Runs a model on ``{input: array}`` and returns ``{output: array}``.
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

#: Makes a new batch of inputs from a batch, its mask ``[B, T]`` (or None) and a generator.
Augmenter = Callable[[dict[str, np.ndarray], "np.ndarray | None", np.random.Generator], dict[str, np.ndarray]]

_MASK_NAMES = ("attention_mask", "input_mask", "mask")

#: The cosine schedule ends at this fraction of the learning rate.
_FINAL_LR = 0.1


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned model (same graph as the rewritten one) and the report."""

    model: onnx.ModelProto
    report: FinetuneReport


# ---------------------------------------------------------------------------------------------------------
# Data


def _samples(data: Any, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All samples as ``{input name: array [S, ...]}``, checked against the model's inputs."""
    specs = model_inputs(model)
    if isinstance(data, (str, os.PathLike)):
        data = load_inputs(Path(data), model)
    if isinstance(data, Mapping):
        batches: list[Mapping[str, np.ndarray]] = [data]
    else:
        batches = list(data)
    if not batches:
        raise DataError("no data: give at least one batch of samples")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        parts = []
        for batch in batches:
            if spec.name not in batch:
                raise DataError(f"the data has no array for the model input {spec.name!r}; add it")
            parts.append(np.asarray(batch[spec.name]).astype(spec.dtype, copy=False))
        arrays[spec.name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"the inputs hold different numbers of samples on axis 0: {counts}")
    return arrays


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which inputs and outputs have a sequence axis 1 that padding may be trimmed from."""

    mask: str | None
    sequence_inputs: frozenset[str]
    sequence_outputs: frozenset[str]


def _axis1_symbol(value: onnx.ValueInfoProto) -> str | None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) < 2 or not dims[1].dim_param:
        return None
    return dims[1].dim_param


def _layout(model: onnx.ModelProto, trim: bool) -> _Layout:
    inputs = {value.name: value for value in model.graph.input}
    mask = next((name for name in _MASK_NAMES if name in inputs), None)
    symbol = _axis1_symbol(inputs[mask]) if mask is not None else None
    if not trim or mask is None or symbol is None:
        return _Layout(None, frozenset(), frozenset())
    sequence_inputs = frozenset(name for name, value in inputs.items() if _axis1_symbol(value) == symbol)
    sequence_outputs = frozenset(v.name for v in model.graph.output if _axis1_symbol(v) == symbol)
    return _Layout(mask, sequence_inputs, sequence_outputs)


# ---------------------------------------------------------------------------------------------------------
# Loss


class _Samples:
    """All samples, the teacher's outputs on them and their variances; batches cut to their longest sample.

    With a mask layout, each sample's length is its last unmasked position + 1: batches are grouped by
    length (so little compute goes to padding) and cut to their longest member.
    """

    def __init__(self, inputs: dict[str, np.ndarray], layout: _Layout) -> None:
        self.inputs = inputs
        self.layout = layout
        self.count = len(next(iter(inputs.values())))
        self.outputs: dict[str, np.ndarray] = {}
        self.variance: dict[str, float] = {}
        self.relation_variance: dict[str, float] = {}
        self.lengths: np.ndarray | None = None
        if layout.mask is not None:
            used = np.asarray(inputs[layout.mask]) != 0  # [S, L]
            last = used.shape[1] - np.argmax(used[:, ::-1], axis=1)  # [S] last unmasked position + 1
            self.lengths = np.where(used.any(axis=1), last, 1)

    def by_length(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` ordered by length (stable), so that consecutive samples make tight batches."""
        if self.lengths is None:
            return indices
        return indices[np.argsort(self.lengths[indices], kind="stable")]

    def epoch(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One pass over ``indices`` in shuffled batches; with lengths, batches of similar lengths.

        Samples are shuffled, cut into chunks of 16 batches, each chunk is sorted by length and cut into
        batches, and the batches are shuffled: every batch is still a random draw, with little padding.
        """
        shuffled = rng.permutation(indices)
        chunk = batch_size * (16 if self.lengths is not None else 1)
        batches: list[np.ndarray] = []
        for start in range(0, len(shuffled), chunk):
            part = self.by_length(shuffled[start : start + chunk])
            batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def feeds(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], int | None]:
        """The inputs of ``indices`` and the length they were cut to (None without a mask layout)."""
        feeds = {name: value[indices] for name, value in self.inputs.items()}
        if self.lengths is None:
            return feeds, None
        length = int(self.lengths[indices].max())
        for name in self.layout.sequence_inputs:
            feeds[name] = feeds[name][:, :length]
        return feeds, length

    def record_teacher(self, run: Runner, names: list[str], batch_size: int) -> None:
        """Run the teacher on every sample (in length-sorted batches) and keep ``names`` as targets."""
        ordered = self.by_length(np.arange(self.count))
        for start in range(0, self.count, batch_size):
            indices = ordered[start : start + batch_size]
            feeds, length = self.feeds(indices)
            outputs = run(feeds)
            for name in names:
                value = outputs[name]
                if name not in self.outputs:
                    shape = list(value.shape)
                    shape[0] = self.count
                    if length is not None and name in self.layout.sequence_outputs:
                        shape[1] = self.inputs[self.layout.mask].shape[1]
                    self.outputs[name] = np.zeros(shape, dtype=value.dtype)  # padded positions stay 0
                if length is not None and name in self.layout.sequence_outputs:
                    self.outputs[name][indices, :length] = value
                else:
                    self.outputs[name][indices] = value

    def token_augmenter(self, train_indices: np.ndarray, probability: float) -> Augmenter | None:
        """Replaces each real token of the integer sequence inputs with ``probability`` by a random token.

        Replacement tokens are drawn from the training samples' own tokens of that input (so ids stay in the
        vocabulary, and an input that is constant, like ``token_type_ids`` of single sentences, stays so).
        ``None`` without a mask layout or integer sequence inputs.
        """
        if self.layout.mask is None:
            return None
        used = np.asarray(self.inputs[self.layout.mask])[train_indices] != 0  # [S_train, L]
        pools = {
            name: np.asarray(self.inputs[name])[train_indices][used]  # [tokens]
            for name in sorted(self.layout.sequence_inputs - {self.layout.mask})
            if np.issubdtype(self.inputs[name].dtype, np.integer)
        }
        if not pools:
            return None

        def augment(feeds: dict[str, np.ndarray], mask: np.ndarray | None, rng: np.random.Generator) -> dict:
            changed = dict(feeds)
            real = mask != 0 if mask is not None else None
            for name, pool in pools.items():
                value = feeds[name]
                replace = rng.random(value.shape) < probability  # [B, T]
                if real is not None:
                    replace &= real
                changed[name] = np.where(replace, pool[rng.integers(0, len(pool), size=value.shape)], value)
            return changed

        return augment

    def measure_variance(self, train_indices: np.ndarray) -> None:
        """Per output, the variance of the teacher's values over the training samples (real positions only)."""
        mask = self.inputs[self.layout.mask][train_indices] if self.layout.mask is not None else None
        for name, value in self.outputs.items():
            picked = value[train_indices].astype(np.float64)  # [S_train, ...]
            if mask is not None and name in self.layout.sequence_outputs:
                picked = picked[mask != 0]  # [rows, D]
            variance = float(np.var(picked)) if picked.size else 0.0
            self.variance[name] = variance if variance > 0.0 and math.isfinite(variance) else 1.0

    def relational(self) -> list[str]:
        """Outputs that the relational term applies to: no sequence axis, more than one value per sample."""
        return [name for name, value in self.outputs.items()
                if name not in self.layout.sequence_outputs and value.ndim >= 2 and math.prod(value.shape[1:]) > 1]

    def measure_relation_variance(self, train_indices: np.ndarray, names: list[str], limit: int = 1024) -> None:
        """Per output, the variance of the teacher's pairwise cosine similarities (up to ``limit`` samples)."""
        picked = np.sort(train_indices)[:limit]
        for name in names:
            value = self.outputs[name][picked].reshape(len(picked), -1).astype(np.float64)  # [n, D]
            unit = value / np.maximum(np.linalg.norm(value, axis=1, keepdims=True), 1e-12)
            similarity = unit @ unit.T  # [n, n]
            off_diagonal = similarity[~np.eye(len(picked), dtype=bool)]
            variance = float(np.var(off_diagonal)) if off_diagonal.size else 0.0
            self.relation_variance[name] = variance if variance > 0.0 and math.isfinite(variance) else 1.0

    def batch(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
        """(inputs, teacher outputs, mask ``[B, T]`` or None) of ``indices``, trailing padding cut."""
        feeds, length = self.feeds(indices)
        targets = {name: value[indices] for name, value in self.outputs.items()}
        if length is None:
            return feeds, targets, None
        for name in self.layout.sequence_outputs:
            if name in targets:
                targets[name] = targets[name][:, :length]
        return feeds, targets, self.inputs[self.layout.mask][indices, :length]


def _squared_error(prediction: Any, target: Any, weight: Any | None) -> tuple[Any, float]:
    """(Σ weighted squared error, element count) of one tensor; ``weight`` ``[B, T]`` masks positions."""
    import torch

    difference = (prediction.float() - target.float()) ** 2  # [B, ...]
    if weight is None or tuple(difference.shape[:2]) != tuple(weight.shape):
        return difference.sum(), float(difference.numel())
    mask = weight.reshape(*weight.shape, *([1] * (difference.dim() - 2))).to(difference.dtype)  # [B, T, 1...]
    per_position = math.prod(difference.shape[2:])
    return (difference * mask).sum(), float(torch.sum(weight != 0).item()) * per_position


def _relation_error(prediction: Any, target: Any) -> tuple[Any, float]:
    """(Σ squared difference of the batch's pairwise cosine similarities, pair count); ``[B, ...]`` tensors."""
    import torch

    student = torch.nn.functional.normalize(prediction.float().flatten(1), dim=1)  # [B, D]
    teacher = torch.nn.functional.normalize(target.float().flatten(1), dim=1)  # [B, D]
    difference = (student @ student.T - teacher @ teacher.T) ** 2  # [B, B]
    count = student.shape[0] * (student.shape[0] - 1)
    return difference.sum() - difference.diagonal().sum(), float(count)


# ---------------------------------------------------------------------------------------------------------
# The teacher and ONNX Runtime


def _ort_runner(model: onnx.ModelProto, threads: int | None) -> Runner:
    session = session_for(model, threads=threads)
    names = [output.name for output in session.get_outputs()]
    input_names = {value.name for value in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = session.run(names, {name: value for name, value in feeds.items() if name in input_names})
        return dict(zip(names, values, strict=True))

    return run


def _distilled_outputs(rewritten: onnx.ModelProto, teacher: onnx.ModelProto, wanted: tuple[str, ...] = ()) -> list[str]:
    """Float outputs that both models have, by name: all of them, or those of ``wanted`` in its order."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    teacher_outputs = {value.name: value.type.tensor_type.elem_type for value in teacher.graph.output}
    names = [v.name for v in rewritten.graph.output if teacher_outputs.get(v.name) in floats]
    if not names:
        raise ModelError(
            "the rewritten model and the teacher share no float output by name; pass the original model the "
            "rewritten one was made from as --teacher"
        )
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise UsageError(
            f"--outputs {', '.join(unknown)}: not a float output of both models; choose from {', '.join(names)}"
        )
    return list(dict.fromkeys(wanted)) if wanted else names


_Signature = dict[str, tuple[int, tuple[int | None, ...] | None]]


def _signature(model: onnx.ModelProto, values: Iterable[onnx.ValueInfoProto]) -> _Signature:
    """``{name: (element type, dims)}`` of graph inputs or outputs; a dim is its size, or None when symbolic;
    dims are None when the value declares no shape. Initializers listed as inputs are left out."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    signature: _Signature = {}
    for value in values:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
        signature[value.name] = (tensor.elem_type, dims)
    return signature


def _describe(entry: tuple[int, tuple[int | None, ...] | None]) -> str:
    elem_type, dims = entry
    name = onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"
    if dims is None:
        return f"{name} (no shape)"
    return f"{name} [{', '.join('?' if dim is None else str(dim) for dim in dims)}]"


def _signature_differences(kind: str, ours: _Signature, theirs: _Signature) -> list[str]:
    """What differs between the rewritten model's (``ours``) and the teacher's inputs or outputs."""
    differences = []
    missing, extra = [n for n in ours if n not in theirs], [n for n in theirs if n not in ours]
    if missing:
        differences.append(f"the teacher has no {kind} {', '.join(map(repr, missing))}")
    if extra:
        differences.append(f"the teacher has the {kind} {', '.join(map(repr, extra))}, the rewritten model has not")
    for name in (n for n in ours if n in theirs):
        (our_type, our_dims), (their_type, their_dims) = ours[name], theirs[name]
        same = our_type == their_type
        if same and our_dims is not None and their_dims is not None:
            same = len(our_dims) == len(their_dims) and all(
                a is None or b is None or a == b for a, b in zip(our_dims, their_dims, strict=True)
            )
        if not same:
            differences.append(
                f"{kind} {name!r} is {_describe(theirs[name])} in the teacher, {_describe(ours[name])} in the "
                "rewritten model"
            )
    return differences


def _check_teacher(rewritten: onnx.ModelProto, teacher: onnx.ModelProto, config: FinetuneConfig) -> list[str]:
    """Refuse a teacher that is not the rewritten model's original; returns the report's notes.

    The graph inputs and outputs must match by name, element type, rank and static dims (symbolic dims
    match anything); then, when the rewritten model records its source's fingerprint, the teacher's must
    equal it unless ``config.allow_other_teacher``.

    Raises:
        ModelError: the first check fails, or the fingerprints differ without ``allow_other_teacher``.
    """
    differences = _signature_differences(
        "input", _signature(rewritten, rewritten.graph.input), _signature(teacher, teacher.graph.input)
    ) + _signature_differences(
        "output", _signature(rewritten, rewritten.graph.output), _signature(teacher, teacher.graph.output)
    )
    if differences:
        raise ModelError(
            f"the teacher's inputs and outputs differ from the rewritten model's ({'; '.join(differences)}); pass "
            "the original model the rewritten one was made from as --teacher"
        )
    recorded = {prop.key: prop.value for prop in rewritten.metadata_props}.get(SOURCE_FINGERPRINT_KEY)
    if recorded is None:
        return [f"the rewritten model records no source fingerprint ({SOURCE_FINGERPRINT_KEY}); the teacher was "
                "checked by its inputs and outputs only"]
    actual = io.fingerprint(teacher)
    if actual == recorded:
        return []
    if not config.allow_other_teacher:
        raise ModelError(
            f"the teacher is not the model the rewritten one was made from (its fingerprint is {actual}, the "
            f"rewritten model records {recorded}); pass that model as --teacher, or --allow-other-teacher to "
            "distil from another model with the same inputs and outputs on purpose"
        )
    return [f"the teacher (fingerprint {actual}) is not the model the rewritten one was made from ({recorded}); "
            "distilled from it as --allow-other-teacher asks"]


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ProviderError(
            "--device cuda requested but torch sees no CUDA device (torch.cuda.is_available() is False); "
            f"{TORCH_CUDA_INSTALL_HINT}, or use --device cpu"
        )
    return torch.device(name)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UsageError(f"finetune needs torch: {TORCH_INSTALL_HINT}") from error
    return torch


# ---------------------------------------------------------------------------------------------------------
# Training


def finetune(
    rewritten: onnx.ModelProto,
    teacher: onnx.ModelProto,
    data: DataSource,
    config: FinetuneConfig | None = None,
    progress: TrainingProgress | None = None,
) -> FinetuneResult:
    """Distil ``teacher`` into the factor pairs of ``rewritten`` and fold the result back.

    Args:
        rewritten: a model from ``onnxsvd rewrite`` (not modified).
        teacher: the original model (not modified).
        data: samples (see :data:`DataSource`); split into training and held-out parts.
        config: options (defaults: :class:`FinetuneConfig`).
        progress: called after every step.

    Returns:
        The fine-tuned model (same nodes, names, shapes and dtypes as ``rewritten``) and its report.

    Raises:
        UsageError: ``rewritten`` is not an onnxsvd rewrite, or too few samples to split.
        ModelError: ``rewritten`` carries no chain records (an older onnxsvd), or none of its chains can be
            trained; a teacher whose inputs or outputs differ from ``rewritten``'s, or (without
            ``config.allow_other_teacher``) whose fingerprint is not the one ``rewritten`` records.
        UnsupportedOpError: an op the torch evaluator cannot run (one line naming it).
        ProviderError: ``device="cuda"`` where torch has no CUDA.
        DataError: data that does not fit the model.
    """
    config = config or FinetuneConfig()
    torch = _import_torch()
    # These import torch at their top: loaded once _import_torch has said how to install it if missing.
    from onnxsvd.finetune.student import Student, fold_back
    from onnxsvd.finetune.torch_graph import TorchGraph, check_supported

    device = _device(config.device)
    require_records(rewritten)
    pairs, skips = find_factor_pairs(rewritten)
    if not pairs:
        reasons = "; ".join(f"{skip.site}: {skip.reason}" for skip in skips[:3]) + ("; …" if len(skips) > 3 else "")
        reasons = reasons or "no node records the role 'first' or 'second'"
        raise ModelError(
            f"none of the model's recorded factor chains can be trained ({reasons}); re-run 'onnxsvd rewrite' on "
            "the original model and fine-tune its output as it is written"
        )
    check_supported(rewritten)
    notes: list[str] = _check_teacher(rewritten, teacher, config)
    output_names = _distilled_outputs(rewritten, teacher, config.outputs)
    matched = _matched_activations(pairs, teacher) if config.match_activations else []
    if config.match_activations:
        chains = sum(len(pair.outputs) for pair in pairs)
        if len(matched) < chains:
            notes.append(
                f"--match-activations: the teacher computes {len(matched)} of the {chains} chains' outputs under "
                "the same name (the stages layout writes each stage's own output); "
                + ("trained on the model outputs alone" if not matched else "the others are not matched")
            )
    if matched:
        check_supported(teacher)
    inputs = _samples(data, rewritten)
    count = len(next(iter(inputs.values())))
    heldout_count = int(round(config.val_split * count))
    if count < 2 or heldout_count < 1 or heldout_count >= count:
        raise UsageError(
            f"{count} samples cannot be split with --val-split {config.val_split:g}; give more data "
            "(at least one training and one held-out sample)"
        )

    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        order = np.random.default_rng(config.seed)
        permutation = order.permutation(count)
        targets = _Samples(inputs, _layout(rewritten, config.trim_padding))
        heldout = targets.by_length(np.sort(permutation[:heldout_count]))
        training = permutation[heldout_count:]

        started = time.perf_counter()
        teacher_run = _ort_runner(teacher, config.threads)
        targets.record_teacher(teacher_run, output_names, config.eval_batch_size)
        targets.measure_variance(training)
        relational = targets.relational() if config.relation_weight > 0.0 else []
        if config.relation_weight > 0.0 and not relational:
            notes.append("--relation-weight needs an output without a sequence axis (like a pooled embedding); "
                         "trained without it")
        targets.measure_relation_variance(training, relational)
        teacher_seconds = time.perf_counter() - started

        def ort_heldout(model: onnx.ModelProto) -> float:
            run = _ort_runner(model, config.threads)
            return _heldout_loss(lambda feeds: {k: torch.from_numpy(v) for k, v in run(feeds).items()},
                                 targets, heldout, output_names, relational, config, torch)

        heldout_before = ort_heldout(rewritten)
        student = Student(rewritten, pairs, config.train, config.lora_rank, generator).to(device)
        teacher_graph = TorchGraph(teacher).to(device) if matched else None
        optimizer = torch.optim.Adam(student.param_groups(config.lr))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: _lr_factor(done, config))

        def student_heldout() -> float:
            student.eval()
            with torch.no_grad():
                return _heldout_loss(
                    lambda feeds: student(_to_torch(feeds, device, torch), outputs=output_names),
                    targets, heldout, output_names, relational, config, torch,
                )

        train_started = time.perf_counter()
        initial = student_heldout()
        history = [EvaluationPoint(0, None, initial, time.perf_counter() - train_started)]
        best_loss, best_step = initial, 0
        best_state = copy.deepcopy(student.forms.state_dict())
        stale, steps_run, stopped_early = 0, 0, False
        window: list[float] = []
        augment = targets.token_augmenter(training, config.augment) if config.augment > 0.0 else None
        if config.augment > 0.0 and augment is None:
            notes.append("--augment needs integer token inputs beside a token mask; trained without it")
        batches: list[np.ndarray] = []
        for step in range(1, config.steps + 1):
            if not batches:
                batches = targets.epoch(training, config.batch_size, order)
            feeds, wanted, mask = targets.batch(batches.pop())
            if augment is not None:
                feeds = augment(feeds, mask, order)
                fresh = teacher_run(feeds)
                wanted = {name: fresh[name] for name in output_names}
            student.train()
            loss = _training_loss(student, teacher_graph, feeds, wanted, mask, output_names, relational, matched,
                                  targets, config, device, torch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps_run = step
            window.append(float(loss.item()))
            if step % config.eval_every == 0 or step == config.steps:
                current = student_heldout()
                train_loss = float(np.mean(window)) if window else float("nan")
                history.append(EvaluationPoint(step, train_loss, current, time.perf_counter() - train_started))
                log.info("step %d: train %.5f, held-out %.5f", step, train_loss, current)
                window = []
                if current < best_loss * (1.0 - config.min_delta):
                    best_loss, best_step, stale = current, step, 0
                    best_state = copy.deepcopy(student.forms.state_dict())
                else:
                    stale += 1
                    if math.isfinite(current) and current < best_loss:
                        best_loss, best_step = current, step
                        best_state = copy.deepcopy(student.forms.state_dict())
            if progress is not None:
                progress(step, config.steps, window[-1] if window else history[-1].train_loss or float("nan"),
                         history[-1].heldout_loss)
            if stale >= config.patience:
                stopped_early = True
                break
        train_seconds = time.perf_counter() - train_started

        result_model = copy.deepcopy(rewritten)
        heldout_after = heldout_before
        if best_step > 0:
            student.forms.load_state_dict(best_state)
            folded = fold_back(rewritten, student.cpu())
            folded_loss = ort_heldout(folded)
            if folded_loss < heldout_before:
                result_model, heldout_after = folded, folded_loss
            else:
                best_step = 0
                notes.append("the folded checkpoint was not better through ONNX Runtime; the rewritten model is "
                             "returned unchanged")
        else:
            notes.append("no checkpoint beat the rewritten model on the held-out split; it is returned unchanged")
        _stamp(result_model, config, best_step)
    finally:
        torch.set_num_threads(threads_before)

    report = FinetuneReport(
        train=config.train,
        config=dataclasses.asdict(config),
        pairs=len(pairs),
        sites=[site for pair in pairs for site in pair.sites],
        skipped={skip.site: skip.reason for skip in skips},
        trainable_parameters=student.trainable_parameters(),
        train_samples=len(training),
        heldout_samples=len(heldout),
        outputs=output_names,
        matched_activations=matched,
        heldout_before=heldout_before,
        heldout_after=heldout_after,
        best_step=best_step,
        steps_run=steps_run,
        stopped_early=stopped_early,
        history=history,
        teacher_seconds=teacher_seconds,
        train_seconds=train_seconds,
        device=config.device,
        notes=notes,
    )
    log.info("fine-tuned %d factor pairs (%s): held-out loss %.5f → %.5f in %d steps", len(pairs), config.train,
             heldout_before, heldout_after, steps_run)
    return FinetuneResult(result_model, report)


def _lr_factor(done: int, config: FinetuneConfig) -> float:
    """The learning rate's multiplier after ``done`` steps: linear warm-up, then constant or cosine decay."""
    warmup = min(config.warmup_steps, config.steps)
    if done < warmup:
        return (done + 1) / (warmup + 1)
    if config.schedule == "constant" or config.steps <= warmup:
        return 1.0
    progress = min(1.0, (done - warmup) / (config.steps - warmup))
    return _FINAL_LR + (1.0 - _FINAL_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _to_torch(arrays: Mapping[str, np.ndarray], device: Any, torch: Any) -> dict[str, Any]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)).to(device) for name, value in arrays.items()}


def _matched_activations(pairs: list[FactorPair], teacher: onnx.ModelProto) -> list[str]:
    """Site outputs that the teacher computes under the same name.

    A chain's output is the site's when the chain replaces the layer; a correction branch of a quantized
    base writes only its own term, so there the output of the teacher's node of the site's name is matched
    (the rewrite writes the site's output under that name, base and branch summed).
    """
    produced = {name for node in teacher.graph.node for name in node.output}
    by_node = {node.name: node.output[0] for node in teacher.graph.node if node.name and node.output}
    matched: list[str] = []
    for pair in pairs:
        for label, name in zip(pair.sites, pair.outputs, strict=True):
            if name in produced:
                matched.append(name)
            elif label in by_node and pair.corrects:
                matched.append(by_node[label])
    return matched


def _training_loss(student: Any, teacher_graph: Any, feeds: dict[str, np.ndarray], wanted: dict[str, np.ndarray],
                   mask: np.ndarray | None, output_names: list[str], relational: list[str], matched: list[str],
                   targets: _Samples, config: FinetuneConfig, device: Any, torch: Any) -> Any:
    tensors = _to_torch(feeds, device, torch)
    weight = torch.from_numpy(mask).to(device) if mask is not None else None
    outputs = student(tensors, outputs=output_names + matched)
    terms = []
    for name in output_names:
        total, count = _squared_error(outputs[name], torch.from_numpy(wanted[name]).to(device), weight)
        terms.append(total / max(count, 1.0) / targets.variance[name])
    loss = torch.stack(terms).mean()
    relations = []
    for name in relational:
        total, count = _relation_error(outputs[name], torch.from_numpy(wanted[name]).to(device))
        if count > 0:
            relations.append(total / count / targets.relation_variance[name])
    if relations:
        loss = loss + config.relation_weight * torch.stack(relations).mean()
    if matched and teacher_graph is not None and config.activation_weight > 0.0:
        with torch.no_grad():
            reference = teacher_graph(tensors, outputs=matched)
        parts = []
        for name in matched:
            target = reference[name]
            variance = float(target.float().var().item()) or 1.0
            total, count = _squared_error(outputs[name], target, weight)
            parts.append(total / max(count, 1.0) / variance)
        loss = loss + config.activation_weight * torch.stack(parts).mean()
    return loss


def _heldout_loss(run: Callable[[dict[str, np.ndarray]], Mapping[str, Any]], targets: _Samples, heldout: np.ndarray,
                  output_names: list[str], relational: list[str], config: FinetuneConfig, torch: Any) -> float:
    """The outputs' (and relational) distillation loss over the whole held-out split.

    Sums over all batches before dividing (exact, not a mean of batch means). The relational term compares
    similarities within each batch of ``eval_batch_size`` held-out samples.
    """
    sums = dict.fromkeys(output_names, 0.0)
    counts = dict.fromkeys(output_names, 0.0)
    relation_sums = dict.fromkeys(relational, 0.0)
    relation_counts = dict.fromkeys(relational, 0.0)
    for start in range(0, len(heldout), config.eval_batch_size):
        feeds, wanted, mask = targets.batch(heldout[start : start + config.eval_batch_size])
        outputs = run(feeds)
        weight = torch.from_numpy(mask) if mask is not None else None
        for name in output_names:
            prediction = outputs[name].detach().cpu()
            total, count = _squared_error(prediction, torch.from_numpy(wanted[name]), weight)
            sums[name] += float(total.item())
            counts[name] += count
        for name in relational:
            total, count = _relation_error(outputs[name].detach().cpu(), torch.from_numpy(wanted[name]))
            relation_sums[name] += float(total.item())
            relation_counts[name] += count
    loss = float(np.mean([sums[name] / max(counts[name], 1.0) / targets.variance[name] for name in output_names]))
    relations = [relation_sums[name] / relation_counts[name] / targets.relation_variance[name]
                 for name in relational if relation_counts[name] > 0]
    if relations:
        loss += config.relation_weight * float(np.mean(relations))
    return loss


def _stamp(model: onnx.ModelProto, config: FinetuneConfig, best_step: int) -> None:
    value = f"{config.train}, lr {config.lr:g}, best step {best_step}" if best_step else "no improvement; unchanged"
    existing = {prop.key: prop for prop in model.metadata_props}
    if "onnxsvd.finetune" in existing:
        existing["onnxsvd.finetune"].value = value
    else:
        model.metadata_props.add(key="onnxsvd.finetune", value=value)


def finetune_file(
    rewritten_path: str | os.PathLike[str],
    teacher_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    force: bool = False,
    progress: TrainingProgress | None = None,
) -> FinetuneReport:
    """Load both models, check the data and the output path before any work, fine-tune, check, save atomically.

    Raises:
        ModelError, OutputError, DataError, UsageError, UnsupportedOpError, ProviderError.
    """
    config = config or FinetuneConfig()
    io.check_outputs(
        {"-o": output_path},
        {"rewritten": rewritten_path, "--teacher": teacher_path, "--data": data_path},
        forceable=("-o=rewritten", "-o=--teacher"),
        force=force,
    )
    io.check_output_path(output_path, rewritten_path, force)
    io.check_output_path(output_path, teacher_path, force)
    rewritten = io.load_model(rewritten_path)
    teacher = io.load_model(teacher_path)
    data = load_inputs(Path(data_path), rewritten)
    result = finetune(rewritten, teacher, data, config, progress)
    io.check_model(result.model, full_check=True)
    io.save_model(result.model, output_path)
    return result.report
