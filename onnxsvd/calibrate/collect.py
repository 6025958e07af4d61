"""Running ONNX Runtime to collect activation statistics: augment the graph → run → accumulate.

Legend: T rows, K channels, B batch, S sequence.

Each distinct site activation is exposed as a graph output (the model's own outputs are dropped, so
ONNX Runtime runs only the nodes the activations need), once per activation even when several sites read
it (Q, K and V). Activations arrive one batch at a time and are folded into float64 sums at once; when
exposing them all in one run would hold too much memory, they are collected in groups, one run each.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from onnxsvd.calibrate.patches import DEFAULT_PATCH_ROWS, patch_rows
from onnxsvd.calibrate.stats import ActivationStats, StatsAccumulator, Workspace
from onnxsvd.config import PROVIDERS, Progress
from onnxsvd.errors import ProviderError
from onnxsvd.graph.match import ConvGeometry, GraphIndex, Site
from onnxsvd.io import is_lazy, temporary_model_path, tensor_bytes

__all__ = [
    "ActivationSpec",
    "specs_for_sites",
    "expose",
    "session_for",
    "collect",
    "collect_groups",
    "rows_of",
    "activation_rows",
    "find_mask_input",
]

log = logging.getLogger(__name__)


#: Default cap on the activation bytes one run may hold (per batch).
DEFAULT_GROUP_BYTES = 1 << 30

#: Input names taken as a token mask [B, S]: rows where it is 0 (padding) are left out of the statistics.
MASK_NAMES = ("attention_mask", "input_mask", "mask")


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """One activation to collect: the tensor, where its K channels are, its dtype, and its stats key.

    A Conv input's rows are its im2col ``patches`` (``channels`` = ``C·∏k``), at most ``max_rows`` per
    batch, sampled with ``seed`` past that (:func:`onnxsvd.calibrate.patches.patch_rows`).
    """

    tensor: str
    channel_axis: int
    channels: int
    elem_type: int
    key: str
    patches: ConvGeometry | None = None
    max_rows: int | None = DEFAULT_PATCH_ROWS
    seed: int = 0


def specs_for_sites(
    sites: Iterable[Site], patch_rows: int | None = DEFAULT_PATCH_ROWS, seed: int = 0
) -> list[ActivationSpec]:
    """One spec per distinct (activation, channel axis), or per Conv input and patch geometry, in graph
    order. ``patch_rows`` and ``seed``: the cap on a Conv input's patches per batch and its sampling."""
    specs: dict[str, ActivationSpec] = {}
    for site in sites:
        if site.statistics_key not in specs:
            channels = site.conv.patch_size if site.conv is not None else site.k
            specs[site.statistics_key] = ActivationSpec(
                site.activation, site.channel_axis, channels, site.weight.compute_dtype, site.statistics_key,
                site.conv, patch_rows, seed,
            )
    return list(specs.values())


def activation_rows(
    spec: ActivationSpec,
    activation: np.ndarray,
    mask: np.ndarray | None = None,
    workspace: Workspace | None = None,
    batch_index: int = 0,
) -> tuple[np.ndarray, int | None]:
    """``(rows [T, K], positions)`` of one batch of a spec's activation: :func:`rows_of`, or a Conv input's
    patches (``positions``: how many there were when a sample is kept, else ``None``). A batch's sample
    depends on the seed, the batch's index and its shape only, so two models' activations of one
    shape are sampled at the same positions."""
    if spec.patches is None:
        return rows_of(activation, spec.channel_axis, mask, workspace), None
    rows, positions = patch_rows(activation, spec.patches, spec.max_rows, seed=spec.seed * 1_000_003 + batch_index)
    return rows, (positions if positions > rows.shape[0] else None)


