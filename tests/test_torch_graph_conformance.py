"""The torch evaluator against the ONNX specification's own node test cases.

For every op in :data:`onnxsvd.finetune.torch_graph.OPS`, every case of
``onnx.backend.test.case.node.collect_testcases()`` made for that op runs through :class:`TorchGraph` and
is compared with the expected outputs at the ONNX backend tests' tolerances (``rtol=1e-3``, ``atol=1e-7``
for floats, two units in the last place for bfloat16 as ``onnx.backend.test.runner`` allows, exact for
integers and booleans). The function-body expansions of a case (``*_expanded``)
run too when every op of the body is claimed. A case the evaluator cannot run is listed in
:data:`UNSUPPORTED` with its reason, and must be refused with a one-line :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from onnxsvd.errors import UnsupportedOpError  # noqa: E402
from onnxsvd.finetune.torch_graph import OPS, TorchGraph  # noqa: E402

_NARROW_TYPES = "FLOAT8E4M3FN|FLOAT8E4M3FNUZ|FLOAT8E5M2|FLOAT8E5M2FNUZ|FLOAT8E8M0|FLOAT4E2M1|U?INT4|U?INT2"

#: Cases the evaluator refuses on purpose: a pattern of case names (matched whole) → the reason. Each
#: case that matches must raise UnsupportedOpError in one line, and each pattern must match some case.
UNSUPPORTED: dict[str, str] = {
    rf"test_cast(like)?(_no_saturate|_e8m0)?_\w*({_NARROW_TYPES})\w*(_expanded)?": (
        "float8, 4-bit and 2-bit tensor types: torch has no arithmetic on them"
    ),
    r"test_\w*uint(16|32|64)\w*": (
        "unsigned integers wider than 8 bits: torch's CPU kernels do not implement them"
    ),
    r"test_dequantizelinear_(e4m3fn|e5m2|u?int4|u?int2|float4e2m1)\w*": (
        "float8, 4-bit and 2-bit tensor types: torch has no arithmetic on them"
    ),
    r"test_equal_string(_broadcast)?": "string tensors: torch has none",
    r"test_identity_(sequence|opt)": "sequence and optional values: the evaluator runs tensors only",
    r"test_training_dropout(_default)?(_mask)?": "training-mode Dropout draws a random mask (the spec's is seeded)",
}

_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


def _ops(graph: onnx.GraphProto) -> set[str]:
    """Every op type of a graph, its subgraphs included."""
    found = set()
    for node in graph.node:
        found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                found |= _ops(subgraph)
    return found


@functools.lru_cache(maxsize=1)
def spec_cases() -> dict[str, list[Any]]:
    """The spec's node cases by the op they were written for (expansions under their op's name)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    op_of: dict[str, str] = {}
    for case in cases:
        if not _EXPANDED.search(case.name) and len(case.model.graph.node) == 1:
            op_of[case.name] = case.model.graph.node[0].op_type
    grouped: dict[str, list[Any]] = defaultdict(list)
    for case in cases:
        base = _EXPANDED.sub("", case.name)
        if base in op_of:
            grouped[op_of[base]].append(case)
    return dict(grouped)


def _reason(name: str) -> str | None:
    """Why a case is refused on purpose, or None."""
    return next((why for pattern, why in UNSUPPORTED.items() if re.fullmatch(pattern, name)), None)


def _array(value: Any) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _feed(value: Any) -> Any:
    array = _array(value)
    if array.dtype.name == "bfloat16":  # an ml_dtypes type: torch reads it through float32
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _to_numpy(value: Any) -> np.ndarray:
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.float().numpy().astype(ml_dtypes.bfloat16)
    return value.detach().numpy()


def _run(case: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(output name, expected, actual)`` for each output of each data set of a case."""
    graph = TorchGraph(case.model)
    compared = []
    for inputs, outputs in case.data_sets:
        feeds = {name: _feed(value) for name, value in zip(graph.input_names, inputs, strict=True)}
        with torch.no_grad():
            values = graph(feeds)
        for name, expected in zip(graph.output_names, outputs, strict=True):
            compared.append((name, _array(expected), _to_numpy(values[name])))
    return compared


def _mismatch(case: Any) -> str | None:
    """Why a case's outputs differ from the spec's, or None when they match."""
    try:
        compared = _run(case)
    except Exception as error:  # noqa: BLE001 - any failure is reported with the case's name
        return f"{type(error).__name__}: {str(error)[:300]}"
    for name, expected, actual in compared:
        if expected.dtype == object:  # sequences, strings: never claimed
            return f"{name}: object output"
        if actual.shape != expected.shape:
            return f"{name}: shape {actual.shape}, expected {expected.shape}"
        if actual.dtype != expected.dtype:
            return f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
        if expected.dtype.kind in "biu":
            if not np.array_equal(actual, expected):
                return f"{name}: integers differ"
        else:
            wanted, got = expected.astype(np.float64), actual.astype(np.float64)
            # As onnx.backend.test.runner: bfloat16 outputs are compared within two units in the last place.
            rtol = max(case.rtol, 2**-6) if expected.dtype.name == "bfloat16" else case.rtol
            try:
                np.testing.assert_allclose(got, wanted, rtol=rtol, atol=case.atol)
            except AssertionError as error:
                return f"{name}: {str(error).strip().splitlines()[2][:200]}"
    return None


def _claimed(case: Any) -> bool:
    return _ops(case.model.graph) <= set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_conforms_to_spec(op: str) -> None:
    cases = [case for case in spec_cases().get(op, []) if _claimed(case)]
    assert cases, f"the spec has no case for {op}"
    failures = []
    for case in cases:
        if _reason(case.name) is not None:
            with pytest.raises(UnsupportedOpError) as caught:
                _run(case)
            assert "\n" not in str(caught.value), case.name
            continue
        reason = _mismatch(case)
        if reason is not None:
            failures.append(f"{case.name}: {reason}")
    assert not failures, "\n".join(failures)


def test_every_refusal_names_spec_cases() -> None:
    names = [case.name for cases in spec_cases().values() for case in cases]
    stale = [pattern for pattern in UNSUPPORTED if not any(re.fullmatch(pattern, name) for name in names)]
    assert stale == []


def test_spec_cases_per_op() -> None:
    """Print how many spec cases each op runs (``pytest -s``); every claimed op has at least one."""
    counts = {op: sum(_claimed(case) for case in spec_cases().get(op, [])) for op in sorted(OPS)}
    print(" ".join(f"{op}={count}" for op, count in counts.items()))
    assert min(counts.values()) > 0
