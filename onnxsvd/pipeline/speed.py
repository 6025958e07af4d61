"""Is each factor chain faster than the layer it replaces? Timing of single sites, dense against factorized.

Legend: K input and N output channels of a site (``Y = X [.., K] · W [K, N]``), r the rank of its chain.

Low rank only pays when ``r`` is well under the break-even rank and the second kernel launch is amortised
(see DESIGN, "No speedup reports"), and where that line falls depends on the execution provider, the
activation shape and the thread count. So after the factors are chosen and before they are emitted, every
factorized site is timed on its own, on the target provider, in two tiny standalone models built from it:

- the *dense* form: the original MatMul/Gemm (its attributes and bias) reading its weight as an
  initializer, exactly as the node consumed it;
- the *factorized* form: that model rewritten by the real emitter (:func:`onnxsvd.graph.emit`), so the
  chain timed is the chain that would be written (Cast nodes, Gemm forms and layout included).

Both are fed one random activation of the site's real shape, taken from one batch of data pushed
through ONNX shape inference (or through ONNX Runtime when inference leaves a dimension unknown), or
from declared input shapes. They are timed alternately (dense, factorized, dense, …) after a warm-up, and
the medians are compared; a site whose chain is not faster keeps its dense weight, with the numbers in
the report. Sites with the same shapes, ranks and attributes are timed once.

With ``--quantize`` the question is another: the quantized layer is the site's form either way, and
what the check times is the correction branch's cost on top of it. Each corrected site is timed, in the
same way, as its quantized layer alone (the ``MatMulNBits`` that ``rewrite`` writes, without the branch)
against the corrected site as it would be written (unfused or fused branch); a correction that makes the
site more than ``max_branch_cost`` slower than its quantized layer alone is dropped, the site keeping
its quantized base, and both times are in the report (:meth:`SiteSpeedCheck.check_corrections`). The
site is never put back to its dense float weight: ``--quantize`` asked for its bytes.

Library use::

    from onnxsvd.pipeline.speed import SiteSpeedCheck, SpeedCheckConfig
    check = SiteSpeedCheck(SpeedCheckConfig(providers=("cpu",), input_shapes={"x": (32, 64)}))
    result = onnxsvd.rewrite(model, config, speed_check=check)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsvd import io
from onnxsvd.calibrate.collect import expose, session_for
from onnxsvd.config import Progress, check_provider_names
from onnxsvd.data import model_inputs
from onnxsvd.errors import DataError, UsageError
from onnxsvd.factorize import Factorization
from onnxsvd.graph import (
    EmitOptions,
    GraphIndex,
    QuantizedGroup,
    Site,
    activation_ranks,
    conv_site_in_form,
    emit,
    emit_quantized,
    find_sites,
    load_weight,
)
from onnxsvd.graph.match import conv_kernel
from onnxsvd.pipeline.group import GroupOutcome
from onnxsvd.validate.latency import check_providers, make_runner, open_session, time_runners

__all__ = [
    "SHAPE_HINT",
    "SpeedCheckConfig",
    "SiteTiming",
    "SiteSpeedCheck",
    "parse_shape",
    "activation_shapes",
    "site_models",
    "quantized_site_models",
    "time_site",
]

log = logging.getLogger(__name__)

#: What to tell a user who asked for the check without saying how large the activations are.
SHAPE_HINT = (
    "--keep-dense-if-slower times each site on activations of the real shape: pass --data DATA (a calibration "
    "batch gives the shapes) or --shape NAME=d0,d1,... for every model input (e.g. --shape input_ids=32,64)"
)

#: Shortest timed sample: faster kernels are repeated within one sample so the clock's resolution and
#: Python's call overhead do not decide the comparison.
_MIN_SAMPLE_SECONDS = 1e-3
_MAX_REPEATS = 200


@dataclasses.dataclass(frozen=True)
class SpeedCheckConfig:
    """How sites are timed, dense against factorized. Every default is here.

    Attributes:
        providers: ``"cpu"`` and/or ``"cuda"``; a site keeps its chain only if it is faster on each.
        input_shapes: declared shape of every model input (``{"input_ids": (32, 64)}``); when empty, the
            shapes of a data batch are used (see :class:`SiteSpeedCheck`).
        warmup: untimed runs of each form first.
        iters: timed samples of each form (the median is compared).
        threads: onnxruntime ``intra_op_num_threads`` (``None``: onnxruntime's default).
        min_speedup: keep the chain only when ``dense / factorized`` median time is above this.
        max_branch_cost: with ``--quantize``, keep a site's correction only while the corrected site's median
            time is at most ``1 + max_branch_cost`` times that of its quantized layer alone (the same
            MatMulNBits without the branch); 0.10 is issue 12's target for the whole model.
        seed: seed of the random activations.
    """

    providers: tuple[str, ...] = ("cpu",)
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    warmup: int = 5
    iters: int = 30
    threads: int | None = None
    min_speedup: float = 1.0
    max_branch_cost: float = 0.10
    seed: int = 0

    def __post_init__(self) -> None:
        check_provider_names(self.providers)
        if self.warmup < 0:
            raise UsageError(f"the speed check's warm-up must be 0 or more, got {self.warmup}")
        if self.iters < 1:
            raise UsageError(f"the speed check needs at least 1 timed run, got {self.iters}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if not self.min_speedup > 0:
            raise UsageError(f"the minimum speedup must be positive, got {self.min_speedup:g}")
        if not self.max_branch_cost >= 0:
            raise UsageError(f"--max-branch-cost must be 0 or more, got {self.max_branch_cost:g}")
        for name, shape in self.input_shapes.items():
            if not shape or any(int(dim) < 1 for dim in shape):
                raise UsageError(f"--shape {name}: every dimension must be a positive integer, got {list(shape)}")
        shapes = {name: tuple(int(dim) for dim in shape) for name, shape in self.input_shapes.items()}
        object.__setattr__(self, "input_shapes", shapes)


@dataclasses.dataclass(frozen=True)
class SiteTiming:
    """Median time of one site's two forms on one provider.

    Attributes:
        provider: ``"cpu"`` or ``"cuda"``.
        dense_ms: median of the dense MatMul/Gemm.
        factorized_ms: median of the factor chain.
        activation_shape: the shape of the activation both were fed.
        iters: timed samples of each.
        repeats: runs per sample (fast kernels are repeated within a sample).
    """

    provider: str
    dense_ms: float
    factorized_ms: float
    activation_shape: tuple[int, ...]
    iters: int
    repeats: int = 1

    @property
    def speedup(self) -> float:
        """``dense / factorized``: above 1 when the chain is faster."""
        return self.dense_ms / self.factorized_ms if self.factorized_ms > 0 else math.inf

    def describe(self) -> str:
        """``"1.31× slower than dense on cpu (0.42 ms vs 0.32 ms)"``-style text."""
        numbers = f"on {self.provider} ({self.factorized_ms:.3g} ms vs {self.dense_ms:.3g} ms)"
        if self.speedup > 1.0:
            return f"{self.speedup:.2f}× faster than dense {numbers}"
        slower = self.factorized_ms / self.dense_ms if self.dense_ms > 0 else math.inf
        return f"{slower:.2f}× slower than dense {numbers}"


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input_ids=32,64"`` → ``("input_ids", (32, 64))``.

    Raises:
        UsageError: not ``NAME=d0,d1,...`` with positive integers.
    """
    name, separator, dims = text.partition("=")
    try:
        shape = tuple(int(part) for part in dims.split(",") if part.strip())
    except ValueError:
        shape = ()
    if not separator or not name.strip() or not shape or any(dim < 1 for dim in shape):
        raise UsageError(f"--shape takes NAME=d0,d1,... with positive integers (e.g. input_ids=32,64), got {text!r}")
    return name.strip(), shape


# ---------------------------------------------------------------- activation shapes


def _fixed_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` (initializer data left out) whose graph inputs have the given fixed shapes.

    Raises:
        UsageError: a name that is not an input, a missing input, a rank or a fixed dimension that differs.
    """

    specs = {spec.name: spec for spec in model_inputs(model)}
    unknown = sorted(set(shapes) - set(specs))
    if unknown:
        raise UsageError(f"--shape {unknown[0]}: the model has no input of that name; its inputs are {sorted(specs)}")
    missing = sorted(set(specs) - set(shapes))
    if missing:
        raise UsageError(f"--shape gives no shape for model input {missing[0]!r}; give one for each of {sorted(specs)}")
    for name, shape in shapes.items():
        declared = specs[name].shape
        if declared is None:
            continue
        if len(declared) != len(shape):
            raise UsageError(
                f"--shape {name}={','.join(map(str, shape))} has rank {len(shape)} but the model's input is "
                f"{specs[name].describe()}"
            )
        for dim, wanted in zip(declared, shape, strict=True):
            if isinstance(dim, int) and dim != wanted:
                raise UsageError(
                    f"--shape {name}={','.join(map(str, shape))} differs from the model's fixed input shape "
                    f"{specs[name].describe()}"
                )
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for value in light.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[value.name]:
                dims.add().dim_value = size
    return light


def _static(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
    return tuple(dims) if all(dim > 0 for dim in dims) else None


def _feeds_for(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero inputs of the declared shapes (token ids 0, masks 0: only the shapes matter here)."""

    return {spec.name: np.zeros(shapes[spec.name], dtype=spec.dtype) for spec in model_inputs(model)}


def activation_shapes(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    batch: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] = ("cpu",),
) -> dict[str, tuple[int, ...]]:
    """The shape of each site's activation (as its node reads it), by activation name.

    The input shapes are ``input_shapes`` if given, else those of ``batch``. ONNX shape inference (with
    data propagation, so ``Shape → Gather → Concat → Reshape`` chains resolve) gives most activations;
    any it leaves unknown are read from one ONNX Runtime run on ``batch`` (or on zeros of the declared
    shapes).

    Raises:
        UsageError: neither shapes nor a batch, or shapes that do not fit the model's inputs.
        DataError: ONNX Runtime cannot run the model on those inputs.
    """

    if input_shapes:
        shapes = dict(input_shapes)
    elif batch is not None:
        names = {spec.name for spec in model_inputs(model)}
        shapes = {name: tuple(np.shape(array)) for name, array in batch.items() if name in names}
    else:
        raise UsageError(SHAPE_HINT)
    fixed = _fixed_inputs(model, shapes)
    wanted = list(dict.fromkeys(site.activation for site in sites))
    found: dict[str, tuple[int, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
        known = {value.name: _static(value) for value in values}
        found = {name: shape for name in wanted if (shape := known.get(name)) is not None}
    except (onnx.shape_inference.InferenceError, ValueError) as error:  # fall back to a run below
        log.info("shape inference failed (%s); reading activation shapes from an onnxruntime run", error)
    unresolved = [name for name in wanted if name not in found]
    if unresolved:

        elem_types = {site.activation: site.weight.compute_dtype for site in sites}
        exposed = expose(model, [(name, elem_types[name]) for name in unresolved])
        session = session_for(exposed, providers)
        inputs = {value.name for value in session.get_inputs()}
        source = batch if batch is not None and not input_shapes else _feeds_for(model, shapes)
        feed = {name: np.asarray(value) for name, value in source.items() if name in inputs}
        try:
            arrays = session.run([value.name for value in exposed.graph.output], feed)
        except Exception as error:  # onnxruntime's pybind errors
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"onnxruntime cannot run the model on inputs of shapes {shapes}: {first}") from error
        found.update({name: tuple(array.shape) for name, array in zip(unresolved, arrays, strict=True)})
        log.info("%d activation shapes read from an onnxruntime run", len(unresolved))
    return found


# ---------------------------------------------------------------- the two forms of a site


def _consumed_weight(site: Site, weight_kn: np.ndarray) -> np.ndarray:
    """The weight as the node reads it, from the normal form ``W_kn`` ``[K, N]`` (α taken back out; a Conv's
    ``[N, C, k…]`` from its matrix in its form)."""
    if site.conv is not None:
        return conv_kernel(weight_kn, site.conv)
    matrix = weight_kn / site.alpha if site.alpha != 1.0 else weight_kn  # [K, N]
    return matrix.T if site.transpose_weight else matrix  # as consumed


def _bias_value(index: GraphIndex, site: Site, base_dir: str | None) -> np.ndarray | None:
    if site.bias is None:
        return None
    tensor = index.constant_tensor(site.bias)
    if tensor is None:  # a dynamic C: time with a zero bias of the same broadcast class
        if site.conv is not None:
            return np.zeros([site.conv.out_channels])
        return np.zeros([site.n] if site.weight_side == "right" else [site.n, 1])
    return np.asarray(io.tensor_array(tensor, base_dir))


def site_models(
    site: Site,
    node: onnx.NodeProto,
    weight_kn: np.ndarray,
    bias: np.ndarray | None,
    activation_shape: Sequence[int],
    factorization: Factorization,
    storage: int,
    layout: str = "fused",
    opset: int = 17,
    ir_version: int = 8,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The dense and the factorized standalone models of one site.

    Args:
        site: the site, as matched in its model.
        node: the site's node (its attributes are copied).
        weight_kn: the normal-form weight ``[K, N]``.
        bias: Gemm's ``C``, or ``None``.
        activation_shape: the activation as the node reads it (``[..., K]``, or ``[..., K, S]`` mirrored).
        factorization: the chosen factors of the site.
        storage: ONNX dtype the factors are stored in.
        layout: ``"fused"`` or ``"stages"``.
        opset: default-domain opset of the models.
        ir_version: IR version of the models.

    Returns:
        ``(dense, factorized)``; both read ``x`` and write ``y``.

    Raises:
        UsageError: the dense model does not match as one site (cannot happen for a matched site).
    """
    compute = site.weight.compute_dtype
    dtype = helper.tensor_dtype_to_np_dtype(compute)
    weight = np.ascontiguousarray(_consumed_weight(site, weight_kn).astype(dtype))
    initializers = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"] if site.weight_side == "right" else ["w", "x"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(dtype)), "c"))
        inputs.append("c")
    dense_node = helper.make_node(node.op_type, inputs, ["y"], name=site.name)
    dense_node.attribute.extend(copy.deepcopy(node.attribute))
    graph = helper.make_graph(
        [dense_node],
        "site",
        [helper.make_tensor_value_info("x", compute, list(activation_shape))],
        [helper.make_tensor_value_info("y", compute, None)],
        initializers,
    )
    dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    dense.ir_version = ir_version
    inferred = onnx.shape_inference.infer_shapes(dense).graph.output[0]
    if inferred.type.tensor_type.HasField("shape"):  # a typed output keeps the checker content
        dense.graph.output[0].CopyFrom(inferred)
    factorized = copy.deepcopy(dense)
    sites = find_sites(factorized).sites
    if len(sites) != 1:
        raise UsageError(f"site {site.name!r} does not stand alone as one MatMul/Gemm/Conv; cannot time it")
    (alone,) = sites
    if site.conv is not None:  # in the site's own form (find_sites matches the channel form)
        alone = conv_site_in_form(alone, site.conv.form)
    emit(factorized, {alone.group: factorization}, [alone], {alone.group: storage}, EmitOptions(layout=layout))
    return dense, factorized


def _repeat_count(run: Callable[[], None]) -> int:
    """How many runs of ``run`` take at least ``_MIN_SAMPLE_SECONDS`` (one after a first, untimed run)."""
    run()
    started = time.perf_counter()
    run()
    once = time.perf_counter() - started
    return int(min(_MAX_REPEATS, max(1, math.ceil(_MIN_SAMPLE_SECONDS / max(once, 1e-7)))))


def time_site(
    dense_path: str | os.PathLike[str],
    factorized_path: str | os.PathLike[str],
    activation: np.ndarray,
    provider: str,
    config: SpeedCheckConfig,
) -> SiteTiming:
    """Time the two forms alternately (dense, factorized, dense, …) on ``activation``; medians in ms.

    Raises:
        ProviderError, ModelError, DataError: as :func:`onnxsvd.validate.open_session` and
            :func:`onnxsvd.validate.make_runner`.
    """
    dense_session, _ = open_session(dense_path, provider, config.threads)
    factorized_session, _ = open_session(factorized_path, provider, config.threads)
    feeds = {"x": activation}
    run_dense = make_runner(dense_session, feeds, provider)
    run_factorized = make_runner(factorized_session, feeds, provider)
    # One repeat count for both (the slower form's), so each sample does the same number of runs.
    repeats = min(_repeat_count(run_dense), _repeat_count(run_factorized))

    def dense() -> None:
        for _ in range(repeats):
            run_dense()

    def factorized() -> None:
        for _ in range(repeats):
            run_factorized()

    times_dense, times_factorized = time_runners(dense, factorized, config.warmup, config.iters)
    return SiteTiming(
        provider=provider,
        dense_ms=float(np.median(times_dense)) * 1e3 / repeats,
        factorized_ms=float(np.median(times_factorized)) * 1e3 / repeats,
        activation_shape=tuple(activation.shape),
        iters=config.iters,
        repeats=repeats,
    )


def _signature(site: Site, node: onnx.NodeProto, shape: tuple[int, ...], outcome: GroupOutcome, layout: str) -> Any:
    """Sites with equal signatures time alike: same op, attributes, shapes, dtypes, ranks and layout."""
    assert outcome.factorization is not None
    attributes = tuple(sorted(attribute.SerializeToString() for attribute in node.attribute))
    ranks = tuple(a.shape[1] for a, _ in outcome.factorization.stages)
    return (
        node.op_type, site.weight_side, attributes, shape, site.weight.compute_dtype, site.k, site.n,
        site.bias is not None, ranks, outcome.storage, layout,
    )


#: Why ``--keep-dense-if-slower`` leaves a group used only inside If/Loop/Scan bodies factorized, untimed.
UNTIMED_IN_BODY = (
    "--keep-dense-if-slower: not timed (inside an If/Loop/Scan body, whose activation shapes ONNX Runtime cannot "
    "expose); kept factorized"
)


class SiteSpeedCheck:
    """Keeps dense every factorized group whose chain is not faster than its dense layer.

    Called by :func:`onnxsvd.rewrite` (and the sequential rewrite) after the factors are chosen and before
    they are emitted, as ``check(model, outcomes, base_dir)``: each outcome with factors gets
    ``timing``; those whose chain is not faster on every provider lose their factors and say why.

    Args:
        config: providers, timing, declared input shapes.
        batch: one batch of model inputs (e.g. the first calibration batch) giving the real shapes when
            ``config.input_shapes`` is empty.
        layout: the rewrite's layout (``"fused"``/``"stages"``), to time the chain that will be emitted.
        progress: optional callback per distinct configuration timed.

    Raises:
        UsageError: neither ``config.input_shapes`` nor ``batch``.
        ProviderError: a provider that this onnxruntime does not have.
    """

    def __init__(
        self,
        config: SpeedCheckConfig,
        batch: Mapping[str, np.ndarray] | None = None,
        layout: str = "fused",
        progress: Progress | None = None,
    ) -> None:
        if not config.input_shapes and batch is None:
            raise UsageError(SHAPE_HINT)
        check_providers(config.providers)
        self.config = config
        self.batch = dict(batch) if batch is not None else None
        self.layout = layout
        self.progress = progress
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._shapes_of: onnx.ModelProto | None = None  # held, so its identity cannot be reused
        self._timings: dict[Any, list[SiteTiming]] = {}

    def _activation_shapes(self, model: onnx.ModelProto, sites: Sequence[Site]) -> dict[str, tuple[int, ...]]:
        # Computed once per model object (the sequential rewrite calls once per level on one model).
        if self._shapes_of is not model or any(site.activation not in self._shapes for site in sites):
            every = tuple(site for site in find_sites(model).sites if not site.scope)  # a body's cannot be exposed
            self._shapes = activation_shapes(
                model, every or sites, self.config.input_shapes or None, self.batch, self.config.providers
            )
            self._shapes_of = model
        return self._shapes

    def __call__(
        self, model: onnx.ModelProto, outcomes: list[GroupOutcome], base_dir: str | None = None
    ) -> list[GroupOutcome]:
        """Time every outcome with factors; strip the factors of those not faster. Returns ``outcomes``.

        Args:
            model: the model the outcomes' sites were matched in (not modified).
            outcomes: the groups, as :func:`onnxsvd.pipeline.group.factor_group` left them (modified in place).
            base_dir: folder of the model file, for external data.
        """
        chosen = [outcome for outcome in outcomes if outcome.factorization is not None]
        for outcome in [o for o in chosen if all(site.scope for site in o.sites)]:
            outcome.reason += f"; {UNTIMED_IN_BODY}"
            chosen.remove(outcome)
        if not chosen:
            return outcomes
        main_sites = [site for outcome in chosen for site in outcome.sites if not site.scope]
        shapes = self._activation_shapes(model, main_sites)
        index = GraphIndex(model.graph)
        opset = next((int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx")), 17)
        pending = {}
        for outcome in chosen:
            site = next(site for site in outcome.sites if not site.scope)  # timed where its shape is known
            node = model.graph.node[site.node_index]
            shape = shapes.get(site.activation)
            if shape is None:
                raise UsageError(f"the shape of {site.activation!r} (input of {site.name!r}) is unknown; {SHAPE_HINT}")
            key = _signature(site, node, shape, outcome, self.layout)
            pending.setdefault(key, []).append((outcome, site, node, shape))
        folder = tempfile.mkdtemp(prefix="onnxsvd-site-speed-")
        try:
            for done, (key, members) in enumerate(pending.items(), start=1):
                if key not in self._timings:
                    outcome, site, node, shape = members[0]
                    self._timings[key] = self._time(index, outcome, site, node, shape, model, opset, folder, base_dir)
                timings = self._timings[key]
                for outcome, *_ in members:
                    _apply(outcome, timings, self.config.min_speedup)
                if self.progress is not None:
                    self.progress(done, len(pending), members[0][1].name)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        kept = sum(1 for outcome in chosen if outcome.factorization is None)
        log.info(
            "speed check: %d of %d factorized groups kept dense (%d distinct configurations timed on %s)",
            kept, len(chosen), len(pending), ",".join(self.config.providers),
        )
        return outcomes

    def check_corrections(self, model: onnx.ModelProto, outcomes: list[Any], base_dir: str | None = None) -> None:
        """With ``--quantize``: time every corrected site against its quantized layer alone and drop the
        corrections that cost more than ``config.max_branch_cost`` (outcomes modified in place).

        Args:
            model: the model the outcomes' sites were matched in (not modified).
            outcomes: :class:`onnxsvd.pipeline.quantized.QuantOutcome` of each weight group.
            base_dir: folder of the model file, for external data.
        """
        corrected = [outcome for outcome in outcomes if outcome.weight is not None and outcome.factorization]
        if not corrected:
            return
        shapes = self._activation_shapes(model, [site for outcome in corrected for site in outcome.sites])
        index = GraphIndex(model.graph)
        opset = next((int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx")), 17)
        folder = tempfile.mkdtemp(prefix="onnxsvd-branch-speed-")
        dropped = 0
        try:
            for done, outcome in enumerate(corrected, start=1):
                site = outcome.sites[0]
                node = model.graph.node[site.node_index]
                shape = shapes.get(site.activation)
                if shape is None:
                    raise UsageError(f"the shape of {site.activation!r} (input of {site.name!r}) is unknown; "
                                     f"{SHAPE_HINT}")
                key = _quantized_signature(site, node, shape, outcome)
                if key not in self._timings:
                    group = QuantizedGroup(outcome.sites, outcome.weight, outcome.factorization, outcome.storage,
                                           fused=outcome.fused)
                    alone, with_branch = quantized_site_models(
                        site, node, _bias_value(index, site, base_dir), shape, group, opset, max(model.ir_version, 7)
                    )
                    self._timings[key] = self._time_pair(alone, with_branch, site, shape, folder)
                label = f"int{outcome.weight.attributes.get('bits', 4)}"
                _drop_or_keep_correction(outcome, self._timings[key], self.config.max_branch_cost, label)
                dropped += outcome.factorization is None
                if self.progress is not None:
                    self.progress(done, len(corrected), site.name)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        log.info("speed check: %d of %d corrections dropped (over %.0f%% of their quantized layer alone)",
                 dropped, len(corrected), 100 * self.config.max_branch_cost)

    def _time_pair(
        self, first: onnx.ModelProto, second: onnx.ModelProto, site: Site, shape: tuple[int, ...], folder: str
    ) -> list[SiteTiming]:
        """Time two standalone models of a site (``first`` as ``dense_ms``) on every provider."""
        paths = []
        for name, proto in (("first", first), ("second", second)):
            path = Path(folder) / f"{len(self._timings)}_{name}.onnx"
            onnx.save(proto, path)
            paths.append(path)
        rng = np.random.default_rng(self.config.seed)
        activation = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(site.weight.compute_dtype))
        return [time_site(paths[0], paths[1], activation, provider, self.config) for provider in self.config.providers]

    def _time(
        self,
        index: GraphIndex,
        outcome: GroupOutcome,
        site: Site,
        node: onnx.NodeProto,
        shape: tuple[int, ...],
        model: onnx.ModelProto,
        opset: int,
        folder: str,
        base_dir: str | None,
    ) -> list[SiteTiming]:
        assert outcome.factorization is not None
        weight = load_weight(index, site, base_dir)  # [K, N]
        dense, factorized = site_models(
            site, node, weight, _bias_value(index, site, base_dir), shape, outcome.factorization, outcome.storage,
            self.layout, opset, max(model.ir_version, 7),
        )
        timings = self._time_pair(dense, factorized, site, shape, folder)
        for timing in timings:
            log.debug("%s %s: %s", site.name, shape, timing.describe())
        return timings


def quantized_site_models(
    site: Site,
    node: onnx.NodeProto,
    bias: np.ndarray | None,
    activation_shape: Sequence[int],
    group: QuantizedGroup,
    opset: int = 17,
    ir_version: int = 8,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The quantized layer alone and the corrected site, as standalone models of one site.

    Both are the site's node rewritten by :func:`onnxsvd.graph.emit_quantized` (the first without the
    correction), so what is timed is what ``rewrite`` writes. ``group`` is the site's group with its
    correction; the weight's values do not matter for timing, so a zero weight stands for it.

    Returns:
        ``(quantized alone, corrected)``; both read ``x`` and write ``y``.
    """
    weight = np.zeros((site.k, site.n))
    dense, _ = site_models(site, node, weight, bias, activation_shape,
                           Factorization(stages=((np.zeros((site.k, 1)), np.zeros((1, site.n))),), kept_energy=1.0),
                           onnx.TensorProto.FLOAT, "fused", opset, ir_version)
    forms = []
    for correction in (False, True):
        standalone = copy.deepcopy(dense)
        (alone,) = find_sites(standalone).sites
        ranks = activation_ranks(standalone, [alone])
        if correction:
            emitted = dataclasses.replace(group, sites=[alone])
        else:
            emitted = QuantizedGroup([alone], group.weight, None, group.storage)
        forms.append(emit_quantized(standalone, [emitted], ranks=ranks))
    return forms[0], forms[1]


def _quantized_signature(site: Site, node: onnx.NodeProto, shape: tuple[int, ...], outcome: Any) -> Any:
    attributes = tuple(sorted(attribute.SerializeToString() for attribute in node.attribute))
    fused = getattr(outcome, "fused", None)
    return (
        node.op_type, site.weight_side, attributes, shape, site.weight.compute_dtype, site.k, site.n,
        site.bias is not None, outcome.rank, outcome.storage, fused is not None,
        tuple(sorted(outcome.weight.attributes.items())),
    )


def _drop_or_keep_correction(outcome: Any, timings: Sequence[SiteTiming], max_cost: float, label: str) -> None:
    """Record the slowest provider's cost of the correction; drop the correction when it is over budget."""
    worst = max(timings, key=lambda timing: timing.factorized_ms / timing.dense_ms if timing.dense_ms else math.inf)
    cost = worst.factorized_ms / worst.dense_ms - 1.0 if worst.dense_ms > 0 else math.inf
    numbers = (f"{cost:+.0%} over the {label} layer alone on {worst.provider} "
               f"({worst.factorized_ms:.3g} ms vs {worst.dense_ms:.3g} ms)")
    outcome.base_ms, outcome.corrected_ms = worst.dense_ms, worst.factorized_ms
    outcome.speed_provider = worst.provider
    if cost <= max_cost:
        outcome.reason = f"{outcome.reason}; the correction costs {numbers}"
        return
    rank = outcome.rank
    outcome.factorization, outcome.ranks, outcome.fused = None, [], None
    outcome.kept_energy, outcome.weight_error = None, outcome.base_error
    outcome.reason = (f"quantized base only: the rank {rank} correction cost {numbers}, above "
                      f"--max-branch-cost {max_cost:.0%}")


def _apply(outcome: GroupOutcome, timings: Sequence[SiteTiming], min_speedup: float) -> None:
    """Record the slowest provider's timing on ``outcome``; drop its factors when it is not faster there."""
    worst = min(timings, key=lambda timing: timing.speedup)
    outcome.dense_ms, outcome.factorized_ms = worst.dense_ms, worst.factorized_ms
    outcome.speedup, outcome.speed_provider = worst.speedup, worst.provider
    if worst.speedup > min_speedup:
        verdict = f"chain {worst.describe()}"
        outcome.reason = f"{outcome.reason}; {verdict}" if outcome.reason else verdict
        return
    outcome.factorization, outcome.ranks = None, []
    outcome.kept_energy = outcome.weight_error = None
    if worst.speedup > 1.0:
        outcome.reason = (
            f"factorized chain only {worst.speedup:.2f}× faster than dense, under the required "
            f"{min_speedup:g}× on {worst.provider} ({worst.factorized_ms:.3g} ms vs {worst.dense_ms:.3g} ms)"
        )
    else:
        outcome.reason = f"factorized chain {worst.describe()}"