def expose(
    model: onnx.ModelProto, tensors: Sequence[tuple[str, int]], index: GraphIndex | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``tensors`` (name, elem type), pruned to the nodes
    they need (onnx-ir's use-def links, so what an If/Loop/Scan body reads from outside counts); only the
    initializers those nodes read are copied.

    Args:
        index: ``GraphIndex(model.graph)``, when the caller exposes several groups of one model.
    """
    index = index if index is not None else GraphIndex(model.graph)
    kept, needed = index.needed(name for name, _ in tensors)
    exposed = _without_initializers(model)
    nodes = [model.graph.node[position] for position in kept]  # copied in below
    del exposed.graph.output[:]
    graph_inputs = {value.name for value in exposed.graph.input}
    for name, elem_type in tensors:
        if name in graph_inputs:
            # A graph input cannot also be a graph output: pass it through an Identity.
            alias = f"{name}/onnxsvd_exposed"
            nodes.append(onnx.helper.make_node("Identity", [name], [alias]))
            name = alias
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    del exposed.graph.node[:]
    exposed.graph.node.extend(nodes)
    exposed.graph.initializer.extend(tensor for tensor in model.graph.initializer if tensor.name in needed)
    return exposed


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with everything but the graph's initializers (cheap: no weight bytes)."""
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(shell.graph, field.name, value)
    return shell


def _copy_field(target: object, name: str, value: object) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(target, name).CopyFrom(value)
    else:
        setattr(target, name, value)


def session_for(
    model: onnx.ModelProto | str,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    base_dir: str | None = None,
    spin: bool = True,
):
    """An ONNX Runtime session on the given providers (``"cpu"``, ``"cuda"``).

    With ``spin=False`` its idle threads sleep at once instead of spinning for more work: for callers
    that do their own heavy numpy work between runs, which spinning threads would slow down.

    A lazily loaded model (weights still on disk) is opened through a temporary file in ``base_dir``.

    Raises:
        ProviderError: a provider that this onnxruntime does not have.
    """
    import onnxruntime as ort  # the optional runtime (onnxsvd[cpu] or [gpu]), loaded by the runs that need it

    available = ort.get_available_providers()
    names = []
    for provider in providers:
        name = PROVIDERS.get(provider, provider)
        if name not in available:
            raise ProviderError(
                f"{provider} requested but this onnxruntime has no {name}; "
                "pip install 'onnxsvd[gpu]' on a machine with an NVIDIA GPU, or use --providers cpu"
            )
        names.append(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if isinstance(model, str):
        return ort.InferenceSession(model, options, providers=names)
    if is_lazy(model):
        with temporary_model_path(model, base_dir) as path:
            return ort.InferenceSession(path or model.SerializeToString(), options, providers=names)
    return _in_memory_session(model, options, names)


#: Initializers at least this large are handed to ONNX Runtime as arrays instead of protobuf bytes.
_SHARED_BYTES = 1024

#: Element types whose numpy arrays ONNX Runtime takes as OrtValues as they are.
_SHAREABLE = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
}


def _in_memory_session(model: onnx.ModelProto, options, providers: list[str]):
    """A session on an in-memory model without serializing its weights: the large initializers go to
    ONNX Runtime as arrays (``add_external_initializers``) and the protobuf it parses holds only stubs.

    Copying and serializing the weights, then parsing them back, took longer than a calibration batch.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    shell = _without_initializers(model)
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for tensor in model.graph.initializer:
        if (
            tensor.data_type in _SHAREABLE
            and tensor.data_location != onnx.TensorProto.EXTERNAL
            and len(tensor.raw_data) >= _SHARED_BYTES
        ):
            stub = onnx.TensorProto(
                name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                data_location=onnx.TensorProto.EXTERNAL,
            )
            stub.external_data.add(key="location", value="onnxsvd-in-memory")
            shell.graph.initializer.append(stub)
            names.append(tensor.name)
            arrays.append(np.ascontiguousarray(numpy_helper.to_array(tensor)))
        else:
            shell.graph.initializer.append(tensor)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(shell.SerializeToString(), options, providers=providers)
    # ONNX Runtime reads these buffers for the session's whole life.
    session._onnxsvd_initializers = (arrays, values)
    return session


def find_mask_input(model: onnx.ModelProto) -> str | None:
    """The name of a ``[B, S]`` integer token-mask input (``attention_mask``…), if the model has one."""
    for value in model.graph.input:
        if value.name in MASK_NAMES and len(value.type.tensor_type.shape.dim) == 2:
            return value.name
    return None


def rows_of(
    activation: np.ndarray,
    channel_axis: int,
    mask: np.ndarray | None = None,
    workspace: Workspace | None = None,
) -> np.ndarray:
    """The ``[T, K]`` rows of an activation read with its channels on ``channel_axis``.

    With a ``[B, S]`` ``mask`` whose shape matches the activation's leading dimensions, rows at mask 0
    (padding tokens, which the model's outputs ignore) are dropped; they are gathered into the
    ``workspace``'s buffer when one is given (valid until its next use), into a new array otherwise.
    """
    array = np.asarray(activation)
    if array.ndim == 1:
        return array.reshape(1, -1)
    if channel_axis != -1:
        array = np.moveaxis(array, channel_axis, -1)  # [..., K]
    if mask is not None and array.shape[:-1] == mask.shape:
        keep = np.flatnonzero(np.asarray(mask).reshape(-1))  # [T]
        flat = array.reshape(-1, array.shape[-1])  # [B·S, K]
        if workspace is None:
            return flat[keep]  # [T, K]
        rows = workspace.array(flat.dtype, keep.size, flat.shape[1])  # [T, K]
        return np.take(flat, keep, axis=0, out=rows, mode="clip")
    return array.reshape(-1, array.shape[-1])  # [T, K]


def _groups(specs: Sequence[ActivationSpec], rows_per_batch: int, budget: int) -> list[list[ActivationSpec]]:
    """Split the activations so one run holds at most ``budget`` bytes: a batch of each activation
    (float32 and its float64 copy) plus its float64 Gram accumulator ``K²``."""
    groups: list[list[ActivationSpec]] = [[]]
    used = 0
    for spec in specs:
        rows = min(rows_per_batch, spec.max_rows) if spec.patches is not None and spec.max_rows else rows_per_batch
        size = rows * spec.channels * 12 + spec.channels * spec.channels * 8
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += size
    return groups


def _rows_estimate(batch: Mapping[str, np.ndarray]) -> int:
    estimate = 1
    for array in batch.values():
        shape = np.shape(array)
        if np.issubdtype(np.asarray(array).dtype, np.floating):
            estimate = max(estimate, int(np.prod(shape[:-1])) if len(shape) > 1 else 1)
        else:
            estimate = max(estimate, int(np.prod(shape)))
    return estimate


def collect(
    model: onnx.ModelProto,
    specs: Sequence[ActivationSpec],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    providers: Sequence[str] = ("cpu",),
    mask_input: str | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: Progress | None = None,
    total_batches: int | None = None,
    base_dir: str | None = None,
    segment_bytes: int | None = None,
) -> dict[str, ActivationStats]:
    """Run ``model`` on every batch and accumulate each activation's statistics.

    Args:
        model: the model (not modified).
        specs: the activations to collect (from :func:`specs_for_sites`).
        batches: a callable returning a fresh iterable of input dicts (called once per group).
        providers: ONNX Runtime providers.
        mask_input: name of a ``[B, S]`` token-mask input whose 0 rows are left out.
        group_bytes: cap on the activation bytes one run returns per batch.
        progress: callback per batch.
        total_batches: for the progress bar.
        base_dir: the model's folder, for a lazily loaded model.
        segment_bytes: for a lazily loaded model, the weight bytes one ONNX Runtime session may hold (see
            :func:`collect_groups`); ``None``: a quarter of the model's weights, at least 256 MiB.

    Returns:
        Statistics per spec key.
    """
    results: dict[str, ActivationStats] = {}
    for group_results in collect_groups(
        model, specs, batches, providers, mask_input, group_bytes, progress, total_batches, base_dir, segment_bytes
    ):
        results.update(group_results)
    return results


def collect_groups(
    model: onnx.ModelProto,
    specs: Sequence[ActivationSpec],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    providers: Sequence[str] = ("cpu",),
    mask_input: str | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: Progress | None = None,
    total_batches: int | None = None,
    base_dir: str | None = None,
    segment_bytes: int | None = None,
) -> Iterator[dict[str, ActivationStats]]:
    """Like :func:`collect`, yielding each group's statistics as soon as its run is done, so a caller
    that writes them out holds one group at a time.

    A lazily loaded model (weights on disk) whose weights exceed ``segment_bytes`` is run in segments
    of consecutive nodes holding at most that many weight bytes each, one session at a time, every batch
    through one segment before the next: the tensors a later segment reads are kept per batch in a
    temporary folder, so memory holds one segment's weights, never the whole model's.
    """
    first = next(iter(batches()), None)
    if first is None:
        return
    rows = _rows_estimate(first)
    if is_lazy(model):
        total = sum(tensor_bytes(tensor) for tensor in model.graph.initializer)
        budget = segment_bytes if segment_bytes is not None else max(256 << 20, total // 4)
        plan = _segment_plan(model, specs, budget) if total > budget else None
        if plan is not None:
            # Gram accumulators get the same budget as a segment's weights, so the two together stay
            # within half the model.
            group_budget = min(group_bytes, budget)
            yield from _collect_segments(
                model, plan, batches, providers, mask_input, group_budget, rows, progress, total_batches, base_dir
            )
            return
    groups = _groups(specs, rows, group_bytes)
    if len(groups) > 1:
        log.info("collecting %d activations in %d groups to bound memory", len(specs), len(groups))
    done = 0
    total = total_batches * len(groups) if total_batches is not None else None
    index = GraphIndex(model.graph) if len(groups) > 1 else None
    for group in groups:
        tensors = list(dict.fromkeys((spec.tensor, spec.elem_type) for spec in group))
        exposed = expose(model, tensors, index)
        session = session_for(exposed, providers, base_dir=base_dir, spin=False)
        output_names = [output.name for output in exposed.graph.output]
        feed_names = {value.name for value in session.get_inputs()}
        accumulators = {spec.key: StatsAccumulator(spec.channels) for spec in group}
        workspace = Workspace()
        for batch_index, batch in enumerate(batches()):
            feed = {name: value for name, value in batch.items() if name in feed_names}
            values = dict(zip([name for name, _ in tensors], session.run(output_names, feed), strict=True))
            mask = batch.get(mask_input) if mask_input else None
            for spec in group:
                rows, positions = activation_rows(spec, values[spec.tensor], mask, workspace, batch_index)  # [T, K]
                accumulators[spec.key].update(rows, workspace, positions)
            del values
            done += 1
            if progress is not None:
                progress(done, total, f"{len(group)} activations")
        yield {key: accumulator.result(copy=False) for key, accumulator in accumulators.items()}
        del accumulators


@dataclasses.dataclass
class _Segment:
    """Consecutive nodes run by one session: what they read from outside (graph inputs and earlier
    segments' tensors), what later segments need from them, and the activations collected here."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    carry: list[str]
    specs: list[ActivationSpec]
    reads: set[str]


@dataclasses.dataclass
class _SegmentPlan:
    segments: list[_Segment]
    elem_types: dict[str, int]
    last_reader: dict[str, int]
    ids: dict[str, int]  # file names for the tensors kept between segments


def _segment_plan(model: onnx.ModelProto, specs: Sequence[ActivationSpec], budget: int) -> _SegmentPlan | None:
    """Cut the (topologically ordered) nodes into segments of at most ``budget`` weight bytes; ``None``
    when a tensor crossing a cut has no known type (the whole model then runs in one session)."""
    graph = model.graph
    reads = GraphIndex(graph).reads  # per node position: its inputs and its bodies' outer-scope reads
    sizes = {tensor.name: tensor_bytes(tensor) for tensor in graph.initializer}
    graph_inputs = [value.name for value in graph.input if value.name not in sizes]
    cuts: list[list[int]] = [[]]  # node positions
    held: set[str] = set()
    used = 0
    for position in range(len(graph.node)):
        weights = {name for name in reads[position] if name in sizes and name not in held}
        extra = sum(sizes[name] for name in weights)
        if cuts[-1] and used + extra > budget:
            cuts.append([])
            held, used = set(), 0
            weights = {name for name in reads[position] if name in sizes}
            extra = sum(sizes[name] for name in weights)
        cuts[-1].append(position)
        held |= weights
        used += extra
    if len(cuts) < 2:
        return None

    producer: dict[str, int] = {name: -1 for name in graph_inputs}  # graph inputs: before segment 0
    for index, positions in enumerate(cuts):
        for position in positions:
            producer.update({name: index for name in graph.node[position].output if name})
    last_reader: dict[str, int] = {}
    inputs: list[set[str]] = []
    segment_reads: list[set[str]] = []
    for index, positions in enumerate(cuts):
        local = {name for position in positions for name in graph.node[position].output}
        segment_reads.append(set().union(*(reads[position] for position in positions)))
        outside = segment_reads[-1] - local - set(sizes)
        inputs.append(outside)
        for name in outside:
            last_reader[name] = max(last_reader.get(name, -1), index)
    by_segment: dict[int, list[ActivationSpec]] = collections.defaultdict(list)
    for spec in specs:
        made = producer.get(spec.tensor, -1)
        if made < 0:  # a graph input: collected by the first segment that reads it
            made = next((i for i, names in enumerate(inputs) if spec.tensor in names), 0)
        by_segment[made].append(spec)

    elem_types = _elem_types(model)
    crossing = {name for names in inputs for name in names}
    if any(name not in elem_types for name in crossing):
        log.info("calibration runs the whole model in one session: a tensor between segments has no known type")
        return None
    segments = []
    for index, positions in enumerate(cuts):
        carry = sorted(
            name for name in crossing
            if producer.get(name) == index and last_reader.get(name, -1) > index
        )
        nodes = [graph.node[position] for position in positions]
        segments.append(
            _Segment(nodes, sorted(inputs[index]), carry, by_segment.get(index, []), segment_reads[index])
        )
    log.info("calibration runs the model in %d segments of at most %d MiB of weights", len(segments), budget >> 20)
    return _SegmentPlan(segments, elem_types, last_reader, {name: i for i, name in enumerate(sorted(crossing))})


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell (a lazy model is cheap to infer on)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 — inference is a best effort; unknown types turn segmenting off
        inferred = model
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        elem_type = value.type.tensor_type.elem_type
        if elem_type:
            types[value.name] = elem_type
    return types


def _segment_model(model: onnx.ModelProto, segment: _Segment, elem_types: Mapping[str, int]) -> onnx.ModelProto:
    """A model of the segment's nodes whose inputs are what they read from outside, with only their
    initializers (still on disk for a lazy model)."""
    shell = _without_initializers(model)
    graph = shell.graph
    del graph.node[:]
    graph.node.extend(segment.nodes)
    del graph.input[:]
    graph.input.extend(onnx.helper.make_tensor_value_info(name, elem_types[name], None) for name in segment.inputs)
    del graph.output[:]  # the caller exposes what it needs (the model's outputs are not made here)
    del graph.value_info[:]
    graph.initializer.extend(tensor for tensor in model.graph.initializer if tensor.name in segment.reads)
    return shell


def _collect_segments(
    model: onnx.ModelProto,
    plan: _SegmentPlan,
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    providers: Sequence[str],
    mask_input: str | None,
    group_bytes: int,
    rows: int,
    progress: Progress | None,
    total_batches: int | None,
    base_dir: str | None,
) -> Iterator[dict[str, ActivationStats]]:
    """Run the plan segment by segment (see :func:`collect_groups`)."""
    import tempfile
    from pathlib import Path

    passes = sum(max(1, len(_groups(segment.specs, rows, group_bytes))) for segment in plan.segments)
    total = total_batches * passes if total_batches is not None else None
    done = 0
    with tempfile.TemporaryDirectory(prefix="onnxsvd-calibrate-") as folder:
        store = Path(folder)

        def stored(batch_index: int, name: str) -> Path:
            return store / f"{batch_index}-{plan.ids[name]}.npy"

        for index, segment in enumerate(plan.segments):
            tensors = [(spec.tensor, spec.elem_type) for spec in segment.specs]
            tensors += [(name, plan.elem_types[name]) for name in segment.carry]
            tensors = list(dict.fromkeys(tensors))
            if not tensors:
                continue
            exposed = expose(_segment_model(model, segment, plan.elem_types), tensors)
            session = session_for(exposed, providers, base_dir=base_dir, spin=False)
            output_names = [output.name for output in exposed.graph.output]
            feed_names = [value.name for value in session.get_inputs()]
            groups = _groups(segment.specs, rows, group_bytes) if segment.specs else [[]]
            for group_index, group in enumerate(groups):
                accumulators = {spec.key: StatsAccumulator(spec.channels) for spec in group}
                workspace = Workspace()
                for batch_index, batch in enumerate(batches()):
                    feed = {
                        name: batch[name] if name in batch else np.load(stored(batch_index, name))
                        for name in feed_names
                    }
                    values = dict(zip([name for name, _ in tensors], session.run(output_names, feed), strict=True))
                    if group_index == 0:
                        for name in segment.carry:
                            np.save(stored(batch_index, name), values[name])
                    mask = batch.get(mask_input) if mask_input else None
                    for spec in group:
                        rows_seen, positions = activation_rows(
                            spec, values[spec.tensor], mask, workspace, batch_index
                        )  # [T, K]
                        accumulators[spec.key].update(rows_seen, workspace, positions)
                    del values, feed
                    done += 1
                    if progress is not None:
                        progress(done, total, f"segment {index + 1}/{len(plan.segments)}")
                if group:
                    yield {key: accumulator.result(copy=False) for key, accumulator in accumulators.items()}
                del accumulators
            del session
            for name, last in plan.last_reader.items():  # tensors no later segment reads
                if last == index:
                    for path in store.glob(f"*-{plan.ids[name]}.npy"):
                        path.unlink()
