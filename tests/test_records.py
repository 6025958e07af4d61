"""What ``rewrite`` records on the nodes it emits (``onnxsvd.*`` node metadata) and the source fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxsvd
from onnxsvd import io
from onnxsvd.files import RewriteJob, rewrite_file
from onnxsvd.graph.records import (
    FUSED,
    SOURCE_FINGERPRINT_KEY,
    ChainRecord,
    RecordError,
    read_record,
    write_record,
)
from onnxsvd.pipeline.sequential import rewrite_sequential
from tests.conftest import FULL_RANK, MODELS
from tests.models import assert_valid, gemm_case, make_model, matmul_case, relative_error, run, shared_weight_case
from tests.test_calibrate import _batches, _correlated, _mlp


def records_by_site(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, ChainRecord]]]:
    found: dict[str, list[tuple[onnx.NodeProto, ChainRecord]]] = {}
    for node in model.graph.node:
        record = read_record(node)
        if record is not None:
            found.setdefault(record.site, []).append((node, record))
    return found


def stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor).astype(np.float64)


def check_records(
    original: onnx.ModelProto, result: onnxsvd.RewriteResult, sides: dict[str, str], weights: dict[str, np.ndarray]
) -> None:
    """Every emitted node carries an exact record; kept nodes carry none; the recorded factors multiply back
    to each site's normal-form weight ``W_kn`` ``[K, N]`` (full rank, so exactly up to rounding)."""
    model = result.model
    original_names = {node.name for node in original.graph.node}
    for node in model.graph.node:
        if node.name in original_names:
            assert read_record(node) is None, node.name
        else:
            assert read_record(node) is not None, f"emitted node {node.name!r} carries no record"
    by_site = records_by_site(model)
    factorized = {site.name: site for site in result.report.sites if site.action == "factorized"}
    assert set(by_site) == set(factorized) == set(sides)
    consumers = {name: [n for n in model.graph.node if name in n.input] for t in model.graph.initializer
                 for name in [t.name]}
    for name, entries in by_site.items():
        site = factorized[name]
        side = sides[name]
        chains: dict[int, dict[str, list]] = {}
        for node, record in entries:
            assert record.weight_side == side
            chains.setdefault(record.stage, {}).setdefault(record.role, []).append((node, record))
        stage_ranks = site.stage_ranks if len(chains) > 1 else [site.rank]
        assert sorted(chains) == ([FUSED] if len(chains) == 1 else list(range(1, len(stage_ranks) + 1)))
        total = np.zeros(weights[name].shape)  # [K, N]
        for stage, roles in sorted(chains.items()):
            ((first, record),), ((second, _),) = roles["first"], roles["second"]
            rank = stage_ranks[stage - 1] if stage != FUSED else site.rank
            assert record.rank == rank
            assert all(r.factor_a == record.factor_a and r.factor_b == record.factor_b
                       for group in roles.values() for _, r in group)
            a, b = stored(model, record.factor_a), stored(model, record.factor_b)
            k, n = weights[name].shape
            if side == "right":
                assert a.shape == (k, rank) and b.shape == (rank, n)
                total += a @ b  # [K, r] · [r, N]
            else:
                assert a.shape == (rank, k) and b.shape == (n, rank)
                total += (b @ a).T  # ([N, r] · [r, K])ᵀ
            # The recorded factor is what the recorded node reads (directly or through its recorded Cast).
            position = 1 if side == "right" else 0
            for node, factor in ((first, record.factor_a), (second, record.factor_b)):
                read = node.input[position]
                if read != factor:
                    (cast,) = [c for c in consumers[factor] if c.op_type == "Cast"]
                    assert cast.output[0] == read and read_record(cast).role == "cast"
            assert first.output[0] in second.input
        fp16 = next(t for t in model.graph.initializer if t.name == record.factor_a).data_type == TensorProto.FLOAT16
        assert relative_error(total, weights[name]) < (2e-3 if fp16 else 1e-5)


def test_records_of_a_right_and_a_left_matmul(rng: np.random.Generator) -> None:
    for side in ("right", "left"):
        case = matmul_case(rng, 12, 8, side=side)
        result = onnxsvd.rewrite(case.model, onnxsvd.RewriteConfig(policy=FULL_RANK))
        check_records(case.model, result, {"mm": side}, case.weights)
        assert_valid(result.model)
        ((first, record),) = [(n, r) for n, r in records_by_site(result.model)["mm"] if r.role == "first"]
        assert record == ChainRecord("mm", FUSED, "first", side, record.factor_a, record.factor_b, 8)
        assert record.factor_a in first.input and record.label == "mm"


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "bias", "weight_as", "opset"),
    [
        (0, 1, 1.0, 1.0, "n", "B", 17),  # PyTorch's Linear
        (1, 0, 0.5, 2.0, "mn", "B", 17),
        (0, 1, 1.5, 0.5, "1n", "A", 17),  # the weight on the left
        (1, 1, 1.0, 1.0, "none", "A", 17),
        (1, 0, 1.0, 1.0, "n", "B", 9),  # old opset: the activation's transA becomes a Transpose node
    ],
)
def test_records_of_gemm_sites(trans_a, trans_b, alpha, beta, bias, weight_as, opset, rng) -> None:
    case = gemm_case(rng, 6, 10, 7, trans_a, trans_b, alpha, beta, bias, weight_as, opset=opset)
    result = onnxsvd.rewrite(case.model, onnxsvd.RewriteConfig(policy=FULL_RANK))
    check_records(case.model, result, {"gemm": "right" if weight_as == "B" else "left"}, case.weights)
    assert_valid(result.model)
    roles = sorted(record.role for _, record in records_by_site(result.model)["gemm"])
    assert roles == (["first", "second", "transpose"] if opset == 9 else ["first", "second"])
    (reference,) = run(case.model, case.feeds)
    (rewritten,) = run(result.model, case.feeds)
    assert relative_error(rewritten, reference) < 1e-4


@pytest.mark.parametrize("layout", ["stages", "fused"])
def test_records_of_residual_stages_in_fp16(layout: str, rng: np.random.Generator) -> None:
    case = matmul_case(rng, 12, 8)
    config = onnxsvd.RewriteConfig(policy=FULL_RANK, stage_ranks=(5, 3), layout=layout, dtype="fp16")
    result = onnxsvd.rewrite(case.model, config)
    check_records(case.model, result, {"mm": "right"}, case.weights)
    assert_valid(result.model)
    records = [record for _, record in records_by_site(result.model)["mm"]]
    if layout == "stages":
        assert sorted((r.stage, r.role) for r in records) == [
            (1, "cast"), (1, "cast"), (1, "first"), (1, "second"),
            (2, "cast"), (2, "cast"), (2, "first"), (2, "second"), (2, "sum"),
        ]
        assert {r.label for r in records} == {"mm/svd_s1", "mm/svd_s2"}
    else:
        assert sorted((r.stage, r.role, r.rank) for r in records) == [
            (FUSED, "cast", 8), (FUSED, "cast", 8), (FUSED, "first", 8), (FUSED, "second", 8)
        ]


def test_sites_sharing_a_weight_record_the_same_factors(rng: np.random.Generator) -> None:
    case = shared_weight_case(rng)
    result = onnxsvd.rewrite(case.model, onnxsvd.RewriteConfig(policy=FULL_RANK))
    check_records(case.model, result, {"first": "right", "second": "right"}, case.weights)
    by_site = records_by_site(result.model)
    factors = {(r.factor_a, r.factor_b) for entries in by_site.values() for _, r in entries}
    assert len(factors) == 1


def test_the_sequential_pass_records_every_chain(rng: np.random.Generator) -> None:
    model = _mlp(rng, widths=(12, 16, 8))
    batches = _batches({"x": _correlated(rng, 32, 4, 12)}, 16)
    config = onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 4, align=1), method="whiten")
    result = rewrite_sequential(model, config, batches)
    sites = {site.name for site in result.report.sites if site.action == "factorized"}
    assert len(sites) == 2 and set(records_by_site(result.model)) == sites
    for entries in records_by_site(result.model).values():
        assert sorted(r.role for _, r in entries) == ["first", "second"] and entries[0][1].rank == 4
    assert {p.key: p.value for p in result.model.metadata_props}[SOURCE_FINGERPRINT_KEY] == io.fingerprint(model)


def test_records_and_fingerprint_survive_save_load_external_data_and_ort(tmp_path: Path) -> None:
    source = MODELS / "digits_vit.onnx"
    original = onnx.load(str(source))
    config = onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy(min_rank=1))  # every one of the 14 sites
    for external in (False, True):
        output = tmp_path / f"small_{external}.onnx"
        rewrite_file(RewriteJob(model=source, output=output, config=config, external_data=external))
        assert (tmp_path / f"small_{external}.onnx.data").exists() == external
        loaded = onnx.load(str(output))
        assert {p.key: p.value for p in loaded.metadata_props}[SOURCE_FINGERPRINT_KEY] == io.fingerprint(original)
        by_site = records_by_site(loaded)
        assert len(by_site) == 14
        initializers = {t.name for t in loaded.graph.initializer}
        assert all(r.factor_a in initializers and r.factor_b in initializers
                   for entries in by_site.values() for _, r in entries)
        onnx.checker.check_model(str(output), full_check=True)
        feeds = {"input": np.load(MODELS / "digits_eval.npz")["input"][:8]}
        (expected,) = run(onnxsvd.rewrite(original, config).model, feeds)
        import onnxruntime as ort

        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, feeds)
        assert relative_error(actual, expected) < 1e-5


def test_write_and_read_record_round_trip_and_malformed_records() -> None:
    node = helper.make_node("MatMul", ["x", "a"], ["h"], name="n")
    node.metadata_props.add(key="user.note", value="kept")
    record = ChainRecord("site", 2, "first", "left", "w.svd_s2_a_t", "w.svd_s2_b_t", 4)
    write_record(node, record)
    write_record(node, record)  # idempotent: no duplicate keys
    assert read_record(node) == record and record.label == "site/svd_s2"
    assert [p.key for p in node.metadata_props].count("onnxsvd.site") == 1
    assert {p.key: p.value for p in node.metadata_props}["user.note"] == "kept"
    assert read_record(helper.make_node("Relu", ["x"], ["y"])) is None
    broken = onnx.NodeProto()
    broken.CopyFrom(node)
    for prop in broken.metadata_props:
        if prop.key == "onnxsvd.stage":
            prop.value = "third"
    with pytest.raises(RecordError, match="onnxsvd.stage is 'third'"):
        read_record(broken)
    del broken.metadata_props[2:]  # user.note and onnxsvd.site are left
    with pytest.raises(RecordError, match="record lacks onnxsvd.stage, onnxsvd.role"):
        read_record(broken)


def test_unchanged_models_and_kept_sites_carry_no_records(rng: np.random.Generator) -> None:
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="small")]
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    model = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])], [weight])
    result = onnxsvd.rewrite(model, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 2, align=1)))
    assert result.report.factorized == [] and records_by_site(result.model) == {}
